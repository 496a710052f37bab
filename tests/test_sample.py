"""`gptctl sample`: greedy equals argmax, seeding, the instruction template, EOT, validation, safe loading."""

import json
import os
from pathlib import Path

import pytest
import torch

from helpers import cli, save_tiny_checkpoint
from gptctl.cli import app
from gptctl.data.tokenizer import EOT_TOKEN, get_encoding
from gptctl.engine.model import GPT
from gptctl.engine.generate import Generation, Sampling, TextStream
from gptctl.engine.sample import Sampler
from gptctl.presets import GPT2_VOCAB_SIZE
from gptctl.prompt import format_prompt

BLOCK = 16  # small, so a prompt plus 20 new tokens must slide the context


def save_tiny(path: Path, kind: str = "pretrain", edit=None) -> Path:
    return save_tiny_checkpoint(path, kind, edit, step=7, block=BLOCK)


@pytest.fixture
def ckpt(tmp_path) -> Path:
    return save_tiny(tmp_path / "model_00007.pt")


def sample(runner, *args: str) -> list[dict]:
    result = runner.invoke(app, ["sample", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def argmax_loop(model: GPT, tokens: list[int], n: int) -> list[int]:
    tokens = list(tokens)
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(torch.tensor([tokens[-BLOCK:]]))
            tokens.append(int(logits[0, -1, :GPT2_VOCAB_SIZE].argmax()))
    return tokens


def test_greedy_is_argmax_with_a_sliding_context(runner, ckpt):
    enc = get_encoding()
    prompt = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
    prompt_tokens = enc.encode_ordinary(prompt)
    model = Sampler(ckpt, "cpu").model
    expected = argmax_loop(model, prompt_tokens, 20)[len(prompt_tokens):]
    assert EOT_TOKEN not in expected and len(prompt_tokens) > BLOCK  # the prompt itself is cropped too

    streamed = runner.invoke(app, ["sample", str(ckpt), "--prompt", prompt, "--max-new-tokens", "20", "--temperature", "0"])
    assert streamed.exit_code == 0, streamed.output
    assert streamed.stdout == enc.decode(expected) + "\n"
    assert f"note: the prompt has {len(prompt_tokens)} tokens; the model sees only the last {BLOCK}" in streamed.stderr
    assert sample(runner, str(ckpt), "--prompt", prompt, "--max-new-tokens", "20", "--temperature", "0") == [
        {"sample": 0, "text": enc.decode(expected), "tokens": 20}]


def test_same_seed_same_text_other_seed_other_text(runner, ckpt):
    args = [str(ckpt), "--prompt", "Hello", "--max-new-tokens", "12", "--temperature", "1.0", "--num-samples", "2"]
    first = sample(runner, *args, "--seed", "1")
    assert first == sample(runner, *args, "--seed", "1")
    assert [s["text"] for s in first] != [s["text"] for s in sample(runner, *args, "--seed", "2")]
    assert first[0]["text"] != first[1]["text"]  # samples of one run differ from each other too
    assert [s["sample"] for s in first] == [0, 1] and all(s["tokens"] == 12 for s in first)


def test_top_k_1_is_greedy(runner, ckpt):
    args = [str(ckpt), "--prompt", "Hello", "--max-new-tokens", "8"]
    assert sample(runner, *args, "--top-k", "1", "--temperature", "1.5", "--seed", "5") == sample(runner, *args, "--temperature", "0")


def test_instruction_is_wrapped_in_the_finetune_template(runner, tmp_path):
    path = save_tiny(tmp_path / "ft.pt", kind="finetune")
    sampler = Sampler(path, "cpu")
    wrapped = format_prompt("Name a colour.", "Think of the sky.")
    assert sampler.encode(instruction="Name a colour.", context="Think of the sky.") == get_encoding().encode_ordinary(wrapped)
    assert "### Input:\nThink of the sky." in wrapped
    # The CLI feeds the model exactly those tokens: the same seed gives what the template typed as a prompt gives.
    seeded = ["--max-new-tokens", "8", "--temperature", "1.0", "--seed", "3"]
    via_instruction = sample(runner, str(path), "--instruction", "Name a colour.", "--context", "Think of the sky.", *seeded)
    assert via_instruction == sample(runner, str(path), "--prompt", wrapped, *seeded)
    assert via_instruction != sample(runner, str(path), "--instruction", "Name a colour.", *seeded)
    assert via_instruction != sample(runner, str(path), "--prompt", "Name a colour.", *seeded)


def make_eot_at(position: int):
    """Edit a model so that at `position` the residual stream points at the EOT embedding: argmax is EOT there."""
    def edit(model: GPT) -> None:
        with torch.no_grad():
            model.transformer.wpe.weight[position] = 1000 * model.lm_head.weight[EOT_TOKEN]
    return edit


def test_generation_stops_at_end_of_text(runner, tmp_path):
    enc = get_encoding()
    prompt_tokens = enc.encode_ordinary("Once upon a time")
    eot_position = len(prompt_tokens) + 3  # the logits there choose the 5th new token
    path = save_tiny(tmp_path / "eot.pt", edit=make_eot_at(eot_position))
    model = Sampler(path, "cpu").model

    (tokens,) = Generation(model, enc, prompt_tokens, 10, Sampling(temperature=0)).run()
    assert len(tokens) == 4 and tokens == argmax_loop(model, prompt_tokens, 4)[len(prompt_tokens):]
    assert argmax_loop(model, prompt_tokens, 5)[-1] == EOT_TOKEN  # the model really chose EOT next
    assert sample(runner, str(path), "--prompt", "Once upon a time", "--max-new-tokens", "10", "--temperature", "0") == [
        {"sample": 0, "text": enc.decode(tokens), "tokens": 4}]


def test_padding_rows_of_the_vocabulary_are_never_chosen(runner, tmp_path):
    padding = GPT2_VOCAB_SIZE + 43  # a row of the padded embedding that no tokenizer token has

    def edit(model: GPT) -> None:
        with torch.no_grad():  # every position points at the padding row, so its logit dominates everywhere
            model.lm_head.weight[padding] *= 10
            model.transformer.wpe.weight += 1000 * model.lm_head.weight[padding]

    path = save_tiny(tmp_path / "pad.pt", edit=edit)
    model = Sampler(path, "cpu").model
    prompt_tokens = get_encoding().encode_ordinary("Hello")
    assert int(model(torch.tensor([prompt_tokens]))[0][0, -1].argmax()) == padding  # unmasked it would win
    for temperature in (0, 1.0):
        (tokens,) = Generation(model, get_encoding(), prompt_tokens, 5, Sampling(temperature, top_k=200),
                               generator=torch.Generator().manual_seed(0)).run()
        assert len(tokens) == 5 and max(tokens) < GPT2_VOCAB_SIZE
    assert sample(runner, str(path), "--prompt", "Hello", "--max-new-tokens", "5")[0]["tokens"] == 5


def test_an_empty_prompt_starts_a_new_document(runner, ckpt):
    (empty,) = sample(runner, str(ckpt), "--prompt", "", "--max-new-tokens", "5", "--seed", "9")
    assert empty["tokens"] == 5
    assert [empty] == sample(runner, str(ckpt), "--prompt", "<|endoftext|>", "--max-new-tokens", "5", "--seed", "9")


def test_streamed_text_never_splits_a_character():
    enc = get_encoding()
    text = "naïve café 😀 €"
    stream = TextStream(enc)
    pieces = [p for p in [*map(stream.push, enc.encode_ordinary(text)), stream.close()] if p]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)
    assert len(pieces) > 3  # it does stream


@pytest.mark.parametrize("args, message", [
    ([], "--prompt: missing"),
    (["--prompt", "a", "--instruction", "b"], "--prompt and --instruction exclude each other"),
    (["--prompt", "a", "--context", "b"], "--context: only goes with --instruction"),
    (["--prompt", "a", "--max-new-tokens", "0"], "--max-new-tokens: must be at least 1"),
    (["--prompt", "a", "--temperature", "-0.1"], "--temperature: must be 0 (greedy) or more"),
    (["--prompt", "a", "--top-k", "0"], "--top-k: must be at least 1"),
    (["--prompt", "a", "--num-samples", "0"], "--num-samples: must be at least 1"),
    (["--prompt", "a", "--device", "tpu"], "--device: unknown device 'tpu'"),
])
def test_bad_options_exit_2_in_one_line(runner, ckpt, args, message):
    result = runner.invoke(app, ["sample", str(ckpt), *args])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.startswith(f"Error: {message}") and result.stderr.count("\n") == 1


@pytest.mark.parametrize("ref", ["no/such/file.pt", "nosuchrun", "nosuchrun:4"])
def test_missing_file_or_unknown_run_exits_2(runner, ref):
    result = runner.invoke(app, ["sample", ref, "--prompt", "a"])
    assert result.exit_code == 2 and "is neither an existing file nor a run" in result.stderr


def test_a_file_that_is_no_gptctl_checkpoint_exits_2(runner, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save({"wte": torch.zeros(2)}, path)
    result = runner.invoke(app, ["sample", str(path), "--prompt", "a"])
    assert result.exit_code == 2 and "is not a gptctl checkpoint" in result.stderr


class Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_pickle_is_refused_and_never_runs(runner, tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "model_00001.pt"
    torch.save({"model": Payload(marker), "settings": {}, "step": 1}, path)

    result = runner.invoke(app, ["sample", str(path), "--prompt", "a"])
    assert result.exit_code == 2 and "is not a plain-data checkpoint and was not loaded" in result.stderr
    assert result.stderr.count("\n") == 1 and not marker.exists()
    torch.load(path, weights_only=False)  # what an unsafe load would have done: the payload is live
    assert marker.exists()


@pytest.mark.slow
def test_sample_a_real_run_and_an_earlier_step(trained_run):
    home, run_id = trained_run
    newest = cli("sample", run_id, "--prompt", "ROMEO:", "--max-new-tokens", "40", home=home)
    assert newest.stdout.strip() and "step 8" in newest.stderr
    earlier = cli("sample", f"{run_id}:4", "--prompt", "ROMEO:", "--max-new-tokens", "20", "--json", home=home)
    (only,) = json.loads(earlier.stdout)
    assert "step 4" in earlier.stderr and 0 < only["tokens"] <= 20 and only["text"]
    missing = cli("sample", f"{run_id}:5", "--prompt", "ROMEO:", home=home, check=False)
    assert missing.returncode == 2 and "has no checkpoint at step 5" in missing.stderr
