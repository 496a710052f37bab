"""Hugging Face interop: `gptctl export` loads in transformers with the same logits and tokens; HF GPT-2 imports."""

import json
import math
from pathlib import Path

import pytest
import torch

from helpers import SHAKESPEARE, TINY_RUN, add_run, cli
from gptctl.cli import app
from gptctl.preflight import parent_model
from gptctl.data.tokenizer import get_encoding
from gptctl.checkpoints.files import save_atomic
from gptctl.engine.hf import load_hf, write_checkpoint
from gptctl.engine.model import GPT, GPTConfig
from gptctl.engine.sample import Sampler
from gptctl.errors import UserError
from gptctl.presets import GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE
from gptctl.settings import TrainSettings

transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

SENTENCE = "First Citizen: Before we proceed any further, hear me speak. — Ünïcödé too 🤖"


def tokens() -> torch.Tensor:
    return torch.tensor([get_encoding().encode_ordinary(SENTENCE)])


def randomize(model: torch.nn.Module) -> None:
    """Every parameter random, biases and LayerNorms included, so a wrongly mapped tensor changes the logits."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    settings = TrainSettings(model="tiny", seq_len=32)
    model = GPT(settings.shape)
    randomize(model)
    path = tmp_path / "ckpt" / "model_00005.pt"
    path.parent.mkdir()
    save_atomic({"model": model.state_dict(), "settings": settings.model_dump(mode="json"), "step": 5}, path)
    return path


@pytest.fixture
def hf_dir(tmp_path) -> Path:
    """A random HF GPT-2 whose logits are all strongly negative, as a trained GPT-2's are."""
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_head=2, n_embd=64, n_positions=64))
    randomize(model)
    with torch.no_grad():
        direction = torch.full((64,), 64 ** -0.5)
        model.transformer.wte.weight += 10 * direction  # every logit gets ln_f.bias · (10 · direction) = -100
        model.transformer.ln_f.bias.copy_(-10 * direction)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


def export(runner, *args: str):
    return runner.invoke(app, ["export", *args])


def gptctl_logits(model: GPT, idx: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(idx)[0]


def hf_logits(directory: Path, idx: torch.Tensor) -> torch.Tensor:
    model = transformers.GPT2LMHeadModel.from_pretrained(directory).eval()
    with torch.no_grad():
        return model(idx).logits


def test_hf_export_loads_in_transformers_with_the_same_logits_and_tokens(runner, checkpoint, tmp_path):
    out = tmp_path / "exported"
    result = export(runner, str(checkpoint), "-o", str(out))
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(out.resolve())
    config = json.loads((out / "config.json").read_text())
    assert config["n_positions"] == 32 and config["vocab_size"] == GPT2_VOCAB_SIZE
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary directory left

    ours = gptctl_logits(Sampler(checkpoint, "cpu").model, tokens())
    theirs = hf_logits(out, tokens())
    assert theirs.shape[-1] == GPT2_VOCAB_SIZE
    torch.testing.assert_close(theirs, ours[..., :GPT2_VOCAB_SIZE], atol=1e-5, rtol=0)

    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    text = SHAKESPEARE.read_text()[:20000] + SENTENCE + "<|endoftext|>" + "  spaces\n\n\tand tabs"
    assert tokenizer(text)["input_ids"] == get_encoding().encode(text, allowed_special={"<|endoftext|>"})
    assert tokenizer.eos_token_id == 50256


def test_an_hf_gpt2_imports_with_the_same_logits_and_padding_takes_no_probability(hf_dir, tmp_path):
    state, settings = load_hf(str(hf_dir), "--pretrained-checkpoint")
    assert settings == {"model": "tiny", "arch": "gpt2", "n_layer": 2, "n_head": 2, "n_embd": 64, "block_size": 64}
    model = GPT(GPTConfig(block_size=64, n_layer=2, n_head=2, n_embd=64))
    model.load_state_dict(state)  # strict: every name and shape matches
    ours = gptctl_logits(model, tokens())
    theirs = hf_logits(hf_dir, tokens())
    # rtol: float32 steps near logits of -100 are 8e-6, so a few ulps of summation order exceed atol alone
    torch.testing.assert_close(ours[..., :GPT2_VOCAB_SIZE], theirs, atol=1e-5, rtol=1e-6)
    assert theirs.max() < -50  # zero-filled padding rows (logit 0) would take almost all the probability
    extra = torch.logsumexp(ours, -1) - torch.logsumexp(ours[..., :GPT2_VOCAB_SIZE], -1)
    assert extra.max() <= math.log1p((PADDED_VOCAB_SIZE - GPT2_VOCAB_SIZE) / GPT2_VOCAB_SIZE) + 1e-6

    # The other layout of HF files: pytorch_model.bin, no "transformer." prefix, old attention-mask buffers.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "config.json").write_text((hf_dir / "config.json").read_text())
    weights = safetensors_torch.load_file(hf_dir / "model.safetensors")
    weights = {name.removeprefix("transformer."): t for name, t in weights.items()}
    weights["h.0.attn.bias"] = torch.ones(1, 1, 64, 64)
    torch.save(weights, legacy / "pytorch_model.bin")
    legacy_state, _ = load_hf(str(legacy), "--init-from")
    assert legacy_state.keys() == state.keys()
    assert all(torch.equal(legacy_state[k], state[k]) for k in state)


def test_export_then_import_is_the_identity(runner, checkpoint, tmp_path):
    assert export(runner, str(checkpoint), "-o", str(tmp_path / "out")).exit_code == 0
    original = Sampler(checkpoint, "cpu").model.state_dict()
    state, _ = load_hf(str(tmp_path / "out"), "--init-from")
    assert state.keys() == original.keys()
    for name, tensor in original.items():
        if name not in ("transformer.wte.weight", "lm_head.weight"):
            assert torch.equal(state[name], tensor), name
    wte = state["transformer.wte.weight"]
    assert torch.equal(wte[:GPT2_VOCAB_SIZE], original["transformer.wte.weight"][:GPT2_VOCAB_SIZE])
    assert state["lm_head.weight"] is wte  # tied, as in gptctl's own checkpoints

    converted = tmp_path / "converted.pt"
    model_settings = write_checkpoint(str(tmp_path / "out"), converted, "--init-from")
    assert model_settings == parent_model(converted, "--init-from")  # what finetune and --init-from read back
    sampler = Sampler(converted, "cpu")
    assert sampler.step == 0 and sampler.model.config.block_size == 32
    torch.testing.assert_close(gptctl_logits(sampler.model, tokens())[..., :GPT2_VOCAB_SIZE],
                               gptctl_logits(Sampler(checkpoint, "cpu").model, tokens())[..., :GPT2_VOCAB_SIZE],
                               atol=1e-5, rtol=0)


def test_safetensors_export_is_gptctls_own_state_dict(runner, checkpoint, tmp_path):
    out = tmp_path / "st"
    result = export(runner, str(checkpoint), "--format", "safetensors", "-o", str(out))
    assert result.exit_code == 0, result.output
    described = json.loads((out / "gptctl.json").read_text())
    assert described["step"] == 5 and described["vocab_size"] == PADDED_VOCAB_SIZE
    fields = GPTConfig.__dataclass_fields__
    model = GPT(GPTConfig(**{k: v for k, v in described.items() if k in fields}))
    safetensors_torch.load_model(model, out / "model.safetensors")
    original = Sampler(checkpoint, "cpu").model.state_dict()
    assert all(torch.equal(model.state_dict()[k], t) for k, t in original.items())


def test_force_replaces_a_non_empty_directory(runner, checkpoint, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert export(runner, str(checkpoint), "-o", str(out), "--format", "safetensors", "--force").exit_code == 0
    assert sorted(p.name for p in out.iterdir()) == ["gptctl.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # the old one is gone, not aside


@pytest.mark.parametrize("case", ["missing", "non-empty", "format", "file", "inside"])
def test_bad_export_requests_exit_2_and_write_nothing(runner, case, checkpoint, tmp_path):
    out = tmp_path / "out"
    args, expected = [str(checkpoint), "-o", str(out)], None
    if case == "missing":
        args[0], expected = str(tmp_path / "nope.pt"), "RUN[:STEP]|PATH: "
    elif case == "non-empty":
        out.mkdir()
        (out / "keep.txt").write_text("mine")
        expected = "--output: " + str(out) + " is not empty"
    elif case == "format":
        args += ["--format", "onnx"]
        expected = "--format: unknown format 'onnx'; choose one of hf, safetensors"
    elif case == "file":
        out.write_text("a file")
        expected = "is a file"
    else:
        args[2:], expected = [str(checkpoint.parent), "--force"], "holds the checkpoint being exported"
    before = sorted(tmp_path.rglob("*"))
    result = export(runner, *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ") and expected in result.stderr and "Traceback" not in result.output
    assert sorted(tmp_path.rglob("*")) == before


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


def test_malicious_pickles_are_refused_and_run_nothing(runner, tmp_path, monkeypatch, hf_dir):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "settings": {}, "x": Evil()}, evil)
    result = export(runner, str(evil), "-o", str(tmp_path / "out"))
    assert result.exit_code == 2 and "not a plain-data checkpoint" in result.stderr
    assert not (tmp_path / "out").exists()

    (hf_dir / "model.safetensors").unlink()
    torch.save({"wte.weight": Evil()}, hf_dir / "pytorch_model.bin")
    with pytest.raises(UserError, match="--pretrained-checkpoint: .*not a plain-data checkpoint"):
        load_hf(str(hf_dir), "--pretrained-checkpoint")
    assert not (tmp_path / "pwned").exists()


def test_import_refuses_what_is_not_gptctls_gpt2(hf_dir, monkeypatch, tmp_path):
    config = json.loads((hf_dir / "config.json").read_text())
    (hf_dir / "config.json").write_text(json.dumps({**config, "activation_function": "relu"}))
    with pytest.raises(UserError, match=r"--init-from: .*activation_function='relu'; gptctl's GPT-2 needs 'gelu_new'"):
        load_hf(str(hf_dir), "--init-from")
    (hf_dir / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(UserError, match="does not hold the GPT-2 its config.json describes .*transformer.h.2"):
        load_hf(str(hf_dir), "--pretrained-checkpoint")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="'openai-community/gpt2' is neither a directory nor a model in the local"):
        load_hf("openai-community/gpt2", "--pretrained-checkpoint")


@pytest.mark.slow
def test_a_trained_run_exports_and_loads_in_transformers(trained_run, tmp_path):
    home, run_id = trained_run
    out = tmp_path / "hf"
    proc = cli("export", run_id, "-o", str(out), home=home)
    assert proc.stdout.strip() == str(out)
    assert "step 8" in proc.stderr
    trained = Sampler(next(home.glob(f"*-{run_id}/checkpoints/model_00008.pt")), "cpu")
    torch.testing.assert_close(hf_logits(out, tokens()), gptctl_logits(trained.model, tokens())[..., :GPT2_VOCAB_SIZE],
                               atol=1e-5, rtol=0)


def test_init_from_takes_the_shape_from_the_weights(runner, hf_dir, shakespeare, gptctl_home):
    result = runner.invoke(app, ["pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--init-from", f"hf:{hf_dir}"])
    assert result.exit_code == 2 and "--model" in result.output  # TINY_RUN names a preset: refused, not ignored
    args = [a for a in TINY_RUN if a not in ("--model", "tiny")]
    result = runner.invoke(app, ["pretrain", *args, "--data-root", str(shakespeare), "--seq-len", "128",
                                 "--init-from", f"hf:{hf_dir}"])
    assert result.exit_code == 2 and "--seq-len" in result.output and "64" in result.output


@pytest.mark.slow
def test_finetune_and_pretrain_start_from_hugging_face_weights(hf_dir, shakespeare, gptctl_home, tmp_path):
    from test_finetune import write_dolly

    data = write_dolly(tmp_path / "dolly.jsonl", n=60)
    ft = json.loads(cli("finetune", "--pretrained-checkpoint", f"hf:{hf_dir}", "--dataset-path", str(data),
                        "--max-steps", "3", "--warmup-steps", "1", "--eval-steps", "1", "--json", home=gptctl_home).stdout)
    args = [a for a in TINY_RUN if a not in ("--model", "tiny", "--seq-len", "32")]
    pt = json.loads(cli("pretrain", *args, "--data-root", str(shakespeare), "--init-from", f"hf:{hf_dir}",
                        "--max-steps", "3", "--json",
                        home=gptctl_home).stdout)
    imported = (gptctl_home / "imports").resolve()
    for summary in (ft, pt):
        run = json.loads(cli("runs", "show", summary["run_id"], "--json", home=gptctl_home).stdout)
        assert run["status"] == "completed"
        assert Path(run["parent_checkpoint"]).parent == imported
        assert run["settings"]["n_embd"] == 64 and run["settings"]["seq_len"] == 64
    # Both runs started from the imported weights: after 3 small steps they are still within reach of them
    # (the HF weights have std 0.2; a fresh gptctl init would be ~0.3 away on average).
    hf_state, _ = load_hf(str(hf_dir), "--init-from")
    for summary in (ft, pt):
        trained = torch.load(summary["checkpoints"][-1], weights_only=True)["model"]
        for name in ("transformer.wpe.weight", "transformer.h.0.attn.c_attn.weight"):
            assert (trained[name] - hf_state[name]).abs().max() < 0.05, name


@pytest.mark.parametrize("target", ["home", "run dir", "inside run", "data root", "holds data", "holds a run"])
def test_force_never_removes_the_registry_a_run_or_data(runner, target, checkpoint, tmp_path, gptctl_home):
    """`export -o $GPTCTL_HOME --force` deleted the registry and every run."""
    from gptctl.registry import open_registry

    db = open_registry(gptctl_home)
    run_dir = gptctl_home / "r-0000aaaa"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    data_root = tmp_path / "data" / "shakespeare"
    data_root.mkdir(parents=True)
    (data_root / "shakespeare_train_000000.npy").write_bytes(b"0")
    add_run(db, "0000aaaa", run_dir=str(run_dir), settings=json.dumps({"data_root": str(data_root)}))
    out = {"home": gptctl_home, "run dir": run_dir, "inside run": run_dir / "notes",
           "data root": data_root, "holds data": data_root.parent, "holds a run": tmp_path / "elsewhere"}[target]
    if target == "inside run":
        (out / "mine.txt").parent.mkdir()
        (out / "mine.txt").write_text("notes")
    if target == "holds a run":  # a run directory the registry does not know, e.g. copied by hand
        (out / "copied-run" / "checkpoints").mkdir(parents=True)
        (out / "copied-run" / "checkpoints" / "model_00010.pt").write_bytes(b"x")
    before = sorted(tmp_path.rglob("*"))
    result = export(runner, str(checkpoint), "-o", str(out), "--format", "safetensors", "--force")
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: --output: ") and "--force never removes" in result.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_hf_imports_are_named_by_content_and_never_overwritten(hf_dir, tmp_path, gptctl_home):
    """hf:a/b and hf:a_b mapped to the same imports/a_b.pt; a later import rewrote a queued run's parent."""
    import shutil

    from gptctl.refs import resolve_checkpoint
    from gptctl.digest import sha256_of

    nested, flat = tmp_path / "a" / "b", tmp_path / "a_b"
    shutil.copytree(hf_dir, nested)
    other = transformers.GPT2LMHeadModel.from_pretrained(hf_dir)
    with torch.no_grad():
        other.lm_head.weight.mul_(2)  # tied: other weights, same shape
    other.save_pretrained(flat)

    first = resolve_checkpoint(f"hf:{nested}", "--init-from", gptctl_home)
    identity = (first.stat().st_ino, first.stat().st_mtime_ns, sha256_of(first))
    second = resolve_checkpoint(f"hf:{flat}", "--init-from", gptctl_home)
    assert first != second and first.parent == second.parent == (gptctl_home / "imports").resolve()
    assert resolve_checkpoint(f"hf:{nested}", "--init-from", gptctl_home) == first  # the same weights: the same file, reused
    assert (first.stat().st_ino, first.stat().st_mtime_ns, sha256_of(first)) == identity
    assert sorted(p.name for p in first.parent.iterdir()) == sorted([first.name, second.name])  # no staging left
    assert not torch.equal(torch.load(first, weights_only=True)["model"]["lm_head.weight"],
                           torch.load(second, weights_only=True)["model"]["lm_head.weight"])
