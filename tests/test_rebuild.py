"""A lost or damaged registry: reported in one line, and `gptctl registry rebuild` re-creates it from disk."""

import json
import sqlite3

import pytest

from helpers import TINY_RUN, cli, losses, only_run_id, save_tiny_checkpoint
from gptctl.cli import app
from gptctl.digest import sha256_of


def fake_run(home, name="base", run_id="0123abcd", steps=(2, 4), max_steps=4):
    """A run directory as gptctl writes it (config.json, run.json, checkpoints with metrics), no registry row."""
    import torch

    from gptctl.settings import TrainSettings

    run_dir = home / f"{name}-{run_id}"
    (run_dir / "checkpoints").mkdir(parents=True)
    settings = TrainSettings(model="tiny", seq_len=16, batch_size=4, max_steps=max_steps, warmup_steps=1,
                             run_name=name, permanent_checkpoints=[2])
    (run_dir / "config.json").write_text(settings.model_dump_json(indent=2))
    (run_dir / "run.json").write_text(json.dumps({"id": run_id, "name": name, "kind": "pretrain",
                                                  "command": "gptctl pretrain …", "created_at": "2026-12-01T00:00:00+00:00"}))
    for step in steps:
        path = save_tiny_checkpoint(run_dir / "checkpoints" / f"model_{step:05d}.pt", step=step)
        state = torch.load(path, weights_only=True)
        state["metrics"] = [{"step": s, "loss": 10.0 - s, "lr": 1e-3, "time": 1.0} for s in range(1, step + 1)]
        state["settings"] = settings.model_dump(mode="json")
        path.unlink()
        from gptctl.checkpoints.files import save_atomic

        save_atomic(state, path)
    return run_dir


def invoke(runner, *args):
    return runner.invoke(app, list(args))


@pytest.mark.parametrize("command", [["runs", "list"], ["ckpt", "list"], ["resume", "base"], ["runs", "show", "x"],
                                     ["ckpt", "prune", "--all", "--yes"]])
def test_a_damaged_registry_is_one_line_naming_rebuild(runner, command, gptctl_home):
    gptctl_home.mkdir()
    (gptctl_home / "gptctl.db").write_bytes(b"this is not a database, just garbage " * 100)
    result = invoke(runner, *command)
    assert result.exit_code == 2, result.output
    assert result.stderr.count("\n") == 1 and "damaged" in result.stderr and "gptctl registry rebuild" in result.stderr
    assert "Traceback" not in result.output


def test_a_lost_registry_never_starts_its_runs_over(runner, gptctl_home, shakespeare):
    """After `rm gptctl.db`, --auto-resume started from step 0 beside the old checkpoints."""
    fake_run(gptctl_home)
    before = sorted(gptctl_home.rglob("*"))
    result = invoke(runner, "pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--run-name", "base", "--auto-resume",
                 "--max-steps", "8")
    assert result.exit_code == 2 and "gptctl registry rebuild" in result.stderr and "1 run directory" in result.stderr
    assert sorted(gptctl_home.rglob("*")) == before  # nothing written, no new empty registry
    assert invoke(runner, "runs", "list").exit_code == 2


def test_rebuild_recreates_runs_checkpoints_and_metrics(runner, gptctl_home):
    run_dir = fake_run(gptctl_home)
    (run_dir / "checkpoints" / "model_00006.pt").write_bytes(b"partial copy")  # not what its name says
    outside = gptctl_home.parent / "elsewhere.pt"
    save_tiny_checkpoint(outside, step=8)
    (run_dir / "checkpoints" / "model_00008.pt").symlink_to(outside)  # a symlink out of the run: never trusted
    (gptctl_home / "gptctl.db").write_bytes(b"garbage" * 1000)

    result = invoke(runner, "registry", "rebuild", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["moved_aside"] and (gptctl_home / report["moved_aside"]).exists()
    assert [(r["id"], r["last_step"], r["checkpoints"], r["bad_checkpoints"]) for r in report["runs"]] == \
        [("0123abcd", 4, 2, 2)]
    shown = json.loads(invoke(runner, "runs", "show", "base", "--json").stdout)
    assert shown["id"] == "0123abcd" and shown["status"] == "completed" and shown["command"] == "gptctl pretrain …"
    assert [m["step"] for m in shown["metrics"]] == [1, 2, 3, 4] and shown["metrics"][3]["loss"] == 6.0
    listed = json.loads(invoke(runner, "ckpt", "list", "--run", "base", "--json").stdout)
    # the partial copy is registered as corrupt (never trusted, never started over beside); the symlink not at all
    assert [(c["step"], c["state"], bool(c["pinned"])) for c in listed] == \
        [(2, "valid", True), (4, "valid", False), (6, "corrupt", False)]
    for c in listed:
        assert c["sha256"] == sha256_of(run_dir / "checkpoints" / f"model_{c['step']:05d}.pt")
    again = json.loads(invoke(runner, "registry", "rebuild", "--json").stdout)  # idempotent: nothing more to add
    assert again["runs"] == [] and again["moved_aside"] is None


@pytest.mark.slow
def test_rebuilt_registry_resumes_the_run_where_it_stopped(gptctl_home, shakespeare):
    """A real run; its registry deleted; rebuild; --auto-resume continues at the newest checkpoint, not step 0."""
    args = [*TINY_RUN, "--data-root", str(shakespeare), "--run-name", "lost", "--checkpoint-interval", "3",
            "--max-steps", "8"]
    cli("pretrain", *args, home=gptctl_home)
    run_id = only_run_id(gptctl_home)
    before = losses(gptctl_home, run_id)
    for suffix in ("", "-wal", "-shm"):
        (gptctl_home / f"gptctl.db{suffix}").unlink(missing_ok=True)
    next(gptctl_home.glob("lost-*/checkpoints/model_00008.pt")).unlink()  # as if killed after step 6's save
    assert cli("runs", "list", home=gptctl_home, check=False).returncode == 2
    cli("registry", "rebuild", home=gptctl_home)
    assert losses(gptctl_home, run_id) == {s: before[s] for s in range(1, 7)}
    proc = cli("pretrain", *args, "--auto-resume", home=gptctl_home)
    assert "from step 6" in proc.stderr, proc.stderr
    assert losses(gptctl_home, run_id) == before  # the same run, continued, bit for bit
    with sqlite3.connect(gptctl_home / "gptctl.db") as conn:
        assert conn.execute("select count(*) from runs").fetchone()[0] == 1
