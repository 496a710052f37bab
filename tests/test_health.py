"""Run health: non-finite steps never reach the weights, spikes and NaN streaks roll back or stop the run."""

import json

import pytest
import torch

from helpers import RecordingCheckpointer, TINY_RUN, TINY_SETTINGS, cli, losses, only_run_id
from gptctl.checkpoints import files as ckpt
from gptctl.engine.distributed import Dist
from gptctl.engine.health import Health
from gptctl.engine.trainer import Metrics, Trainer
from gptctl.checkpoints.retention import deletable
from gptctl.settings import TrainSettings

CPU = Dist(0, 0, 1, torch.device("cpu"))
DIVERGING = dict(max_lr=1e4, grad_clip=0, weight_decay=0, warmup_steps=5, max_steps=60)


class Events(Metrics):
    def __init__(self):
        self.events, self.rewinds = [], []

    def event(self, step, kind, detail):
        self.events.append((step, kind, detail))

    def rewind(self, step, reached):
        self.rewinds.append(step)


def trainer(data, metrics=None, checkpointer=None, **overrides) -> Trainer:
    return Trainer(TrainSettings(**{**TINY_SETTINGS, "data_root": data, **overrides}), CPU, metrics=metrics,
                   checkpointer=checkpointer)


def test_health_judges_spikes_against_the_moving_average_and_counts_nan_streaks():
    h = Health(spike_factor=2.0, streak=3)
    assert all(h.observe(loss, True) is None for loss in (10.8, 9.0, 7.5, 6.0, 5.5))  # falling: never a spike
    assert "spiked above 2" in h.observe(40.0, True)
    assert h.observe(float("nan"), False) is None and h.observe(float("inf"), False) is None
    assert h.observe(5.0, True) is None  # a finite step ends the streak
    assert [h.observe(float("nan"), False) for _ in range(3)][-1] == "3 non-finite steps in a row"
    assert h.skipped == 5
    again = Health(2.0, 3)
    again.load_state_dict(json.loads(json.dumps(h.state_dict())))  # plain numbers: a checkpoint carries them
    assert again == h


def test_a_huge_learning_rate_never_puts_nan_into_the_weights_and_stops_the_run(shakespeare):
    t = trainer(shakespeare, metrics=Events(), on_divergence="stop", **DIVERGING)
    state = t.train()
    assert state.diverged and state.step < 60 and "at step" in state.diverged
    assert any(r.get("skipped") for r in state.history)  # non-finite steps were skipped, not applied
    assert all(torch.isfinite(p).all() for p in t.raw_model.parameters())
    assert t.metrics.events[-1][1] == "diverged"


def test_a_spike_rolls_back_to_the_newest_healthy_checkpoint_and_skips_its_data(shakespeare, tmp_path, monkeypatch):
    clean = trainer(shakespeare, max_steps=12, checkpoint_interval=4).train()
    monkeypatch.setenv("GPTCTL_TEST_SPIKE_POSITIONS", "7")  # the batches of step 7 make the loss spike
    t = trainer(shakespeare, metrics=Events(), checkpointer=RecordingCheckpointer(tmp_path), max_steps=12,
                checkpoint_interval=4)
    state = t.train()
    assert state.diverged is None and state.step == 12 and state.rollbacks == 1 and state.data_offset == 3
    assert [(s, k) for s, k, _ in t.metrics.events] == [(7, "spike"), (4, "rollback")] and t.metrics.rewinds == [4]
    facts = [(r["step"], r["loss"]) for r in state.history]
    assert [s for s, _ in facts] == list(range(1, 13))
    assert facts[:4] == [(r["step"], r["loss"]) for r in clean.history[:4]]  # before the rollback: the same run
    assert facts[4][1] != clean.history[4]["loss"]  # step 5 now reads step 8's batches
    saved = ckpt.load(t.checkpointer.paths[12])["loop"]
    assert saved["data_offset"] == 3 and saved["rollbacks"] == 1  # a resume goes on skipping the same data


def test_a_rollback_that_diverges_again_goes_further_back_then_stops(shakespeare, tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCTL_TEST_SPIKE_POSITIONS", ",".join(str(p) for p in range(7, 40)))  # bad data everywhere
    t = trainer(shakespeare, metrics=Events(), checkpointer=RecordingCheckpointer(tmp_path), max_steps=12,
                checkpoint_interval=2, max_rollbacks=5)
    state = t.train()
    # Rolled back to 6; diverged again from it: 6 is distrusted, back to 4, then 2; then none is left.
    assert [s for s, k, _ in t.metrics.events if k == "rollback"] == [6, 4, 2] and t.checkpointer.distrusted == [6, 4, 2]
    assert state.diverged.endswith("at step 3 (no healthy checkpoint to roll back to)")
    assert state.rollbacks == 3 and all(torch.isfinite(p).all() for p in t.raw_model.parameters())


@pytest.mark.parametrize("newest_health", ["healthy", "unhealthy: diverged again"])
def test_retention_counts_healthy_checkpoints_and_keeps_the_newest_healthy(newest_health):
    rows = [{"step": s, "state": "valid", "pinned": 0, "path": f"/c/{s}.pt", "health": h}
            for s, h in ((2, None), (4, "healthy"), (6, "unhealthy: diverged again"), (8, newest_health))]
    kept = {r["step"] for r in rows} - {r["step"] for r in deletable(rows, keep_last=1, permanent=set(), protected_paths=set())}
    # keep-last 1 keeps the newest healthy one and never the newest valid less; unhealthy ones do not count.
    assert kept == ({8} if newest_health == "healthy" else {4, 8})


@pytest.mark.slow
def test_the_issues_diverging_run_ends_diverged_and_keeps_its_last_good_checkpoint(shakespeare, gptctl_home):
    """The fault review's reproduction: a huge LR with a checkpoint every 2 steps and keep-last 1 completed
    with exit 0, its NaN checkpoints registered as valid. Now: status diverged, exit 3, one line."""
    proc = cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "60", "--checkpoint-interval",
               "2", "--keep-last-n-checkpoints", "1", "--max-lr", "1e4", "--grad-clip", "0", "--weight-decay", "0",
               "--warmup-steps", "5", "--run-name", "boom", "--json", home=gptctl_home, check=False)
    assert proc.returncode == 3, proc.stderr
    shown = json.loads(cli("runs", "show", "boom", "--json", home=gptctl_home).stdout)
    assert shown["status"] == "diverged" and shown["error"].startswith("the run diverged: ")
    assert [l for l in proc.stderr.splitlines() if l.startswith("error: the run diverged")]
    assert any(e["kind"] == "diverged" for e in shown["events"])
    for c in (c for c in shown["checkpoints"] if c["state"] == "valid"):
        state = ckpt.load(c["path"])
        assert all(torch.isfinite(t).all() for t in state["model"].values())


@pytest.mark.slow
def test_a_spike_in_a_real_run_rolls_back_and_the_run_completes(shakespeare, gptctl_home, monkeypatch):
    monkeypatch.setenv("GPTCTL_TEST_SPIKE_POSITIONS", "6")  # inherited by the launcher, torchrun and the worker
    proc = cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "10", "--checkpoint-interval",
               "4", "--run-name", "bump", "--json", home=gptctl_home)
    assert json.loads(proc.stdout)["status"] == "completed"
    shown = json.loads(cli("runs", "show", "bump", "--json", home=gptctl_home).stdout)
    assert [(e["step"], e["kind"]) for e in shown["events"]] == [(6, "spike"), (4, "rollback")]
    assert sorted(losses(gptctl_home, only_run_id(gptctl_home, "bump"))) == list(range(1, 11))
    human = cli("runs", "show", "bump", home=gptctl_home).stdout
    assert "step 4 rollback: loss" in human and "skipping 2 steps of data" in human
    listing = cli("ckpt", "list", "--run", "bump", home=gptctl_home).stdout
    assert "healthy" in listing
