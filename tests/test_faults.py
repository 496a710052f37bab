"""Real faults against real training runs: SIGKILL at random moments and in the middle of a save,
a full disk, two trainers for one run, pruning and reading while a run trains.

Every faulted run must end with the same loss and val loss at every step, to the last bit, as one
undisturbed run with the same settings, and with no registered checkpoint missing or corrupt.
"""

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from helpers import TINY_RUN, cli, gptctl, losses, only_run_id, train_in_process, wait_until
from gptctl.digest import sha256_of

pytestmark = pytest.mark.slow

# A save every 2 steps gives a kill many moments to land in: a step, a save, retention, a metrics flush.
ARGS = [*TINY_RUN, "--max-steps", "30", "--checkpoint-interval", "2"]
TAG = "GPTCTL_FAULTS_TEST_TAG"  # inherited by the launcher, torchrun and every worker: how we find them all


@pytest.fixture(scope="module", autouse=True)
def one_thread_per_worker():
    """One intra-op thread per worker: on 2 cores shared with other jobs, torch's thread pool makes
    each step several times slower. Every run of this module, the reference too, uses the same."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def reference(shakespeare, tmp_path_factory) -> dict[int, tuple]:
    """Every step's (loss, val loss) of one undisturbed run with ARGS: the Trainer in-process, which logs
    what a worker logs to the bit (test_train_e2e checks that)."""
    # Saving changes nothing a step computes: one checkpoint at the end instead of every 2 steps.
    rows, _ = train_in_process(shakespeare, tmp_path_factory.mktemp("reference"), max_steps=30, checkpoint_interval=30)
    return rows


def start(home: Path, *args: str, log: Path, **env: str) -> subprocess.Popen:
    """`gptctl ARGS` in a session of its own, as a user's shell would run it; output goes to `log`."""
    tag = uuid.uuid4().hex
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "gptctl", *args], stdout=out, stderr=out, start_new_session=True,
                                env={**os.environ, "GPTCTL_HOME": str(home), TAG: tag, **env})
    proc.tag = tag
    return proc


def _tagged(tag: str) -> list[int]:
    marker = f"{TAG}={tag}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and marker in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                pids.append(int(entry))
        except OSError:  # exited meanwhile, or a zombie
            pass
    return pids


def kill_all(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher's process group, then torchrun and the workers (each in a session of its
    own), as a machine failure would; returns once none of them is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    deadline = time.time() + 30
    while pids := _tagged(proc.tag):
        assert time.time() < deadline, f"processes {pids} survived SIGKILL"
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.05)


def query(home: Path, sql: str, params=()) -> list[tuple]:
    """Read the registry as an outsider, without a lock or a write; [] while it does not exist yet."""
    try:
        with sqlite3.connect(f"file:{home / 'gptctl.db'}?mode=ro", uri=True, timeout=30) as conn:
            return conn.execute(sql, params).fetchall()
    except sqlite3.OperationalError:  # not created or not migrated yet
        return []


def newest_checkpoint(home: Path, name: str) -> int:
    rows = query(home, "select max(c.step) from checkpoints c join runs r on r.id = c.run_id"
                       " where c.state = 'valid' and r.name = ?", [name])
    return (rows[0][0] if rows else None) or 0


def wait_for(condition, proc: subprocess.Popen, what: str, timeout: float = 180):
    """condition()'s value while the run trains; None if the run ended first."""
    return wait_until(condition, what, timeout, proc=proc, proc_may_end=True)


def completed(home: Path, run_id: str) -> bool:
    return bool(query(home, "select 1 from runs where id = ? and status = 'completed'", [run_id]))


def checkpoint_states(home: Path, run_id: str) -> dict[int, str]:
    return dict(query(home, "select step, state from checkpoints where run_id = ? order by step", [run_id]))


def assert_all_checkpoints_verify(home: Path, run_id: str) -> list[dict]:
    report = json.loads(cli("ckpt", "verify", "--run", run_id, "--json", home=home).stdout)
    assert report and all(r["state"] == "valid" for r in report), report
    return report


def test_random_sigkills_then_resume_is_bit_exact(shakespeare, gptctl_home, reference, tmp_path):
    seed = int(os.environ.get("GPTCTL_SOAK_SEED", random.randrange(2**32)))
    print(f"soak seed {seed}: rerun this case with GPTCTL_SOAK_SEED={seed}")
    rng = random.Random(seed)
    args = ["pretrain", *ARGS, "--data-root", str(shakespeare), "--run-name", "soak", "--auto-resume"]
    kills, newest = [], 0
    # "startup": while the launcher, torchrun or the workers start and load the checkpoint;
    # "training": after the run made progress, somewhere in the steps, saves and retention that follow.
    for moment in ("training", "startup", "training", "training", "training"):
        proc = start(gptctl_home, *args, log=tmp_path / "soak.log")
        if moment == "startup":  # a moment of the start-up, or at the latest its first new checkpoint
            kill_at = time.time() + rng.uniform(0.5, 8.0)
            wait_for(lambda: time.time() >= kill_at or newest_checkpoint(gptctl_home, "soak") > newest, proc,
                     "the start-up")
        elif wait_for(lambda: newest_checkpoint(gptctl_home, "soak") > newest, proc, "a new checkpoint"):
            time.sleep(rng.uniform(0.0, 0.3))  # a save cycle (2 steps, a save, retention) is about 0.3 s
        if proc.poll() is not None:
            break  # the run finished first
        kill_all(proc)
        newest = newest_checkpoint(gptctl_home, "soak")
        kills.append((moment, newest))
        if completed(gptctl_home, only_run_id(gptctl_home, "soak")):
            break  # killed after the workers recorded completion
    print(f"kills (moment, newest checkpoint after): {kills}")
    assert len(kills) >= 4, (kills, (tmp_path / "soak.log").read_text()[-3000:])

    run_id = only_run_id(gptctl_home, "soak")
    if not completed(gptctl_home, run_id):
        cli("resume", run_id, home=gptctl_home)  # right away: a dead trainer's lock is gone with it
    assert query(gptctl_home, "select count(*) from runs")[0][0] == 1  # every launch continued the one run
    shown = json.loads(cli("runs", "show", run_id, "--json", home=gptctl_home).stdout)
    assert shown["status"] == "completed" and shown["step"] == 30
    assert losses(gptctl_home, run_id) == reference
    assert_all_checkpoints_verify(gptctl_home, run_id)


def test_sigkill_while_a_checkpoint_is_being_written(shakespeare, gptctl_home, reference, tmp_path):
    # The save of step 4 stalls after its first bytes; step 2's save is a normal one.
    proc = start(gptctl_home, "pretrain", *ARGS, "--data-root", str(shakespeare), "--run-name", "midsave",
                 log=tmp_path / "midsave.log", GPTCTL_TEST_SLOW_SAVE="120", GPTCTL_TEST_FAULT_FROM_STEP="4")
    partial = wait_for(lambda: list(gptctl_home.glob("midsave-*/checkpoints/.tmp-model_00004.pt.*")), proc,
                       "the step-4 save")
    assert partial, (tmp_path / "midsave.log").read_text()[-3000:]
    run_id = only_run_id(gptctl_home, "midsave")
    ckpt_dir = partial[0].parent
    # A reader looking meanwhile leaves a live trainer's temporary file alone and does not list it.
    listed = json.loads(cli("ckpt", "list", "--run", run_id, "--json", home=gptctl_home).stdout)
    assert [c["step"] for c in listed] == [2] and partial[0].exists()
    kill_all(proc)

    complete = ckpt_dir / "model_00002.pt"
    assert 0 < partial[0].stat().st_size < complete.stat().st_size  # really cut off mid-write
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [partial[0].name, "model_00002.pt"]  # no name for it
    assert checkpoint_states(gptctl_home, run_id) == {2: "valid"}  # nor a row
    listing = cli("ckpt", "list", "--run", run_id, home=gptctl_home)  # no trainer now: the leftover goes
    assert "removed leftover" in listing.stderr and not partial[0].exists()

    proc = cli("resume", run_id, home=gptctl_home)
    assert "resuming from step 2" in proc.stderr
    assert losses(gptctl_home, run_id) == reference
    assert_all_checkpoints_verify(gptctl_home, run_id)


def test_disk_full_during_a_save_fails_cleanly_then_resume_completes(shakespeare, gptctl_home, reference,
                                                                     monkeypatch, tmp_path):
    monkeypatch.setenv("GPTCTL_TEST_FAIL_SAVE_AFTER_BYTES", "1000000")  # the disk fills 1 MB into a save...
    monkeypatch.setenv("GPTCTL_TEST_FAULT_FROM_STEP", "4")  # ...of step 4; step 2's save fits
    proc = cli("pretrain", *ARGS, "--data-root", str(shakespeare), "--run-name", "full", "--json",
               home=gptctl_home, check=False)
    monkeypatch.delenv("GPTCTL_TEST_FAIL_SAVE_AFTER_BYTES")
    assert proc.returncode != 0
    assert "No space left on device" in proc.stderr
    run_id = json.loads(proc.stdout)["run_id"]
    shown = json.loads(cli("runs", "show", run_id, "--json", home=gptctl_home).stdout)
    assert shown["status"] == "failed"
    assert "could not write the checkpoint of step 4" in shown["error"] and "No space left on device" in shown["error"]
    ckpt_dir = Path(shown["run_dir"]) / "checkpoints"
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["model_00002.pt"]  # the temporary file is gone
    assert checkpoint_states(gptctl_home, run_id) == {2: "valid"}
    sha = query(gptctl_home, "select sha256 from checkpoints where run_id = ? and step = 2", [run_id])[0][0]
    assert sha256_of(ckpt_dir / "model_00002.pt") == sha  # the previous checkpoint is intact

    cli("resume", run_id, home=gptctl_home)
    assert losses(gptctl_home, run_id) == reference
    assert_all_checkpoints_verify(gptctl_home, run_id)

    # A registry row edited to point outside the run's directory: prune skips it and says so.
    outside = tmp_path / "model_00026.pt"
    outside.write_bytes(b"someone else's file")
    with sqlite3.connect(gptctl_home / "gptctl.db") as conn:
        conn.execute("update checkpoints set path = ? where run_id = ? and step = 26", [str(outside), run_id])
    proc = cli("ckpt", "prune", "--run", run_id, "--keep-last", "1", "--yes", home=gptctl_home)
    assert "not deleting step 26" in proc.stderr and "step 28" in proc.stdout
    assert outside.read_bytes() == b"someone else's file"
    assert checkpoint_states(gptctl_home, run_id)[28] == "deleted"


def test_one_trainer_per_run_while_readers_and_prune_work_alongside(shakespeare, gptctl_home, reference, tmp_path):
    # The trainer's own retention keeps everything, so what goes is prune's doing, and the step pinned
    # below cannot have gone before the pin.
    args = [*ARGS, "--data-root", str(shakespeare), "--run-name", "busy", "--permanent-checkpoints", "4",
            "--keep-last-n-checkpoints", "100"]
    # Slow saves stretch the run so that everything below happens while it trains.
    proc = start(gptctl_home, "pretrain", *args, log=tmp_path / "busy.log", GPTCTL_TEST_SLOW_SAVE="0.3")
    assert wait_for(lambda: newest_checkpoint(gptctl_home, "busy") >= 6, proc, "step 6"), \
        (tmp_path / "busy.log").read_text()[-3000:]
    run_id = only_run_id(gptctl_home, "busy")

    for second in (["resume", run_id], ["pretrain", *args, "--auto-resume"]):
        result = gptctl(*second, home=gptctl_home, check=False)
        output = [line for line in (result.stdout + result.stderr).splitlines() if line.strip()]
        assert result.returncode == 2 and len(output) == 1, result
        assert "being trained by another process" in output[0]
    assert query(gptctl_home, "select count(*) from runs")[0][0] == 1 and len(list(gptctl_home.glob("busy-*"))) == 1

    pinned = newest_checkpoint(gptctl_home, "busy")
    cli("ckpt", "pin", str(pinned), "--run", run_id, home=gptctl_home)
    failures, rounds, freed, stop = [], {"read": 0, "prune": 0}, [], threading.Event()

    def loop(kind: str, commands: list[list[str]]) -> None:
        while not stop.is_set():
            for command in commands:
                result = gptctl(*command, home=gptctl_home, check=False)
                if result.returncode != 0 or "locked" in result.stderr:
                    failures.append((command, result.returncode, result.stderr[-2000:]))
                elif "--json" in command:
                    json.loads(result.stdout)
                elif "freed" in result.stdout and "freed 0 B" not in result.stdout:
                    freed.append(result.stdout)
            rounds[kind] += 1

    threads = [
        threading.Thread(target=loop, args=("read", [["runs", "list", "--json"], ["ckpt", "list", "--run", run_id, "--json"],
                                                      ["runs", "show", run_id, "--json"], ["runs", "list"]])),
        threading.Thread(target=loop, args=("prune", [["ckpt", "prune", "--run", run_id, "--keep-last", "1", "--yes"]])),
    ]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: newest_checkpoint(gptctl_home, "busy") >= 20 and min(rounds.values()) >= 2, proc,
                 "readers and prune to run during training")
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert not failures, failures
    assert min(rounds.values()) >= 1, rounds
    if proc.poll() is None:
        kill_all(proc)  # and the lock goes with the dead trainer: resume starts at once
    if not completed(gptctl_home, run_id):
        cli("resume", run_id, home=gptctl_home)

    assert losses(gptctl_home, run_id) == reference
    states = checkpoint_states(gptctl_home, run_id)
    assert states[4] == states[pinned] == states[30] == "valid"  # permanent, pinned, newest
    assert freed, rounds  # prune deleted checkpoints while the trainer was saving new ones
    report = assert_all_checkpoints_verify(gptctl_home, run_id)
    assert {r["step"] for r in report} >= {4, pinned, 30}
