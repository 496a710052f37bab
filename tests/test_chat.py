"""`gptctl chat`: the conversation's prompt and its trimming, replies equal to `gptctl sample`'s, the commands,
Ctrl-C (a real SIGINT) during a reply and at the prompt, pretrained runs, refusals."""

import json
import os
import select
import signal
import subprocess
import sys
import time
from itertools import islice
from pathlib import Path

import pytest

from helpers import cli, save_tiny_checkpoint
from gptctl.chat import NEXT_TURN, Chat, Conversation, MessageTooLong, Reply
from gptctl.cli import app
from gptctl.data.tokenizer import get_encoding
from gptctl.engine.generate import Sampling
from gptctl.engine.sample import Sampler
from gptctl.prompt import Turn, format_conversation, format_prompt

BLOCK = 128  # the finetuned model's context: room for a few short exchanges in the template
ENCODE = get_encoding().encode_ordinary  # as finetuning encodes the template
CPU_GREEDY = ["--device", "cpu", "--temperature", "0"]


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory) -> tuple[Path, str]:
    """(home, run name) of a real `gptctl finetune` (2 steps, in-process) of a tiny model with a 128-token context."""
    root = tmp_path_factory.mktemp("chat")
    parent = save_tiny_checkpoint(root / "parent.pt", block=BLOCK)
    data = root / "dolly.jsonl"
    words = "apple river stone cloud music garden silver winter candle forest".split()
    data.write_text("".join(json.dumps({"instruction": f"What is the uppercase form of {w}?", "context": "",
                                        "response": w.upper(), "category": "closed_qa"}) + "\n" for w in words * 4))
    home = root / "home"
    cli("finetune", "--pretrained-checkpoint", str(parent), "--dataset-path", str(data), "--max-steps", "2",
        "--warmup-steps", "1", "--batch-size", "2", "--total-batch-size", str(2 * BLOCK), "--eval-interval", "2",
        "--eval-steps", "1", "--run-name", "chatty", home=home)
    return home, "chatty"


def chat(runner, home: Path, *args: str, input: str):
    return runner.invoke(app, ["chat", *args], input=input, env={"GPTCTL_HOME": str(home)}, catch_exceptions=False)


def sampled(runner, home: Path, *args: str) -> str:
    """What `gptctl sample ARGS` streams, without the newline it ends with."""
    result = runner.invoke(app, ["sample", *args], env={"GPTCTL_HOME": str(home)}, catch_exceptions=False)
    assert result.exit_code == 0 and result.stdout.endswith("\n"), result.output
    return result.stdout[:-1]


# --- the conversation, with the real tokenizer ----------------------------------------------------------------

EXCHANGES = [Turn("Name a colour.", "Blue, like the sky."), Turn("And a fruit?", "An apple."),
             Turn("Which season is coldest?", "Winter.")]
SYSTEM = "You answer in a few words."


def conversation(budget: int, system: str | None = SYSTEM) -> Conversation:
    c = Conversation(ENCODE, budget, system)
    for turn in EXCHANGES:
        c.add(turn.user, turn.reply)
    return c


def test_earlier_exchanges_stay_while_they_fit():
    c = conversation(budget=1000)
    tokens, dropped = c.prompt("And a stone?")
    text = format_conversation([*EXCHANGES, Turn("And a stone?")], SYSTEM)
    assert dropped == 0 and tokens == ENCODE(text)
    assert text.startswith(SYSTEM) and text.endswith("### Instruction:\nAnd a stone?\n\n### Response:\n")


def test_the_oldest_exchanges_are_dropped_first_and_the_system_prompt_stays():
    newest_two = [*EXCHANGES[1:], Turn("And a stone?")]
    budget = len(ENCODE(format_conversation(newest_two, SYSTEM)))  # exactly the last two exchanges and the message
    c = conversation(budget)
    tokens, dropped = c.prompt("And a stone?")
    assert dropped == 1 and tokens == ENCODE(format_conversation(newest_two, SYSTEM)) and len(tokens) == budget
    text = get_encoding().decode(tokens)
    assert text.startswith(SYSTEM + "\n\n") and "Name a colour." not in text and "And a fruit?" in text
    assert c.turns == EXCHANGES[1:]  # dropped for good: the next message is told only of what it drops itself

    c = conversation(budget - 1)  # one token less: the two oldest go
    tokens, dropped = c.prompt("And a stone?")
    assert dropped == 2 and tokens == ENCODE(format_conversation([EXCHANGES[2], Turn("And a stone?")], SYSTEM))


def test_a_message_that_alone_does_not_fit_leaves_the_conversation_as_it_was():
    c = conversation(budget=100)
    with pytest.raises(MessageTooLong) as too_long:
        c.prompt("word " * 200)
    assert too_long.value.tokens == len(ENCODE(format_conversation([Turn("word " * 200)], SYSTEM))) > 100
    assert c.turns == EXCHANGES
    c.reset()
    assert c.turns == [] and Conversation(ENCODE, 100).prompt("Hi.") == (ENCODE(format_prompt("Hi.")), 0)


def test_a_finetuned_reply_ends_where_the_template_starts_the_next_exchange():
    assert format_conversation([*EXCHANGES, Turn("x")]).count(NEXT_TURN) == len(EXCHANGES) + 1


# --- the chat on a finetuned checkpoint, in-process -------------------------------------------------------------


@pytest.fixture
def ft_chat(tmp_path) -> Chat:
    path = save_tiny_checkpoint(tmp_path / "ft.pt", kind="finetune", block=BLOCK)
    return Chat(Sampler(path, "cpu"), 30, Sampling(temperature=0, stop=("zzz",)), seed=1)


def test_a_stopped_reply_keeps_what_was_said_so_far(ft_chat):
    reply = ft_chat.handle("Tell me a story.")
    assert isinstance(reply, Reply) and ft_chat.sampling.stop == ("zzz", NEXT_TURN)
    said = "".join(islice(reply, 3))  # as Ctrl-C stops it after three pieces
    reply.finish()
    assert said and ft_chat.conversation.turns == [Turn("Tell me a story.", said)]
    tokens, _ = ft_chat.conversation.prompt("Go on.")
    assert tokens == ENCODE(format_conversation([Turn("Tell me a story.", said), Turn("Go on.")]))
    assert ft_chat.handle("/reset") == "forgot the conversation"
    whole = ft_chat.handle("Tell me a story.")
    assert "".join(whole).startswith(said) and ft_chat.conversation.turns == [Turn("Tell me a story.", whole.text)]


def test_commands(ft_chat):
    assert all(command in ft_chat.handle("/help") for command in ("/help", "/reset", "/exit"))
    assert ft_chat.handle("/exit") is None and ft_chat.handle(" /exit ") is None
    assert ft_chat.handle("/nope") == "unknown command /nope; /help lists the commands"
    assert ft_chat.handle("   ") == ""
    assert isinstance(ft_chat.handle("/usr/bin is a directory"), Reply)  # a message, not a command
    ft_chat.conversation.add("a", "b")
    assert ft_chat.handle("/reset") == "forgot the conversation" and ft_chat.conversation.turns == []


# --- gptctl chat on a real finetuned run --------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [["--temperature", "0"], ["--temperature", "0.9", "--seed", "7"]])
def test_replies_are_samples_of_the_conversation_and_reset_starts_over(runner, finetuned, sampling):
    home, run = finetuned
    first, second = "What is the uppercase form of apple?", "And of river?"
    args = ["--device", "cpu", "--max-new-tokens", "24", *sampling]
    result = chat(runner, home, run, *args, input=f"{first}\n{second}\n/reset\n{first}\n/exit\nnot read\n")
    assert result.exit_code == 0, result.output

    reply = sampled(runner, home, run, "--instruction", first, *args)  # a first reply is sample's for the instruction
    follow_up = sampled(runner, home, run, "--prompt", format_conversation([Turn(first, reply), Turn(second)]),
                        "--stop", NEXT_TURN, *args)
    assert reply and follow_up and reply != follow_up
    assert result.stdout == f"{reply}\n{follow_up}\n{reply}\n"
    lines = result.stderr.splitlines()
    assert lines[0].startswith("chatting with ") and all(what in lines[0] for what in ("chatty-", "step 2", "on cpu"))
    assert "each message is an instruction" in lines[1] and "/help, /reset, /exit" in lines[1]
    assert lines[2:] == ["forgot the conversation"]


def test_old_exchanges_are_dropped_and_a_message_too_long_is_refused_in_one_line(runner, finetuned):
    home, run = finetuned
    long = "stone " * 150
    result = chat(runner, home, run, *CPU_GREEDY, "--max-new-tokens", "64", "--system", "Be brief.",
                  input=f"one\ntwo\n{long}\nthree\n")  # the end of the input leaves, as Ctrl-D does
    assert result.exit_code == 0, result.output
    assert result.stderr.splitlines()[2:] == [
        "dropped the oldest exchange to fit the 128-token context",
        f"that message does not fit: it takes {len(ENCODE(format_conversation([Turn(long)], 'Be brief.')))} tokens in "
        "the template, and the 128-token context holds 64 beside the reply's 64; shorten it, or lower --max-new-tokens",
        "dropped the oldest exchange to fit the 128-token context",
    ]
    assert result.stdout.count("\n") >= 3  # three replies, the chat went on after the refusal


def test_a_pretrained_run_continues_each_message_and_keeps_no_conversation(runner, trained_run):
    home, run_id = trained_run
    result = chat(runner, home, run_id, *CPU_GREEDY, "--max-new-tokens", "12", input="ROMEO:\nJULIET:\n")
    assert result.exit_code == 0, result.output
    args = [*CPU_GREEDY, "--max-new-tokens", "12"]
    assert result.stdout == f"{sampled(runner, home, run_id, '--prompt', 'ROMEO:', *args)}\n" \
                           f"{sampled(runner, home, run_id, '--prompt', 'JULIET:', *args)}\n"
    assert "each message is a text to continue" in result.stderr.splitlines()[1]

    refused = chat(runner, home, run_id, "--system", "Be brief.", input="")
    assert refused.exit_code == 2 and refused.stdout == "" and refused.stderr.count("\n") == 1
    assert refused.stderr.startswith("Error: --system: only for a finetuned model")


@pytest.mark.parametrize("args, message", [  # the numbers: test_bad_input.py's test_sample_and_chat_numbers
    (["--stop", ""], "--stop: must not be empty"),
    (["--device", "tpu"], "--device: unknown device 'tpu'"),
    (["--system", "word " * 200], "--system: the template takes"),
])
def test_bad_options_exit_2_in_one_line(runner, tmp_path, args, message):
    path = save_tiny_checkpoint(tmp_path / "ft.pt", kind="finetune", block=BLOCK)
    result = chat(runner, tmp_path, str(path), *args, input="hello\n")
    assert result.exit_code == 2 and result.stdout == "", result.output
    assert result.stderr.startswith(f"Error: {message}") and result.stderr.count("\n") == 1, result.stderr


@pytest.mark.parametrize("ref", ["nosuchrun", "nosuchrun:4", "no/such/file.pt"])
def test_an_unknown_run_exits_2_in_one_line(runner, gptctl_home, ref):
    result = chat(runner, gptctl_home, ref, input="hello\n")
    assert result.exit_code == 2 and result.stderr.count("\n") == 1
    assert "RUN[:STEP]|PATH" in result.stderr and "is neither an existing file nor a run" in result.stderr


# --- real processes, real SIGINT ---------------------------------------------------------------------------------


def start_chat(home: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gptctl", "chat", *args],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env={**os.environ, "GPTCTL_HOME": str(home)})


def read_until(stream, done, timeout: float = 120) -> bytes:
    """Read what the process writes to `stream` until done(what was read) or the timeout."""
    read, deadline = b"", time.time() + timeout
    while not done(read):
        assert time.time() < deadline, read
        if select.select([stream], [], [], max(deadline - time.time(), 0))[0]:
            chunk = os.read(stream.fileno(), 65536)
            assert chunk, f"end of output before it was done: {read!r}"
            read += chunk
    return read


@pytest.mark.slow
def test_ctrl_c_stops_a_reply_and_the_chat_goes_on(runner, finetuned):
    home, run = finetuned
    message = "Tell me a long story."
    proc = start_chat(home, run, *CPU_GREEDY, "--max-new-tokens", "100000")  # minutes of text, if not stopped
    try:
        proc.stdin.write(f"{message}\n".encode())
        proc.stdin.flush()
        streamed = read_until(proc.stdout, bool)  # the reply has begun
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(b"/exit\n", timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = err.decode()
    assert proc.returncode == 0 and "(reply stopped)" in err and "Traceback" not in err, err
    stopped = (streamed + rest).decode()
    assert stopped.endswith("\n")
    start = sampled(runner, home, run, "--instruction", message, *CPU_GREEDY, "--max-new-tokens", "20")
    assert stopped[:-1].startswith(start) or start.startswith(stopped[:-1])  # the same reply, cut short


@pytest.mark.slow
def test_ctrl_c_at_the_prompt_leaves_cleanly(finetuned):
    home, run = finetuned
    proc = start_chat(home, run, *CPU_GREEDY)
    try:
        shown = read_until(proc.stderr, lambda read: b"Ctrl-C stops a reply" in read)  # loaded, at the prompt
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = (shown + err).decode()
    assert proc.returncode == 130 and out == b"\n", (out, err)
    assert "Traceback" not in err and "Aborted" not in err and err.count("\n") == 2, err
