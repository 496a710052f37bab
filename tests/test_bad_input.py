"""Bad input found by the fault review: every refusal is one line naming the option, exit code 2, no
traceback, and nothing written (no registry, no run directory), before torchrun is ever started."""

import json
import os
import pickle
import sqlite3
from pathlib import Path

import pytest

from helpers import save_tiny_checkpoint
from gptctl.cli import app

INT64_MAX = 2**63 - 1


def base(data_root, model: bool = True) -> list[str]:
    return ["pretrain", *(["--model", "tiny"] if model else []), "--data-root", str(data_root), "--seq-len", "32",
            "--batch-size", "4", "--total-batch-size", "256", "--max-steps", "10", "--warmup-steps", "2",
            "--print-command"]  # a command that got through would create its run and stop there


def refused(runner, args: list[str], option: str, home: Path, *words: str) -> str:
    result = runner.invoke(app, args)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert len(lines) == 1 and option in lines[0], result.output
    for word in words:
        assert word in lines[0], result.output
    assert not home.exists(), "a refused command must not create the registry or a run directory"
    return lines[0]


# --- numbers: finite, and within what the registry, numpy and torch can hold ---------------------------------

@pytest.mark.parametrize("extra, option", [
    (["--max-lr", "inf"], "--max-lr"),
    (["--max-lr", "nan"], "--max-lr"),
    (["--min-lr", "inf"], "--min-lr"),
    (["--weight-decay", "inf"], "--weight-decay"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--grad-clip", "inf"], "--grad-clip"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"),
    (["--seed", "100000000000000000000"], "--seed"),
    (["--max-steps", str(10**30)], "--max-steps"),
    (["--max-steps", str(INT64_MAX + 1)], "--max-steps"),
    (["--checkpoint-interval", str(10**30)], "--checkpoint-interval"),
    (["--eval-interval", str(2**63)], "--eval-interval"),
    (["--keep-last-n-checkpoints", str(2**64)], "--keep-last-n-checkpoints"),
    (["--permanent-checkpoints", f"5,{10**30}"], "--permanent-checkpoints"),
    (["--max-steps", str(INT64_MAX // 100)], "--max-steps"),  # steps × 256 tokens per step overflow tokens_seen
    (["--lr-scheduler", "cosine_with_restarts", "--lr-restarts", "8"], "--lr-restarts"),  # 9 cycles in 8 steps
])
def test_numbers_out_of_range_are_refused(runner, shakespeare, gptctl_home, extra, option):
    refused(runner, base(shakespeare) + extra, option, gptctl_home)


@pytest.mark.parametrize("extra, option", [
    (["--rdzv-endpoint", "node0:99999"], "--rdzv-endpoint"),
    (["--rdzv-endpoint", "node0 :29400"], "--rdzv-endpoint"),
    (["--master-addr", ""], "--master-addr"),
    (["--log-dir", "conftest.py"], "--log-dir"),
])
def test_launch_and_log_options(runner, shakespeare, gptctl_home, monkeypatch, extra, option):
    monkeypatch.chdir(Path(__file__).parent)
    refused(runner, base(shakespeare) + extra, option, gptctl_home)


def test_resume_max_steps_out_of_range_changes_nothing(runner, shakespeare, gptctl_home):
    assert runner.invoke(app, base(shakespeare) + ["--run-name", "r"]).exit_code == 0
    before = json.loads(runner.invoke(app, ["runs", "show", "r", "--json"]).stdout)
    result = runner.invoke(app, ["resume", "r", "--max-steps", str(10**30)])
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "--max-steps" in lines[0], result.output
    assert json.loads(runner.invoke(app, ["runs", "show", "r", "--json"]).stdout) == before


def test_seed_bounds_are_inclusive(runner, shakespeare, gptctl_home):
    for seed in ("0", str(2**32 - 1)):
        result = runner.invoke(app, base(shakespeare) + ["--seed", seed])
        assert result.exit_code == 0, result.output


# --- run names ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["a\n", "a\nb", "tab\t", " lead", "x" * 65, ".hidden", "a%b"])
def test_run_name_is_checked_whole(runner, shakespeare, gptctl_home, name):
    refused(runner, base(shakespeare) + ["--run-name", name], "--run-name", gptctl_home)


def test_run_name_with_underscore_and_dots_round_trips(runner, shakespeare, gptctl_home):
    result = runner.invoke(app, base(shakespeare) + ["--run-name", "my_run.v2-a"])
    assert result.exit_code == 0, result.output
    rows = json.loads(runner.invoke(app, ["runs", "list", "--json"]).stdout)
    assert [r["name"] for r in rows] == ["my_run.v2-a"]
    assert Path(rows[0]["run_dir"]).name.startswith("my_run.v2-a-")


# --- config files hold only the command's own options -------------------------------------------------------

@pytest.mark.parametrize("toml, option, words", [
    ('pretrained_checkpoint = "/etc/passwd"\n', "--config", ["pretrained_checkpoint", "--init-from"]),
    ('kind = "finetune"\n', "--config", ["kind"]),
    ("block_size = 2048\n", "--config", ["block_size"]),
    ('dataset_path = "x.jsonl"\n', "--config", ["dataset_path", "finetune"]),
    ("permanent_checkpoints = [0, 10]\n", "--permanent-checkpoints", []),
    ("permanent_checkpoints = [-5]\n", "--permanent-checkpoints", []),
    ("max_lr = inf\n", "--max-lr", []),
    ("grad_clip = nan\n", "--grad-clip", []),
    ("checkpoint_interval = 1e30\n", "--checkpoint-interval", []),
    ("seed = -1\n", "--seed", []),
    ('run_name = "a\\n"\n', "--run-name", []),
])
def test_config_file_refusals(runner, shakespeare, tmp_path, gptctl_home, toml, option, words):
    cfg = tmp_path / "run.toml"
    cfg.write_text(toml)
    refused(runner, base(shakespeare) + ["--config", str(cfg)], option, gptctl_home, *words)


def test_finetune_config_may_not_name_pretrain_options(runner, tmp_path, gptctl_home):
    parent = save_tiny_checkpoint(tmp_path / "parent.pt")
    cfg = tmp_path / "ft.toml"
    cfg.write_text('model = "gpt2"\n')
    refused(runner, ["finetune", "--pretrained-checkpoint", str(parent), "--config", str(cfg), "--dataset-path",
             str(tmp_path / "x.jsonl")], "--config", gptctl_home, "model")


def test_saved_config_of_an_init_from_run_reads_back(runner, shakespeare, tmp_path, gptctl_home):
    """--save-config writes only what --config accepts; the parent is kept as a comment."""
    parent = save_tiny_checkpoint(tmp_path / "parent.pt", block=32)
    result = runner.invoke(app, base(shakespeare, model=False) + ["--init-from", str(parent), "--save-config"])
    assert result.exit_code == 0, result.output
    run_dir = Path(json.loads(runner.invoke(app, ["runs", "list", "--json"]).stdout)[0]["run_dir"])
    toml = (run_dir / "config.toml").read_text()
    assert f"# pretrained_checkpoint = \"{parent}\"" in toml
    result = runner.invoke(app, ["pretrain", "--config", str(run_dir / "config.toml"), "--print-command", "--new-run"])
    assert result.exit_code == 0, result.output


# --- data ----------------------------------------------------------------------------------------------------

def test_val_split_smaller_than_a_micro_batch(runner, shakespeare, tmp_path, gptctl_home):
    data = tmp_path / "data"
    data.mkdir()
    for f in shakespeare.iterdir():
        (data / f.name).symlink_to(f)
    import numpy as np

    (data / "tinyshakespeare_val_000000.npy").unlink()
    np.save(data / "tinyshakespeare_val_000000.npy", np.arange(100, dtype=np.uint16))
    (data / "manifest.json").unlink()  # a manifest that says what the data now is (else: refused as a changed shard)
    manifest = json.loads((shakespeare / "manifest.json").read_text())
    from gptctl.digest import sha256_of

    val = data / "tinyshakespeare_val_000000.npy"
    for shard in manifest["shards"]:
        if shard["file"] == val.name:
            shard.update(tokens=100, bytes=val.stat().st_size, sha256=sha256_of(val))
    (data / "manifest.json").write_text(json.dumps(manifest))
    args = base(data)
    args[args.index("--batch-size") + 1] = "4"
    refused(runner, args, "--data-root", gptctl_home, "val", "100", "129")


@pytest.mark.parametrize("entry", ['"shard.npy"', "17", "null", '["a"]', '{"split": "val"}',
                                   '{"file": 5, "split": "val"}', '{"file": "../../etc/passwd", "split": "val"}',
                                   '{"file": "/etc/passwd", "split": "val"}'])
def test_manifest_entry_that_is_not_a_shard(runner, shakespeare, tmp_path, gptctl_home, entry):
    data = tmp_path / "data"
    data.mkdir()
    for f in shakespeare.glob("*.npy"):
        (data / f.name).symlink_to(f)
    manifest = json.loads((shakespeare / "manifest.json").read_text())
    manifest["shards"].append(json.loads(entry))
    (data / "manifest.json").write_text(json.dumps(manifest))
    refused(runner, base(data), "--data-root", gptctl_home, "manifest.json")


def write_jsonl(path: Path, bad: dict | None = None, at: int = 7) -> Path:
    rows = [json.dumps({"instruction": f"Say {i}", "context": "", "response": f"{i}"}) for i in range(10)]
    if bad is not None:
        rows.insert(at - 1, json.dumps(bad))
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.mark.parametrize("bad, field", [
    ({"instruction": "Add", "context": "", "response": 5}, "response"),
    ({"instruction": ["Add"], "context": "", "response": "5"}, "instruction"),
    ({"instruction": "Add", "context": {"a": 1}, "response": "5"}, "context"),
    ({"instruction": "Add", "context": ""}, "response"),
])
def test_finetune_jsonl_field_of_the_wrong_type(runner, tmp_path, gptctl_home, bad, field):
    parent = save_tiny_checkpoint(tmp_path / "parent.pt", block=64)
    data = write_jsonl(tmp_path / "dolly.jsonl", bad, at=7)
    refused(runner, ["finetune", "--pretrained-checkpoint", str(parent), "--dataset-path", str(data), "--print-command"],
            "--dataset-path", gptctl_home, "dolly.jsonl:7", repr(field))


def test_finetune_jsonl_line_that_is_not_an_object(runner, tmp_path, gptctl_home):
    parent = save_tiny_checkpoint(tmp_path / "parent.pt", block=64)
    data = write_jsonl(tmp_path / "dolly.jsonl")
    data.write_text(data.read_text() + "[1, 2]\n")
    refused(runner, ["finetune", "--pretrained-checkpoint", str(parent), "--dataset-path", str(data), "--print-command"],
            "--dataset-path", gptctl_home, "dolly.jsonl:11")


# --- the home and the run directory ---------------------------------------------------------------------------

def test_home_that_is_a_file(runner, shakespeare, tmp_path, monkeypatch):
    home = tmp_path / "home-file"
    home.write_text("not a directory")
    monkeypatch.setenv("GPTCTL_HOME", str(home))
    for args in (base(shakespeare), ["runs", "list"], ["ckpt", "list"]):
        result = runner.invoke(app, args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1 and "GPTCTL_HOME" in lines[0], result.output
    assert home.read_text() == "not a directory"


def test_home_that_cannot_be_created(runner, shakespeare, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("GPTCTL_HOME", str(blocker / "home"))
    result = runner.invoke(app, base(shakespeare))
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert result.exit_code == 2 and len(lines) == 1 and "GPTCTL_HOME" in lines[0], result.output


def test_resume_of_a_run_whose_directory_is_gone(runner, shakespeare, gptctl_home):
    import shutil

    assert runner.invoke(app, base(shakespeare) + ["--run-name", "gone"]).exit_code == 0
    row = json.loads(runner.invoke(app, ["runs", "list", "--json"]).stdout)[0]
    shutil.rmtree(row["run_dir"])
    with sqlite3.connect(gptctl_home / "gptctl.db") as conn:  # as if it had been interrupted
        conn.execute("update runs set status = 'interrupted' where id = ?", [row["id"]])
    for args in (["resume", "gone"], base(shakespeare) + ["--run-name", "gone", "--auto-resume"]):
        result = runner.invoke(app, args)
        lines = [line for line in result.output.splitlines() if line.strip()]
        assert result.exit_code == 2 and len(lines) == 1, result.output
        assert "run directory" in lines[0] and row["run_dir"] in lines[0] and "gone" in lines[0], result.output
    assert not Path(row["run_dir"]).exists()
    assert len(json.loads(runner.invoke(app, ["runs", "list", "--json"]).stdout)) == 1


# --- checkpoints a run would start from: refused before any run exists -----------------------------------------

class _Code:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def malicious_checkpoint(path: Path) -> Path:
    import torch

    torch.save({"model": _Code(), "settings": {}, "step": 1}, path)
    return path


BAD_FILES = {
    "pickled code": malicious_checkpoint,
    "random bytes": lambda p: (p.write_bytes(os.urandom(4096)), p)[1],
    "git-lfs pointer": lambda p: (p.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:"
                                               + "ab" * 32 + "\nsize 497759232\n"), p)[1],
    "a plain pickle": lambda p: (p.write_bytes(pickle.dumps({"model": {}, "step": 1})), p)[1],
    "a list": lambda p: (__import__("torch").save([1, 2, 3], p), p)[1],
    "no settings": lambda p: (__import__("torch").save({"model": {}, "step": 3}, p), p)[1],
    "bad settings": lambda p: (__import__("torch").save({"model": {}, "settings": {"seq_len": -1}}, p), p)[1],
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
@pytest.mark.parametrize("how", ["resume", "init-from", "finetune"])
def test_unloadable_checkpoint_is_refused_before_a_run_exists(runner, shakespeare, tmp_path, gptctl_home, monkeypatch,
                                                                kind, how):
    monkeypatch.chdir(tmp_path)
    path = BAD_FILES[kind](tmp_path / "model_00010.pt")
    args, option = {
        "resume": (base(shakespeare) + ["--resume", "--checkpoint-path", str(path)], "--checkpoint-path"),
        "init-from": (base(shakespeare, model=False) + ["--init-from", str(path)], "--init-from"),
        "finetune": (["finetune", "--pretrained-checkpoint", str(path), "--dataset-path",
                      str(write_jsonl(tmp_path / "d.jsonl")), "--print-command"], "--pretrained-checkpoint"),
    }[how]
    line = refused(runner, args, option, gptctl_home, str(path))
    assert not (tmp_path / "PWNED").exists()
    assert line.startswith(f"Error: {option}: ")


def test_resume_needs_a_training_state_of_the_same_model(runner, shakespeare, tmp_path, gptctl_home):
    weights_only = save_tiny_checkpoint(tmp_path / "weights.pt", block=32)  # no optimizer: not resumable
    refused(runner, base(shakespeare) + ["--resume", "--checkpoint-path", str(weights_only)], "--checkpoint-path", gptctl_home,
            "optimizer", "--init-from")


def test_resume_from_a_checkpoint_of_another_shape_or_past_max_steps(runner, shakespeare, tmp_path, gptctl_home):
    import torch

    from gptctl.settings import TrainSettings

    def state(step, **shape):
        settings = TrainSettings(model="tiny", seq_len=32, batch_size=4, total_batch_size=256, warmup_steps=2, **shape)
        return {"model": {}, "optimizer": {}, "rng": {}, "step": step, "settings": settings.model_dump(mode="json")}

    other = tmp_path / "other.pt"
    torch.save(state(3, n_embd=32), other)
    refused(runner, base(shakespeare) + ["--resume", "--checkpoint-path", str(other)], "--checkpoint-path", gptctl_home,
            "n_embd")
    done = tmp_path / "done.pt"
    torch.save(state(10), done)
    refused(runner, base(shakespeare) + ["--resume", "--checkpoint-path", str(done)], "--checkpoint-path", gptctl_home,
            "step 10", "--max-steps")


def test_checkpoint_path_without_resume_is_not_silently_ignored(runner, shakespeare, tmp_path, gptctl_home):
    path = save_tiny_checkpoint(tmp_path / "model.pt", block=32)
    refused(runner, base(shakespeare) + ["--checkpoint-path", str(path)], "--checkpoint-path", gptctl_home, "--resume")


# --- other commands -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, option", [
    (["--max-new-tokens", "-5"], "--max-new-tokens"),
    (["--temperature", "inf"], "--temperature"),
    (["--temperature", "nan"], "--temperature"),
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2**64)], "--seed"),
    (["--top-k", "0"], "--top-k"),
    (["--top-p", "inf"], "--top-p"),
    (["--top-p", "nan"], "--top-p"),
    (["--top-p", "-0.5"], "--top-p"),
])
@pytest.mark.parametrize("command", [["sample", "--prompt", "hi"], ["chat"]])  # one check of each option for both
def test_sample_and_chat_numbers(runner, tmp_path, gptctl_home, extra, option, command):
    path = save_tiny_checkpoint(tmp_path / "model.pt")
    refused(runner, [command[0], str(path), *command[1:]] + extra, option, gptctl_home)


@pytest.mark.parametrize("extra, option", [
    (["--mfu", "inf"], "--mfu"),
    (["--mfu", "nan"], "--mfu"),
    (["--num-gpus", "0"], "--num-gpus"),
    (["--max-steps", "-5"], "--max-steps"),
    (["--seq-len", str(10**30)], "--seq-len"),
    (["--permanent-checkpoints", "0"], "--permanent-checkpoints"),
])
def test_estimate_numbers(runner, gptctl_home, extra, option):
    refused(runner, ["estimate"] + extra, option, gptctl_home)


@pytest.mark.parametrize("extra, option", [
    (["--val-fraction", "inf"], "--val-fraction"),
    (["--val-fraction", "nan"], "--val-fraction"),
    (["--workers", "0"], "--workers"),
    (["--shard-size", "0"], "--shard-size"),
])
def test_data_prepare_numbers(runner, tmp_path, gptctl_home, extra, option):
    src = tmp_path / "in.txt"
    src.write_text("hello world\n" * 100)
    refused(runner, ["data", "prepare", "-i", str(src), "--data-root", str(tmp_path / "out")] + extra, option, gptctl_home)
    assert not (tmp_path / "out").exists()


# --- a finetune takes its parent's model; a Qwen3 import its exact block --------------------------------------

@pytest.mark.parametrize("args, words", [
    (["--arch", "modern"], ["--arch:", "a finetune takes its parent's architecture"]),
    (["--recipe", "speedrun"], ["--recipe:", "a finetune takes its parent's architecture"]),
    (["--n-layer", "4"], ["--n-layer:", "a finetune takes its parent's"]),
    # The parent is gpt2: there is no --arch to add (the break test's "add --arch modern").
    (["--embedding-lr", "0.1"], ["--embedding-lr: applies only with --arch modern",
                                 "the parent checkpoint is an --arch gpt2 model"]),
])
def test_finetune_options_of_another_architecture(runner, tmp_path, gptctl_home, args, words):
    parent = save_tiny_checkpoint(tmp_path / "parent.pt")
    line = refused(runner, ["finetune", "--pretrained-checkpoint", str(parent), "--dataset-path", str(tmp_path / "x.jsonl"),
                    *args], args[0], gptctl_home, *words)
    assert "add --arch" not in line


def test_finetune_config_file_naming_the_architecture(runner, tmp_path, gptctl_home):
    parent = save_tiny_checkpoint(tmp_path / "parent.pt")
    cfg = tmp_path / "ft.toml"
    cfg.write_text('arch = "modern"\n')
    refused(runner, ["finetune", "--pretrained-checkpoint", str(parent), "--config", str(cfg), "--dataset-path",
             str(tmp_path / "x.jsonl")], "--config", gptctl_home, "'arch'", "a finetune takes its parent's architecture")


def qwen3_config(directory: Path, **changes) -> Path:
    """config.json of a Qwen3 of --arch modern's tiny shape (as `gptctl export` writes it), changed; no weights:
    the config is checked first."""
    import torch

    from gptctl.engine.hf import hf_config
    from gptctl.engine.model import GPTConfig

    config = {**hf_config(GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=32, arch="modern"), torch.float32),
              **changes}
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not Ellipsis}))
    return directory


@pytest.mark.parametrize("changes, words", [
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, ["rope_scaling=", "'linear'"]),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}, "rope_parameters": Ellipsis}, ["rope_scaling="]),
    # transformers' Qwen3Config reads a missing head_dim as 128, not hidden_size // num_attention_heads (32 here)
    ({"head_dim": Ellipsis}, ["head_dim", "128", "32"]),
])
def test_a_qwen3_that_computes_another_model_is_refused(runner, tmp_path, gptctl_home, changes, words):
    directory = qwen3_config(tmp_path / "qwen3", **changes)
    refused(runner, ["pretrain", "--init-from", f"hf:{directory}", "--data-root", str(tmp_path / "data")], "--init-from",
            gptctl_home, *words)


def test_a_qwen3_config_read_as_transformers_reads_it(tmp_path):
    from gptctl.engine.hf import _check_config

    # rope_scaling null (transformers 4's key, unset) and a missing head_dim where 128 is the model's own are fine.
    config = json.loads((qwen3_config(tmp_path / "a", rope_scaling=None)).joinpath("config.json").read_text())
    assert _check_config(config, tmp_path, "--init-from").n_embd == 64
    config.update(hidden_size=256, num_attention_heads=2, intermediate_size=704)
    del config["head_dim"]
    assert _check_config(config, tmp_path, "--init-from").head_dim == 128
