"""Instruction finetuning: Dolly data, the masked loss, and `gptctl finetune` end to end."""

import json
import random
from pathlib import Path
import sqlite3

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_RUN, add_run, cli, losses
from gptctl.cli import app
from gptctl.data import dolly
from gptctl.data.tokenizer import EOT_TOKEN, get_encoding
from gptctl.checkpoints.files import save_atomic
from gptctl.engine.model import GPT, GPTConfig
from gptctl.engine.model import IGNORE_INDEX as IGNORE
from gptctl.engine.sft import InstructionBatchLoader
from gptctl.prompt import format_prompt
from gptctl.settings import TrainSettings

WORDS = "apple river stone cloud music garden silver winter candle forest".split()


def write_dolly(path, n=200, seed=0):
    """A small file in databricks-dolly-15k's schema with patterns a tiny model can learn."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            word, times = rng.choice(WORDS), rng.randint(2, 4)
            if i % 2:
                rec = {"instruction": f"Repeat the word in the input {times} times.", "context": word,
                       "response": " ".join([word] * times), "category": "open_qa"}
            else:
                rec = {"instruction": f"What is the uppercase form of {word}?", "context": "",
                       "response": word.upper(), "category": "closed_qa"}
            f.write(json.dumps(rec) + "\n")
    return path


def tiny_checkpoint(path, seq_len=64):
    settings = TrainSettings(model="tiny", seq_len=seq_len, batch_size=4, total_batch_size=4 * seq_len, warmup_steps=1)
    torch.manual_seed(0)
    model = GPT(settings.shape)
    save_atomic({"model": model.state_dict(), "settings": settings.model_dump(mode="json"), "step": 1}, path)
    return path


# --- data and masking -------------------------------------------------------------------------


def test_encode_example_masks_prompt_and_truncates_from_the_prompt_side():
    enc = get_encoding()
    tokens, prompt_len = dolly.encode_example(enc, "Say hi", "to Bob", "Hi Bob", seq_len=1024)
    assert enc.decode(tokens[:prompt_len]) == format_prompt("Say hi", "to Bob")
    assert tokens[prompt_len:] == enc.encode_ordinary("Hi Bob") + [EOT_TOKEN]

    short = dolly.encode_example(enc, "Say hi " * 50, "", "Hi Bob", seq_len=40)
    assert len(short[0]) == 41 and short[0][short[1]:] == tokens[prompt_len:]  # the response survives whole
    assert short[0][: short[1]] == enc.encode_ordinary(format_prompt("Say hi " * 50))[-short[1]:]
    assert dolly.encode_example(enc, "Q", "", "word " * 100, seq_len=40) is None  # the response cannot fit: skipped


def test_build_splits_deterministically_and_skips_what_cannot_fit(tmp_path):
    path = write_dolly(tmp_path / "d.jsonl", n=100)
    with open(path, "a") as f:
        f.write(json.dumps({"instruction": "Long", "context": "", "response": "word " * 500, "category": "x"}) + "\n")
    a = dolly.build(path, seq_len=64, val_fraction=0.1, seed=3)
    b = dolly.build(path, seq_len=64, val_fraction=0.1, seed=3)
    assert (len(a.train), len(a.val), a.skipped) == (90, 10, 1)
    assert np.array_equal(a.val.tokens, b.val.tokens) and np.array_equal(a.train.offsets, b.train.offsets)
    c = dolly.build(path, seq_len=64, val_fraction=0.1, seed=4)
    assert not np.array_equal(a.val.tokens, c.val.tokens)  # the split depends on the seed

    dolly.save(a, tmp_path)
    loaded = dolly.load(tmp_path)
    assert np.array_equal(loaded.train.tokens, a.train.tokens) and loaded.skipped == 1


def _split(examples):
    enc = get_encoding()
    encoded = [dolly.encode_example(enc, i, c, r, seq_len=128) for i, c, r in examples]
    return dolly._pack(encoded), encoded


def test_masked_loss_equals_hand_computed_response_only_loss():
    """Two ranks × two micro-steps with different response lengths: the scaled micro-batch losses add up
    to the mean over every response token of the step, computed by hand from the logits."""
    examples = [(f"Instruction {i}", "ctx" if i % 2 else "", "response " * (1 + 3 * i)) for i in range(8)]
    split, encoded = _split(examples)
    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=128, n_layer=2, n_head=2, n_embd=32))
    cpu = torch.device("cpu")
    world, accumulation, batch = 2, 2, 2
    loaders = [InstructionBatchLoader(split, batch, 128, accumulation, rank, world, cpu, seed=0, shuffle=False)
               for rank in range(world)]

    scaled = 0.0
    for loader in loaders:
        for micro in range(accumulation):
            x, y = loader.batch(1, micro)
            assert x.shape[1] % 64 == 0  # padded to the batch's longest, rounded up
            _, loss = model(x, y)
            scaled += loss.item() * loader.scale(1, micro)
    step_loss = scaled / world  # what the loop reports: all-reduced sum / world size

    nll, count = 0.0, 0
    for tokens, prompt_len in encoded:  # shuffle=False: step 1 takes examples 0..7 in order
        t = torch.tensor(tokens)
        logits, _ = model(t[None, :-1])
        logp = F.log_softmax(logits[0].float(), dim=-1)
        for pos in range(prompt_len - 1, len(tokens) - 1):  # predicting response tokens and the EOT
            nll -= logp[pos, tokens[pos + 1]].item()
            count += 1
    assert count == sum(len(t) - p for t, p in encoded)
    assert step_loss == pytest.approx(nll / count, rel=1e-5)


def test_padding_and_prompt_never_count():
    split, encoded = _split([("Say a long thing", "", "one two three four five six"), ("Q", "", "A")])
    loader = InstructionBatchLoader(split, 2, 128, 1, 0, 1, torch.device("cpu"), seed=0, shuffle=False)
    x, y = loader.batch(1, 0)
    for b, (tokens, prompt_len) in enumerate(encoded):
        targets = y[b][y[b] != IGNORE].tolist()
        assert targets == tokens[prompt_len:]  # exactly the response and its EOT
        assert x[b, : len(tokens) - 1].tolist() == tokens[:-1]


def test_batches_are_a_function_of_step_and_cover_each_epoch():
    split, _ = _split([(f"I{i}", "", f"R{i}") for i in range(6)])
    cpu = torch.device("cpu")
    one = InstructionBatchLoader(split, 2, 64, 3, 0, 1, cpu, seed=1)
    seen = [tuple(one._examples(1, m, 0)) for m in range(3)]
    assert sorted(i for s in seen for i in s) == list(range(6))  # one step of 6 rows = one epoch
    two = InstructionBatchLoader(split, 1, 64, 3, 1, 2, cpu, seed=1)  # same rows, split over 2 ranks
    assert sorted(i for m in range(3) for i in two._examples(1, m, 1) + two._examples(1, m, 0)) == list(range(6))
    epoch = lambda loader, step: [i for m in range(3) for i in loader._examples(step, m, 0)]  # noqa: E731
    first, second = epoch(one, 1), epoch(one, 2)
    assert sorted(second) == list(range(6)) and second != first  # the next epoch: every row again, reshuffled
    fresh = InstructionBatchLoader(split, 2, 64, 3, 0, 1, cpu, seed=1)
    assert epoch(fresh, 2) == second and epoch(fresh, 1) == first  # asked in another order: the same rows


def test_checkpoint_references(tmp_path, gptctl_home):
    from gptctl.errors import UserError
    from gptctl.refs import resolve_checkpoint
    from gptctl.digest import sha256_of
    from gptctl.registry import open_registry, queries

    db = open_registry(gptctl_home)
    run_dir = gptctl_home / "base-abc"
    (run_dir / "checkpoints").mkdir(parents=True)
    add_run(db, "abc", name="base", run_dir=str(run_dir))
    paths = {}
    for step in (3, 6, 9):
        paths[step] = run_dir / "checkpoints" / f"model_{step:05d}.pt"
        paths[step].write_bytes(b"x" * step)
        queries.register_checkpoint(db, "abc", step, paths[step], step, sha256_of(paths[step]), pinned=False)
    paths[9].unlink()  # vanished: never offered
    assert resolve_checkpoint("base", "--opt", gptctl_home) == paths[6]  # RUN: its newest valid checkpoint
    assert resolve_checkpoint("abc:3", "--opt", gptctl_home) == paths[3]
    assert resolve_checkpoint(str(paths[3]), "--opt", gptctl_home) == paths[3].resolve()
    for bad in ("abc:4", "abc:9", "abc:x", "nosuch"):
        with pytest.raises(UserError, match="--opt"):
            resolve_checkpoint(bad, "--opt", gptctl_home)


# --- CLI validation -------------------------------------------------------------------------------


def finetune_args(parent, data, *extra):
    return ["finetune", "--pretrained-checkpoint", str(parent), "--dataset-path", str(data), "--max-steps", "4",
            "--warmup-steps", "1", *extra]


@pytest.mark.parametrize(
    "case, option",
    [
        ("no-parent", "--pretrained-checkpoint"),
        ("missing-data", "--dataset-path"),
        ("seq-too-long", "--seq-len"),
        ("bad-schema", "--dataset-path"),
        ("pickle", "--pretrained-checkpoint"),
        ("unknown-run", "--pretrained-checkpoint"),
    ],
)
def test_finetune_bad_input_exits_2_and_writes_nothing(runner, tmp_path, gptctl_home, case, option):
    parent = tiny_checkpoint(tmp_path / "parent.pt")
    data = write_dolly(tmp_path / "d.jsonl", n=20)
    args = finetune_args(parent, data)
    if case == "no-parent":
        args = ["finetune", "--dataset-path", str(data)]
    elif case == "missing-data":
        args = finetune_args(parent, tmp_path / "nope.jsonl")
    elif case == "seq-too-long":
        args += ["--seq-len", "128"]
    elif case == "bad-schema":
        (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
        args = finetune_args(parent, tmp_path / "bad.jsonl")
    elif case == "pickle":
        marker = tmp_path / "pwned"

        class Evil:
            def __reduce__(self):
                return (open, (str(marker), "w"))

        torch.save({"model": Evil()}, tmp_path / "evil.pt")
        args = finetune_args(tmp_path / "evil.pt", data)
    elif case == "unknown-run":
        args = finetune_args("nosuchrun:4", data)
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert option in result.output and "Traceback" not in result.output, result.output
    assert not gptctl_home.exists()
    assert not (tmp_path / "pwned").exists()


def test_pretrain_only_options_are_not_finetune_options(runner, tmp_path):
    result = runner.invoke(app, finetune_args(tmp_path / "p.pt", tmp_path / "d.jsonl", "--data-root", "x"))
    assert result.exit_code == 2 and "--data-root" in result.output
    assert "--dataset-path" not in runner.invoke(app, ["pretrain", "--help"]).output


# --- end to end -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, shakespeare):
    """A tiny pretrained run in its own home; finetunes in this module start from it by name."""
    home = tmp_path_factory.mktemp("ft") / "home"
    cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--seq-len", "64", "--total-batch-size", "256",
        "--max-steps", "6", "--checkpoint-interval", "3", "--run-name", "base", home=home)
    return home


@pytest.mark.slow
def test_finetune_end_to_end_val_loss_falls_resumes_exactly_and_protects_its_parent(pretrained, tmp_path):
    home = pretrained
    data = write_dolly(tmp_path / "dolly.jsonl", n=240)
    common = ["--dataset-path", str(data), "--warmup-steps", "2", "--max-lr", "2e-3", "--max-steps", "12",
              "--eval-interval", "4", "--eval-steps", "2", "--checkpoint-interval", "6", "--keep-last-n-checkpoints", "5",
              "--json"]
    full = json.loads(cli("finetune", "--pretrained-checkpoint", "base:3", "--run-name", "ft-full", *common,
                          home=home).stdout)
    assert full["status"] == "completed" and full["last_step"] == 12
    metrics = losses(home, full["run_id"])
    vals = [metrics[s][1] for s in (4, 8, 12)]
    assert vals[2] < vals[0], vals  # it learns the instruction format

    with sqlite3.connect(home / "gptctl.db") as conn:
        kind, parent, settings = conn.execute("select kind, parent_checkpoint, settings from runs where id = ?",
                                              [full["run_id"]]).fetchone()
        base_step3 = conn.execute("select path from checkpoints c join runs r on r.id = c.run_id where r.name = 'base' "
                                  "and step = 3").fetchone()[0]
    assert kind == "finetune" and parent == base_step3
    assert json.loads(settings)["seq_len"] == 64  # the parent's context by default

    # Restarting the same finetune from its step-6 checkpoint reproduces steps 7..12 bit for bit.
    step6 = Path(full["checkpoints"][0])
    assert step6.name == "model_00006.pt"
    again = json.loads(cli("finetune", "--pretrained-checkpoint", "base", "--run-name", "ft-again", *common,
                           "--resume", "--checkpoint-path", str(step6), home=home).stdout)
    resumed = losses(home, again["run_id"])
    assert sorted(resumed) == list(range(7, 13))
    assert all(resumed[s] == metrics[s] for s in range(7, 13)), (resumed, metrics)

    # A finetune's parent is never pruned: --keep-last 1 would otherwise delete step 3 of the base run.
    cli("ckpt", "prune", "--run", "base", "--keep-last", "1", "--yes", home=home)
    assert (home / base_step3).exists()  # stored relative to the home
