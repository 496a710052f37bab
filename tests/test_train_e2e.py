"""End to end through real torchrun workers: training, checkpoints, registry, kill and resume, DDP."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY_RUN, cli, gptctl, losses, only_run_id, train_in_process, train_in_processes, wait_until

pytestmark = pytest.mark.slow


def pretrain(home, data, *extra, check=True, run=gptctl):
    """`gptctl pretrain` of TINY_RUN: a real process, or with `run=cli` in this one."""
    return run("pretrain", *TINY_RUN, "--data-root", str(data), *extra, home=home, check=check)


def checkpoint_rows(home, run_id):
    with sqlite3.connect(home / "gptctl.db") as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute("select * from checkpoints where run_id = ? order by step", [run_id])]


def test_pretrain_trains_checkpoints_and_registers(shakespeare, gptctl_home):
    proc = pretrain(gptctl_home, shakespeare, "--max-steps", "24", "--checkpoint-interval", "8",
                    "--keep-last-n-checkpoints", "1", "--permanent-checkpoints", "8", "--run-name", "first", "--json")
    summary = json.loads(proc.stdout)
    assert summary["status"] == "completed" and summary["last_step"] == 24
    run_id = summary["run_id"]
    metrics = losses(gptctl_home, run_id)
    assert sorted(metrics) == list(range(1, 25))  # every step is recorded
    assert metrics[24][0] < metrics[1][0] - 1.0  # the loss clearly falls
    assert metrics[4][1] is not None and metrics[24][1] is not None  # val loss at eval steps

    rows = {r["step"]: r for r in checkpoint_rows(gptctl_home, run_id)}
    # keep-last 1 keeps 24; 8 is permanent; 16 was deleted by retention (file first, then the row).
    assert {s: r["state"] for s, r in rows.items()} == {8: "valid", 16: "deleted", 24: "valid"}
    assert rows[8]["pinned"] == 1
    ckpt_dir = gptctl_home / f"first-{run_id}" / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["model_00008.pt", "model_00024.pt"]
    from gptctl.digest import sha256_of

    for step in (8, 24):
        path = ckpt_dir / f"model_{step:05d}.pt"
        assert rows[step]["path"] == str(path.relative_to(gptctl_home))  # stored relative to the home
        assert rows[step]["bytes"] == path.stat().st_size and rows[step]["sha256"] == sha256_of(path)

    import torch

    state = torch.load(ckpt_dir / "model_00024.pt", weights_only=True)
    assert state["step"] == 24 and "transformer.h.0.attn.c_attn.weight" in state["model"]
    assert [m["step"] for m in state["metrics"]] == list(range(1, 25))
    assert state["metrics"][-1]["val_loss"] == metrics[24][1]  # saved after the last step's eval

    shown = json.loads(cli("runs", "show", run_id[:4], "--json", home=gptctl_home).stdout)
    assert shown["status"] == "completed" and shown["settings"]["max_steps"] == 24
    assert [m["step"] for m in shown["metrics"]] == list(range(1, 25))
    assert shown["command"].startswith("gptctl pretrain")
    assert json.loads((gptctl_home / f"first-{run_id}" / "config.json").read_text())["model"] == "tiny"
    listed = json.loads(cli("ckpt", "list", "--json", home=gptctl_home).stdout)
    assert {(c["run_id"], c["step"]) for c in listed} == {(run_id, 8), (run_id, 24)}


def _wait_for_checkpoint(home, min_step, proc, name, timeout=120):
    def newest():
        try:
            with sqlite3.connect(f"file:{home / 'gptctl.db'}?mode=ro", uri=True, timeout=30) as conn:
                step, = conn.execute("select max(c.step) from checkpoints c join runs r on r.id = c.run_id"
                                     " where c.state = 'valid' and r.name = ?", [name]).fetchone()
        except sqlite3.OperationalError:  # the launcher has not created or migrated the registry yet
            return None
        return step if step is not None and step >= min_step else None

    return wait_until(newest, f"a checkpoint at step {min_step} or later, to kill the run after", timeout, proc=proc)


def test_sigkill_then_resume_is_bit_exact(shakespeare, gptctl_home, tmp_path):
    # With Muon (AdamW's SIGKILLs: test_faults.py): its momentum buffers are in the checkpoint too.
    steps = ["--max-steps", "16", "--checkpoint-interval", "4", "--optimizer", "muon"]
    reference, _ = train_in_process(shakespeare, tmp_path / "reference", max_steps=16, checkpoint_interval=4,
                                    optimizer="muon")

    env = {**os.environ, "GPTCTL_HOME": str(gptctl_home)}
    proc = subprocess.Popen([sys.executable, "-m", "gptctl", "pretrain", *TINY_RUN, "--data-root", str(shakespeare), *steps,
                             "--run-name", "killed"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    _wait_for_checkpoint(gptctl_home, 4, proc, "killed")
    os.killpg(proc.pid, signal.SIGKILL)  # the launcher dies; torchrun and the workers must die with it
    proc.wait()
    run_id = only_run_id(gptctl_home)
    time.sleep(1.0)
    listing = json.loads(cli("runs", "list", "--json", home=gptctl_home).stdout)
    assert listing[0]["status"] == "stale"  # nobody holds the run's lock any more

    cli("resume", run_id[:5], home=gptctl_home)
    resumed = losses(gptctl_home, run_id)
    assert resumed == reference  # every step's loss and val loss, to the last bit
    # The killed launch's row was left open; the next start closed it, as killed, and counts what it redid.
    starts = json.loads(cli("runs", "show", run_id, "--json", home=gptctl_home).stdout)["launches"]
    assert [r["reason"] for r in starts] == ["kill", "completed"] and starts[1]["first_step"] >= 4
    assert starts[1]["redone_steps"] == max(starts[0]["last_step"] - starts[1]["first_step"], 0)


def test_sigterm_interrupts_then_auto_resume_continues_that_run(shakespeare, gptctl_home, tmp_path):
    args = [*TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "400", "--checkpoint-interval", "3", "--run-name", "mine"]
    pretrain(gptctl_home, shakespeare, "--max-steps", "3", "--checkpoint-interval", "3", "--run-name", "other", run=cli)
    env = {**os.environ, "GPTCTL_HOME": str(gptctl_home)}
    proc = subprocess.Popen([sys.executable, "-m", "gptctl", "pretrain", *args], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_checkpoint(gptctl_home, 3, proc, "mine")
    proc.send_signal(signal.SIGTERM)  # what a cluster scheduler sends on preemption
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    mine = only_run_id(gptctl_home, "mine")
    shown = json.loads(cli("runs", "show", mine, "--json", home=gptctl_home).stdout)
    assert shown["status"] == "interrupted"
    stopped_at = shown["last_step"]
    assert 3 <= stopped_at < 400
    # The workers finished their step and saved it before exiting.
    assert max(c["step"] for c in shown["checkpoints"] if c["state"] == "valid") == stopped_at

    proc = cli("pretrain", *args[:-6], "--max-steps", str(stopped_at + 3), "--checkpoint-interval", "3",
               "--run-name", "mine", "--auto-resume", "--json", home=gptctl_home)
    summary = json.loads(proc.stdout)
    assert summary["run_id"] == mine and summary["last_step"] == stopped_at + 3, summary
    assert f"from step {stopped_at}" in proc.stderr
    logged = losses(gptctl_home, mine)
    assert sorted(logged) == list(range(1, stopped_at + 4))
    # The same losses, to the bit, as the Trainer in-process: up to the stop with the first launch's schedule
    # (its val losses at multiples of 4: this one also measures the step it ends at), then resumed
    # from there with the settings the auto-resume stored.
    stored = json.loads(cli("runs", "show", mine, "--json", home=gptctl_home).stdout)["settings"]
    first, saved = train_in_process(shakespeare, tmp_path / "first", max_steps=stopped_at,
                                    lr_decay_steps=400, checkpoint_interval=stopped_at)
    assert {s: logged[s][0] for s in first} == {s: loss for s, (loss, _) in first.items()}
    assert {s: logged[s][1] for s in first if s < stopped_at} == {s: v for s, (_, v) in first.items() if s < stopped_at}
    then, _ = train_in_process(shakespeare, tmp_path / "then", resume_from=saved[stopped_at], max_steps=stopped_at + 3,
                               checkpoint_interval=3, lr_decay_steps=stored["lr_decay_steps"])
    assert {s: logged[s] for s in then} == then
    shown = json.loads(cli("runs", "show", mine, "--json", home=gptctl_home).stdout)
    assert [r["reason"] for r in shown["launches"]] == ["signal", "completed"]
    usage = shown["goodput"]
    assert usage["interruptions"] == 1 and usage["redone_steps"] == 0 and usage["suggested_interval_steps"] >= 1

    # A completed run is complete: auto-resume under its name says so and starts nothing (one name, one run).
    proc = cli("pretrain", *args[:-6], "--max-steps", "3", "--checkpoint-interval", "3", "--run-name", "other",
               "--auto-resume", "--json", home=gptctl_home)
    assert json.loads(proc.stdout)["run_id"] == only_run_id(gptctl_home, "other") and "already complete" in proc.stderr
    assert len(json.loads(cli("runs", "list", "--json", home=gptctl_home).stdout)) == 2


def test_two_processes_match_one_with_the_same_total_batch(shakespeare, gptctl_home, tmp_path):
    # With Muon, whose Newton-Schulz runs on every rank over the all-reduced gradients (AdamW on two
    # processes against one: test_resume_on_two_processes_continues_a_one_process_run).
    # The two processes are forked from this one (the worker's setup, no torchrun): the launch of two
    # processes is test_resume_on_two_processes_continues_a_one_process_run's.
    layout = dict(max_steps=6, checkpoint_interval=6, optimizer="muon")
    one, _ = train_in_process(shakespeare, tmp_path / "one", **layout)  # 1 × 2 micro-steps
    two, _ = train_in_processes(2, shakespeare, tmp_path / "two", **layout)  # 2 × 1
    assert sorted(one) == sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step][0] == pytest.approx(one[step][0], rel=1e-5, abs=1e-5)


def test_resume_from_explicit_checkpoint_path(shakespeare, gptctl_home, tmp_path):
    pretrain(gptctl_home, shakespeare, "--max-steps", "4", "--checkpoint-interval", "4", "--run-name", "base", run=cli)
    base = only_run_id(gptctl_home, "base")
    path = str(gptctl_home / checkpoint_rows(gptctl_home, base)[-1]["path"])
    proc = pretrain(gptctl_home, shakespeare, "--max-steps", "8", "--checkpoint-interval", "4", "--run-name", "branch",
                    "--resume", "--checkpoint-path", path, "--json", run=cli)
    branch = json.loads(proc.stdout)["run_id"]
    assert sorted(losses(gptctl_home, branch)) == [5, 6, 7, 8]  # continued after step 4, in a new run
    # ...from that checkpoint's weights, optimizer and data position: the Trainer resumed from it in-process
    # logs the same losses to the bit (a fresh start at step 5 would not).
    resumed, _ = train_in_process(shakespeare, tmp_path / "branch", resume_from=Path(path), max_steps=8,
                                  checkpoint_interval=4)
    assert losses(gptctl_home, branch) == resumed


def test_resume_on_two_processes_continues_a_one_process_run(shakespeare, gptctl_home, tmp_path):
    """Launch settings belong to a launch: `resume RUN --nproc-per-node 2` (a job requeued on a bigger
    allocation) continues the run with the same batch per step; the losses match one process's."""
    summary = json.loads(pretrain(gptctl_home, shakespeare, "--max-steps", "4", "--checkpoint-interval", "4",
                                  "--run-name", "grow", "--json", run=cli).stdout)
    stored = json.loads(cli("runs", "show", "grow", "--json", home=gptctl_home).stdout)["settings"]
    assert "nproc_per_node" not in stored and "stop_timeout" not in stored  # not part of the run
    proc = gptctl("resume", "grow", "--max-steps", "8", "--nproc-per-node", "2", "--json", home=gptctl_home)
    resumed = json.loads(proc.stdout)
    assert resumed["run_id"] == summary["run_id"] and resumed["last_step"] == 8
    shown = json.loads(cli("runs", "show", "grow", "--json", home=gptctl_home).stdout)
    assert shown["world_size"] == 2 and "nproc_per_node" not in shown["settings"]
    assert [r["world_size"] for r in shown["launches"]] == [1, 2]  # each launch with its own

    first, saved = train_in_process(shakespeare, tmp_path / "one", max_steps=4, checkpoint_interval=4)
    # the resume kept the schedule's end at step 4 (`resume --max-steps` never jumps the LR)
    second, _ = train_in_process(shakespeare, tmp_path / "one", resume_from=saved[4], max_steps=8, checkpoint_interval=4,
                                 lr_decay_steps=4)
    two = losses(gptctl_home, summary["run_id"])
    assert {s: two[s] for s in range(1, 5)} == first  # the same code in-process and in a worker: to the bit
    for step in range(5, 9):
        assert two[step][0] == pytest.approx(second[step][0], rel=1e-5, abs=1e-5)


def test_raising_max_steps_keeps_the_lr_schedule_and_says_so(shakespeare, gptctl_home):
    """The issue: 20 steps, then `resume --max-steps 30` jumped the LR from its final value back up.
    Now the schedule still ends where it did and the added steps train at the final LR; recorded."""
    pretrain(gptctl_home, shakespeare, "--max-steps", "4", "--checkpoint-interval", "4", "--run-name", "longer", run=cli)
    proc = cli("resume", "longer", "--max-steps", "6", home=gptctl_home)
    assert "the LR schedule still ends at step 4" in proc.stderr
    run_id = only_run_id(gptctl_home, "longer")
    with sqlite3.connect(gptctl_home / "gptctl.db") as conn:
        lrs = dict(conn.execute("select step, lr from metrics where run_id = ?", [run_id]).fetchall())
    assert lrs[4] == pytest.approx(3e-4) and lrs[5] == lrs[6] == lrs[4]  # 3e-3 / 10: no jump
    shown = json.loads(cli("runs", "show", "longer", "--json", home=gptctl_home).stdout)
    assert [(e["step"], e["kind"]) for e in shown["events"]] == [(4, "resume")]
    assert shown["settings"]["lr_decay_steps"] == 4 and shown["settings"]["max_steps"] == 6
