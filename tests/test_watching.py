"""Watching runs: W&B (offline) and TensorBoard mirrors, gradient logs, HellaSwag during training, timing."""

import json
import os
import sqlite3
from pathlib import Path

import pytest

from helpers import TINY_RUN, cli, losses, train_in_processes
from gptctl.cli import app


def test_missing_optional_packages_are_named_before_anything_is_written(runner, shakespeare, gptctl_home, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("wandb", "tensorboard") else real(name, *a))
    for option, extra in (("--wandb-log", "wandb"), ("--tensorboard", "tensorboard")):
        result = runner.invoke(app, ["pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "4", option])
        assert result.exit_code == 2 and option in result.output and f"gptctl[{extra}]" in result.output, result.output
    result = runner.invoke(app, ["pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "4",
                                 "--hellaswag-interval", "2", "--hellaswag-file", "/nonexistent.jsonl"])
    assert result.exit_code == 2 and "--hellaswag-file" in result.output
    assert not gptctl_home.exists()


def tensorboard_scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {e.step: e.value for e in acc.Scalars(tag)}


@pytest.mark.slow
def test_wandb_tensorboard_and_gradient_logs_follow_the_run_across_a_resume(shakespeare, gptctl_home, tmp_path):
    pytest.importorskip("wandb")
    pytest.importorskip("tensorboard")
    os.environ["WANDB_MODE"] = "offline"
    try:
        first = json.loads(cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "4",
                               "--checkpoint-interval", "2", "--wandb-log", "--wandb-project", "test", "--tensorboard",
                               "--log-gradients", "2", "--json", home=gptctl_home).stdout)
        run_id = first["run_id"]
        cli("resume", run_id, "--max-steps", "6", home=gptctl_home)
    finally:
        del os.environ["WANDB_MODE"]
    run = json.loads(cli("runs", "show", run_id, "--json", home=gptctl_home).stdout)
    run_dir = Path(run["run_dir"])
    assert run["wandb_run_id"] == run_id  # resuming continues the same W&B run

    # W&B: both segments write offline files of the one run, and they carry the metrics.
    segments = sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(segments) == 2
    for segment in segments:
        data = (segment / f"run-{run_id}.wandb").read_bytes()
        assert b"train/loss" in data and b"grad_norm/transformer.h.0.attn.c_attn.weight" in data

    # TensorBoard: every step once, the same values as the registry.
    registry = losses(gptctl_home, run_id)
    tb = tensorboard_scalars(run_dir, "train/loss")
    assert sorted(tb) == list(range(1, 7))
    assert all(tb[s] == pytest.approx(registry[s][0], rel=1e-6) for s in tb)

    # Gradient statistics: every second step, every parameter, with a plausible update/weight ratio.
    with sqlite3.connect(gptctl_home / "gptctl.db") as conn:
        rows = conn.execute("select step, name, grad_norm, update_ratio from grad_stats where run_id = ?", [run_id]).fetchall()
    assert sorted({r[0] for r in rows}) == [2, 4, 6]
    names = {r[1] for r in rows if r[0] == 2}
    assert "transformer.h.0.attn.c_attn.weight" in names and "transformer.wte.weight" in names
    assert all(r[2] >= 0 for r in rows) and any(r[2] > 0 for r in rows)
    matrices = [r for r in rows if r[1].endswith(("c_attn.weight", "c_fc.weight", "wte.weight"))]
    assert matrices and all(0 < r[3] < 1 for r in matrices), matrices  # a step moves a matrix by a fraction of itself


@pytest.mark.slow
def test_hellaswag_during_training_and_debug_timing(shakespeare, gptctl_home, tmp_path):
    from test_eval import write_items

    items = write_items(tmp_path / "hellaswag.jsonl")
    args = ["--max-steps", "4", "--hellaswag-interval", "2", "--hellaswag-file", str(items)]
    proc = cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), *args, "--log-level", "debug", "--json",
               home=gptctl_home)
    run_id = json.loads(proc.stdout)["run_id"]
    with sqlite3.connect(gptctl_home / "gptctl.db") as conn:
        acc = dict(conn.execute("select step, hellaswag_acc from metrics where run_id = ? and hellaswag_acc is not null",
                                [run_id]).fetchall())
    assert sorted(acc) == [2, 4] and all(0 <= a <= 1 for a in acc.values())
    assert "timing: data" in proc.stderr and "forward/backward" in proc.stderr and "checkpoint" in proc.stderr
    # On two processes (forked from this one) each scores its share of the items: the same accuracy.
    rows, _ = train_in_processes(2, shakespeare, tmp_path / "two", fields=("hellaswag_acc",), max_steps=4,
                                 batch_size=2, hellaswag_interval=2, hellaswag_file=items)
    assert {step: a for step, (a,) in rows.items() if a is not None} == acc
