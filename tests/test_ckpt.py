"""ckpt pin/unpin/prune/verify on the checkpoints of a real run."""

import errno
import json
import time
from datetime import datetime
from pathlib import Path

import pytest
import torch

from helpers import TINY_RUN, TINY_SETTINGS, add_run, cli, only_run_id, wait_until
from gptctl.cli import app
from gptctl.cli.listing import format_size


@pytest.fixture
def run_with_checkpoints(shakespeare, gptctl_home):
    cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "8", "--checkpoint-interval", "2",
        "--keep-last-n-checkpoints", "10", "--permanent-checkpoints", "2", "--run-name", "ck", home=gptctl_home)
    return only_run_id(gptctl_home, "ck")


def listing(runner, run_id=None):
    result = runner.invoke(app, ["ckpt", "list", "--json"] + (["--run", run_id] if run_id else []))
    assert result.exit_code == 0, result.output
    return {c["step"]: c for c in json.loads(result.stdout)}


@pytest.mark.slow
def test_listings_pin_prune_verify(runner, run_with_checkpoints):
    run_id = run_with_checkpoints
    before = time.time()
    rows = listing(runner)
    after = time.time()
    assert sorted(rows) == [2, 4, 6, 8] and rows[2]["pinned"] and rows[2]["permanent"]  # permanent steps are pins
    assert [rows[s]["val_loss"] is not None for s in (2, 4, 6, 8)] == [False, True, False, True]  # evals every 4
    assert all(r["bytes"] > 0 and r["state"] == "valid" for r in rows.values())
    for r in rows.values():  # an age is the listing's now less the time the checkpoint was registered
        registered = datetime.fromisoformat(r["created_at"]).timestamp()
        assert before - registered <= r["age_s"] <= after - registered, r
    table = runner.invoke(app, ["ckpt", "list"]).stdout
    total = sum(r["bytes"] for r in rows.values())
    assert "permanent" in table and f"4 checkpoint(s); 4 valid, {format_size(total)}" in table

    run = json.loads(runner.invoke(app, ["runs", "list", "--json"]).stdout)[0]
    tokens = 8 * TINY_SETTINGS["total_batch_size"]
    assert (run["status"], run["step"], run["max_steps"], run["tokens_seen"], run["val_step"]) == ("completed", 8, 8, tokens, 8)
    metrics = json.loads(runner.invoke(app, ["runs", "show", run_id, "--json"]).stdout)["metrics"]
    assert (run["loss"], run["val_loss"]) == (metrics[-1]["loss"], metrics[-1]["val_loss"]) != (None, None)
    started, ended = (datetime.fromisoformat(run[k]) for k in ("started_at", "ended_at"))
    assert run["elapsed_s"] == (ended - started).total_seconds()  # a finished run's: start to end, not to now
    assert (run["checkpoint_count"], run["checkpoint_bytes"]) == (4, total)
    assert run["command"].startswith("gptctl pretrain") and run["parent_checkpoint"] is None
    shown = runner.invoke(app, ["runs", "show", run_id]).stdout
    for line in ("status: completed", "progress: step 8/8", f"loss: {run['loss']:.4f}",
                 f"val loss: {run['val_loss']:.4f} at step 8", f"tokens seen: {tokens:,}", "checkpoints: 4 (",
                 "parent checkpoint: -", "command: gptctl pretrain"):
        assert line in shown, (line, shown)

    result = runner.invoke(app, ["ckpt", "pin", "4"])  # the most recent run, said out loud
    assert result.exit_code == 0 and f"using the most recent run {run_id}" in result.output
    assert runner.invoke(app, ["ckpt", "pin", "5"]).exit_code == 2  # no such step: a clean error

    result = runner.invoke(app, ["ckpt", "prune", "--keep-last", "1", "--dry-run"])
    assert result.exit_code == 0 and "1 checkpoint(s)" in result.output and "step 6" in result.output
    assert sorted(listing(runner)) == [2, 4, 6, 8]  # a dry run changes nothing
    result = runner.invoke(app, ["ckpt", "prune", "--keep-last", "1"], input="n\n")
    assert sorted(listing(runner)) == [2, 4, 6, 8]  # declined
    result = runner.invoke(app, ["ckpt", "prune", "--keep-last", "1", "--yes"])
    assert result.exit_code == 0, result.output
    remaining = listing(runner)
    assert sorted(remaining) == [2, 4, 8]  # pinned 4, permanent 2, newest 8 survive
    assert not Path(f"{Path(remaining[8]['path']).parent}/model_00006.pt").exists()

    runner.invoke(app, ["ckpt", "unpin", "4", "--run", run_id])
    runner.invoke(app, ["ckpt", "prune", "--keep-last", "1", "--yes"])
    assert sorted(listing(runner)) == [2, 8]

    assert runner.invoke(app, ["ckpt", "verify"]).exit_code == 0
    newest = Path(remaining[8]["path"])
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # truncated on disk
    result = runner.invoke(app, ["ckpt", "verify", "--json"])
    assert result.exit_code == 1
    states = {r["step"]: r["state"] for r in json.loads(result.stdout)}
    assert states == {2: "valid", 8: "corrupt"}
    Path(remaining[2]["path"]).unlink()
    assert listing(runner)[2]["state"] == "missing"  # a cheap look (stat) notices vanished files


@pytest.mark.slow
def test_resume_skips_a_corrupt_newest_checkpoint(runner, run_with_checkpoints, gptctl_home):
    run_id = run_with_checkpoints
    newest = Path(listing(runner)[8]["path"])
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one flipped byte: only the sha256 can tell
    newest.write_bytes(bytes(data))
    proc = cli("resume", run_id, "--max-steps", "10", home=gptctl_home)
    assert "checkpoint step 8" in proc.stderr and "corrupt" in proc.stderr
    assert "resuming from step 6" in proc.stderr
    after = listing(runner)
    assert after[8]["state"] == "valid" and after[10]["state"] == "valid"  # step 8 was trained again and rewritten
    from gptctl.digest import sha256_of

    assert after[8]["sha256"] == sha256_of(Path(after[8]["path"]))


class Evil:
    def __reduce__(self):
        import os

        return (os.system, ("touch pwned",))


@pytest.mark.slow
def test_a_malicious_checkpoint_is_refused_and_runs_nothing(shakespeare, gptctl_home, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "model_00004.pt"
    torch.save({"model": {}, "step": 4, "x": Evil()}, evil)
    proc = cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "8", "--resume",
               "--checkpoint-path", str(evil), "--json", home=gptctl_home, check=False)
    # Refused before a run exists (issue 12): no summary, no run, no registry, torchrun never started.
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith(f"Error: --checkpoint-path: {evil}") and "Traceback" not in proc.stderr
    assert not gptctl_home.exists()
    assert not (tmp_path / "pwned").exists()


def test_a_full_disk_fails_the_save_with_the_real_error_and_leaves_no_file(tmp_path, monkeypatch):
    from gptctl.checkpoints.files import load, save_atomic
    from gptctl.digest import sha256_of

    state = {"step": 4, "weights": torch.arange(300_000, dtype=torch.float32)}
    monkeypatch.setenv("GPTCTL_TEST_FAIL_SAVE_AFTER_BYTES", "100000")
    with pytest.raises(OSError) as failure:  # not torch's "unexpected pos" RuntimeError
        save_atomic(state, tmp_path / "model_00004.pt")
    assert failure.value.errno == errno.ENOSPC
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("GPTCTL_TEST_FAULT_FROM_STEP", "5")  # the hook spares earlier steps
    path = tmp_path / "model_00004.pt"
    size, sha = save_atomic(state, path)
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert (size, sha) == (path.stat().st_size, sha256_of(path))
    assert torch.equal(load(path)["weights"], state["weights"])


def _manager(home, run_dir, asynchronous=True):
    from gptctl.engine.checkpoint import CheckpointManager
    from gptctl.registry import open_registry
    from gptctl.settings import CheckpointSettings

    db = open_registry(home)
    add_run(db, run_dir=str(run_dir))
    config = CheckpointSettings(keep_last_n_checkpoints=2, async_checkpoint=asynchronous)
    return db, CheckpointManager(lambda: open_registry(home), "r1", run_dir / "checkpoints", config, True)


def test_asynchronous_save_snapshots_the_state_and_registers_when_durable(gptctl_home, tmp_path, monkeypatch):
    from gptctl.checkpoints.files import load
    from gptctl.registry import queries

    db, manager = _manager(gptctl_home, tmp_path / "run")
    weights = torch.zeros(1000)
    monkeypatch.setenv("GPTCTL_TEST_SLOW_SAVE", "1.0")  # the write stalls after its first bytes
    manager.save(1, lambda: {"model": {"w": weights}, "step": 1})
    weights += 1  # the next optimizer step, while the checkpoint is still being written
    assert queries.checkpoints_of(db, "r1") == []  # not registered before it is durable
    manager.wait()
    [row] = queries.checkpoints_of(db, "r1")
    assert row["step"] == 1 and torch.equal(load(Path(row["path"]))["model"]["w"], torch.zeros(1000))


def test_a_failed_background_save_is_raised_by_wait_and_registers_nothing(gptctl_home, tmp_path, monkeypatch):
    from gptctl.engine.checkpoint import CheckpointWriteError
    from gptctl.registry import queries

    db, manager = _manager(gptctl_home, tmp_path / "run")
    manager.save(1, lambda: {"w": torch.zeros(10)})
    manager.wait()
    monkeypatch.setenv("GPTCTL_TEST_FAIL_SAVE_AFTER_BYTES", "100")
    manager.save(2, lambda: {"w": torch.zeros(1000)})  # fails in the background; training would carry on
    wait_until(lambda: manager.failed, "the failed save to be seen", 30)  # the loop sees this flag at its next step
    with pytest.raises(CheckpointWriteError, match="No space left"):
        manager.wait()
    assert [r["step"] for r in queries.checkpoints_of(db, "r1")] == [1]
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["model_00001.pt"]


def test_long_listings_print_as_plain_aligned_text(runner, gptctl_home, tmp_path):
    from gptctl.cli.listing import PLAIN_ABOVE
    from gptctl.digest import sha256_of
    from gptctl.registry import open_registry, queries

    db = open_registry(gptctl_home)
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    add_run(db, run_dir=str(run_dir))
    for step in range(1, PLAIN_ABOVE + 11):
        path = run_dir / "checkpoints" / f"model_{step:05d}.pt"
        path.write_bytes(b"x")
        queries.register_checkpoint(db, "r1", step, path, 1, sha256_of(path), pinned=step == 7)
    lines = runner.invoke(app, ["ckpt", "list"], env={"COLUMNS": "400"}).stdout.splitlines()
    assert lines[0].split() == ["run", "step", "size", "age", "val", "loss", "pinned", "state", "health", "path"]
    assert len(lines) == 1 + PLAIN_ABOVE + 10 + 1  # header, rows, total
    assert lines[7].split()[:2] == ["r1", "7"] and "yes" in lines[7] and lines[7].endswith("model_00007.pt")
    assert len({line.index("valid") for line in lines[1:-1]}) == 1  # columns line up
    assert all(line.split()[-2] == "healthy" for line in lines[1:-1])  # as the trainer registers them


def test_the_asynchronous_snapshot_keeps_tied_weights_tied(tmp_path):
    from gptctl.engine.checkpoint import cpu_copy
    from gptctl.engine.model import GPT, GPTConfig

    state = {"model": GPT(GPTConfig(block_size=16, n_layer=1, n_head=2, n_embd=32)).state_dict()}
    copy = cpu_copy(state)
    assert copy["model"]["lm_head.weight"] is copy["model"]["transformer.wte.weight"]
    assert copy["model"]["lm_head.weight"].data_ptr() != state["model"]["lm_head.weight"].data_ptr()
    torch.save(state, tmp_path / "a.pt")
    torch.save(copy, tmp_path / "b.pt")
    assert abs((tmp_path / "a.pt").stat().st_size - (tmp_path / "b.pt").stat().st_size) < 4096


def test_listings_at_80_columns_show_every_field_whole(runner, gptctl_home, tmp_path):
    """A pipe, a log or a small terminal: no value cut with "…" or broken across lines."""
    import json

    from gptctl.digest import sha256_of
    from gptctl.registry import open_registry, queries

    db = open_registry(gptctl_home)
    run_dir = tmp_path / "a-rather-long-directory-name-for-runs" / "shakespeare-deep-and-wide-d2c4"
    (run_dir / "checkpoints").mkdir(parents=True)
    name = "shakespeare-deep-and-wide-with-a-long-name"
    add_run(db, "d2c4e6f8", name=name, run_dir=str(run_dir), max_steps=300000, status="interrupted")
    paths = []
    for step in (100000, 200000):
        path = run_dir / "checkpoints" / f"model_{step:05d}.pt"
        path.write_bytes(b"x" * 10)
        queries.register_checkpoint(db, "d2c4e6f8", step, path, 10, sha256_of(path), pinned=False)
        paths.append(str(path))
    queries.write_metrics(db, "d2c4e6f8", [{"step": 200000, "loss": 3.2817, "tokens_seen": 104857600000}])
    for argv, whole in ((["ckpt", "list"], paths), (["runs", "list"], [name, "interrupted", "200000/300000"])):
        out = runner.invoke(app, argv, env={"COLUMNS": "80"}).stdout
        lines = out.splitlines()
        assert "…" not in out and all(len(line) <= 80 or any(p in line for p in paths) for line in lines), out
        for value in whole:
            assert value in out, (value, out)
        wide = runner.invoke(app, argv, env={"COLUMNS": "400"}).stdout  # room: still one table row each
        assert all(value in wide for value in whole) and "…" not in wide
    assert json.loads(runner.invoke(app, ["ckpt", "list", "--json"]).stdout)[0]["path"] == paths[0]
