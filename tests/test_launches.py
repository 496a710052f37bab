"""Deadlines, stop signals from SLURM, and a run's launches: what each start trained, redid and cost.

In-process where no process is needed (parsing, the Trainer's stop before a deadline, goodput over real
registry rows); one real-process test stops a run at its deadline and requeues it on two processes.
"""

import json
import os
import signal
import stat
import time
from datetime import datetime

import pytest
import torch

from helpers import RecordingCheckpointer, TINY_RUN, TINY_SETTINGS, add_run, cli, gptctl, only_run_id
from gptctl.cli import app
from gptctl.control import DEADLINE_EXIT_CODE
from gptctl.deadline import DEADLINE_ENV, MARGIN_ENV, launch_deadline, parse_deadline, slurm_end_time, worker_deadline
from gptctl.engine.distributed import Dist
from gptctl.engine.startup import StopFlag
from gptctl.engine.trainer import Trainer
from gptctl.registry import launches, open_registry
from gptctl.settings import TrainSettings

NOW = datetime(2026, 12, 3, 22, 30).astimezone().timestamp()


@pytest.mark.parametrize("text, seconds", [("90m", 5400), ("2h30m", 9000), ("1d12h", 129600), ("45s", 45),
                                           ("1h0m5s", 3605)])
def test_a_deadline_may_be_a_duration(text, seconds):
    assert parse_deadline(text, NOW) == NOW + seconds


def test_a_deadline_may_be_a_time_of_day_or_a_date_and_time():
    assert datetime.fromtimestamp(parse_deadline("23:00", NOW)).strftime("%d %H:%M") == "03 23:00"
    assert datetime.fromtimestamp(parse_deadline("06:00", NOW)).strftime("%d %H:%M") == "04 06:00"  # tomorrow's
    assert parse_deadline("2026-12-04T06:00", NOW) == datetime(2026, 12, 4, 6).astimezone().timestamp()
    assert parse_deadline("2026-12-04T06:00+00:00", NOW) == datetime.fromisoformat("2026-12-04T06:00+00:00").timestamp()


@pytest.mark.parametrize("text, why", [("0s", "already past"), ("-5m", "expected a duration"), ("inf", "expected"),
                                       ("nan", "expected"), ("1e9s", "expected"), ("400d", "more than a year"),
                                       ("99999999999999999999999h", "more than a year"), ("24:00", "not a time of day"),
                                       ("2026-12-01T00:00", "already past"), ("", "expected"), ("5 m", "expected")])
def test_a_bad_deadline_is_refused(text, why):
    with pytest.raises(ValueError, match=why):
        parse_deadline(text, NOW)


def test_a_bad_deadline_is_one_line_and_writes_nothing(runner, shakespeare, gptctl_home):
    result = runner.invoke(app, ["pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--deadline", "tomorrow"])
    assert result.exit_code == 2 and "--deadline: expected a duration" in result.output
    assert "Traceback" not in result.output and not gptctl_home.exists()


def test_a_printed_command_takes_no_deadline(runner, shakespeare, gptctl_home):
    """Its workers start later, without gptctl's launcher: a deadline would be silently lost."""
    result = runner.invoke(app, ["pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--deadline", "2h",
                                 "--print-command"])
    assert result.exit_code == 2 and "--deadline: not with --print-command" in result.output
    assert not gptctl_home.exists()


def test_the_slurm_jobs_end_is_a_deadline(tmp_path, monkeypatch):
    assert slurm_end_time({}) is None  # not in SLURM
    assert slurm_end_time({"SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "1795000000"}) == 1795000000.0
    # Older SLURM: the launcher asks squeue once (local time, as squeue prints it); workers never ask.
    squeue = tmp_path / "squeue"
    squeue.write_text("#!/bin/sh\n[ \"$3\" = 7 ] && echo 2026-12-04T06:00:00\n")
    squeue.chmod(squeue.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    env = {"SLURM_JOB_ID": "7"}
    assert slurm_end_time(env) is None
    six = datetime(2026, 12, 4, 6).astimezone().timestamp()
    assert slurm_end_time(env, ask_squeue=True) == six
    monkeypatch.setattr(os, "environ", {**os.environ, **env})
    assert launch_deadline(None) == six and launch_deadline(six - 60) == six - 60  # the earlier one
    squeue.write_text("#!/bin/sh\necho UNLIMITED\n")
    assert slurm_end_time(env, ask_squeue=True) is None


def test_workers_read_the_launch_deadline_and_margin():
    assert worker_deadline({}) == (None, 60.0)
    assert worker_deadline({DEADLINE_ENV: "1795000000.5", MARGIN_ENV: "0"}) == (1795000000.5, 0.0)  # 0 is a margin
    env = {DEADLINE_ENV: "1795000000", "SLURM_JOB_ID": "7", "SLURM_JOB_END_TIME": "1794999000"}
    assert worker_deadline(env)[0] == 1794999000.0
    assert worker_deadline({DEADLINE_ENV: "inf", MARGIN_ENV: "nan"}) == (None, 60.0)


def test_sigusr1_is_a_stop_request():
    """SLURM's warning before the time limit (#SBATCH --signal=USR1@120)."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    try:
        flag = StopFlag()
        flag.install()
        os.kill(os.getpid(), signal.SIGUSR1)
        assert flag.requested and flag.signum == signal.SIGUSR1
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_the_trainer_stops_and_saves_before_the_deadline(shakespeare):
    t = Trainer(TrainSettings(**{**TINY_SETTINGS, "data_root": shakespeare, "max_steps": 100_000,
                                 "checkpoint_interval": 100_000}), Dist(0, 0, 1, torch.device("cpu")),
                checkpointer=RecordingCheckpointer(),
                deadline=time.time() + 5.0, deadline_margin=2.0)  # a margin for a loaded machine's slower steps
    state = t.train()
    assert state.interrupted and state.stopped_by == "deadline" and 1 < state.step < 100_000
    assert time.time() < t.deadline  # it saved with time to spare: one step, one save and the margin
    assert t.checkpointer.steps == [state.step]
    assert t.clock.steps == state.step and t.clock.step_s > 0 and t.clock.saves == 1
    assert t.peak_memory() > 10 * 2**20  # a process's resident memory, in bytes


def test_a_deadline_already_too_close_still_trains_one_step(shakespeare):
    t = Trainer(TrainSettings(**{**TINY_SETTINGS, "data_root": shakespeare, "max_steps": 10}),
                Dist(0, 0, 1, torch.device("cpu")),
                deadline=time.time() + 1.0)  # less than the margin: stop after the first step (saved)
    assert t.train().step == 1


def _row(db, run_id, first, last, reason, step_s, started, took, saves=1, save_s=0.5):
    launch_id = launches.start(db, run_id, first, 1, started, "kill")
    launches.close(db, launch_id, reason, last_step=last, steps=last - first, step_s=step_s, saves=saves,
                   save_s=save_s, startup_s=2.0, peak_memory=2**30)
    db["launches"].update(launch_id, {"ended_at": started + took})
    return launch_id


def test_goodput_counts_only_kept_steps_and_suggests_an_interval(gptctl_home):
    db = open_registry(gptctl_home)
    add_run(db, "abcd0001")
    t = 1_000_000.0
    _row(db, "abcd0001", 0, 100, "crash", step_s=100.0, started=t, took=200)  # 100 s for 100 steps
    second = launches.start(db, "abcd0001", 80, 1, t + 300, "kill")  # resumed from 80: 20 steps redone
    assert db["launches"].get(second)["redone_steps"] == 20
    launches.close(db, second, "completed", last_step=200, steps=120, step_s=120.0, saves=2, save_s=1.0)
    db["launches"].update(second, {"ended_at": t + 500})
    usage = launches.goodput(launches.of_run(db, "abcd0001"))
    assert usage["wall_s"] == 400 and usage["useful_s"] == pytest.approx(80 + 120)  # 20 steps of the first lost
    assert usage["goodput"] == pytest.approx(0.5) and usage["redone_steps"] == 20 and usage["interruptions"] == 1
    assert usage["save_s"] == pytest.approx(0.5) and usage["mtbf_s"] == 400
    assert usage["suggested_interval_s"] == pytest.approx((2 * 0.5 * 400) ** 0.5)  # √(2·δ·M) = 20 s
    assert usage["suggested_interval_steps"] == 20  # at 1 s per step
    assert launches.goodput([]) is None


def test_a_start_closes_the_rows_that_died_with_their_processes(gptctl_home):
    db = open_registry(gptctl_home)
    add_run(db, "abcd0002")
    first = launches.start(db, "abcd0002", 0, 2, 1000.0, "kill")
    launches.update(db, first, last_step=30)
    heartbeat = db["launches"].get(first)["updated_at"]
    launches.start(db, "abcd0002", 24, 2, 2000.0, "crash")  # torchrun restarted a worker that died at step 30
    rows = launches.of_run(db, "abcd0002")
    assert (rows[0]["reason"], rows[0]["ended_at"]) == ("crash", heartbeat)  # it ended when last heard of
    assert rows[1]["reason"] is None and rows[1]["redone_steps"] == 6
    launches.close_open(db, "abcd0002", "kill")  # the launcher, after killing its workers
    assert launches.newest(db, "abcd0002")["reason"] == "kill"


@pytest.mark.slow
def test_a_deadline_stops_the_run_and_a_requeue_continues_it(shakespeare, gptctl_home):
    """The issue's deadline that forces a stop, then a requeue simulated by a second launch with other
    launch options; `runs show` tells both launches, goodput and peak memory."""
    t0 = time.time()
    proc = gptctl("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "100000",
                  "--checkpoint-interval", "100000", "--run-name", "timed", "--deadline", "20s",
                  "--deadline-margin", "0", home=gptctl_home, check=False)
    assert proc.returncode == DEADLINE_EXIT_CODE, proc.stderr
    assert "before the deadline, checkpoint saved" in proc.stderr
    run_id = only_run_id(gptctl_home, "timed")
    shown = json.loads(cli("runs", "show", run_id, "--json", home=gptctl_home).stdout)
    stopped = shown["last_step"]
    assert shown["status"] == "interrupted" and stopped > 1
    # The workers ended before the deadline (parsed after t0); the launcher's own exit is not timed: on a
    # loaded machine its start-up and summary alone can take seconds.
    assert shown["launches"][0]["ended_at"] < t0 + 22
    assert [c["step"] for c in shown["checkpoints"] if c["state"] == "valid"] == [stopped]

    # The requeue's own launch options (a longer stop timeout; two processes: test_train_e2e's
    # test_resume_on_two_processes_continues_a_one_process_run), in this process.
    cli("resume", run_id, "--stop-timeout", "120", "--max-steps", str(stopped + 2), home=gptctl_home)
    shown = json.loads(cli("runs", "show", run_id, "--json", home=gptctl_home).stdout)
    assert shown["status"] == "completed" and shown["last_step"] == stopped + 2
    starts = shown["launches"]
    assert [(r["reason"], r["world_size"], r["first_step"], r["last_step"]) for r in starts] == [
        ("deadline", 1, 0, stopped), ("completed", 1, stopped, stopped + 2)]
    assert all(r["startup_s"] > 0 and r["peak_memory"] > 0 for r in starts)
    assert 0 < shown["goodput"]["goodput"] < 1 and shown["goodput"]["redone_steps"] == 0
    text = cli("runs", "show", run_id, home=gptctl_home).stdout
    assert "1. deadline after" in text and "2. completed after" in text and "goodput:" in text
    assert "peak memory:" in text
