"""A failed worker ends in one line of gptctl's naming the run's launcher.log, where torchrun's report
of it (about 30 lines: ChildFailedError, a traceback of torchrun's own) and the workers' error output go.
Real torchrun launches that fail for real: a full disk at a save, a shard truncated under a running worker."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import TINY_RUN, gptctl, only_run_id, wait_until
from gptctl.launch import PlainLines

TORCHRUN_NOISE = ("ChildFailedError", "Traceback", "torch/distributed", "Root Cause", "=====")


def failure_lines(stderr: str, log: Path) -> list[str]:
    """The lines of stderr that name the log; none of torchrun's report is on it."""
    for noise in TORCHRUN_NOISE:
        assert noise not in stderr, stderr
    return [line for line in stderr.splitlines() if str(log) in line]


@pytest.mark.slow
def test_a_full_disk_at_a_save_ends_in_one_line_naming_the_log(shakespeare, gptctl_home, monkeypatch):
    monkeypatch.setenv("GPTCTL_TEST_FAIL_SAVE_AFTER_BYTES", "1000000")  # the disk fills 1 MB into the save
    proc = gptctl("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "3", "--run-name", "full",
                  home=gptctl_home, check=False)
    assert proc.returncode == 1
    log = next(gptctl_home.glob("full-*")) / "launcher.log"
    assert failure_lines(proc.stderr, log) == [f"the workers failed (a worker exited with code 1); the details are in {log}"]
    assert "could not write the checkpoint of step 3" in proc.stderr  # the worker's own words stay on the terminal
    report = log.read_text()
    assert "ChildFailedError" in report and "exitcode  : 1" in report, report


@pytest.mark.slow
def test_a_worker_killed_by_a_truncated_shard_ends_in_one_line_naming_the_log(shakespeare, gptctl_home, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for path in shakespeare.iterdir():
        (data / path.name).write_bytes(path.read_bytes())
    out = tmp_path / "out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "gptctl", "pretrain", *TINY_RUN, "--data-root", str(data),
                                 "--max-steps", "400", "--run-name", "cut"], stdout=sink, stderr=sink,
                                env={**os.environ, "GPTCTL_HOME": str(gptctl_home)})
    wait_until(lambda: any("step 2/" in log.read_text() for log in gptctl_home.glob("cut-*/train.log")), "step 2",
               proc=proc, interval=0.02, details=out.read_text)
    # Another job rewrites the data under the run: the worker's memory-mapped shard loses its pages.
    os.truncate(next(data.glob("*_train_*.npy")), 0)
    assert proc.wait(timeout=120) == 1
    log = gptctl_home / f"cut-{only_run_id(gptctl_home, 'cut')}" / "launcher.log"
    stderr = out.read_text()
    assert failure_lines(stderr, log) == [f"the workers failed (a worker was killed by SIGBUS); the details are in {log}"]
    assert "Signal 7 (SIGBUS)" in log.read_text()


def test_a_terminal_stream_becomes_the_lines_it_shows():
    """What the workers drew on a terminal that went away reaches the log as plain lines: colours
    dropped, and a progress bar, redrawn after carriage returns, only as it was left."""
    plain = PlainLines()
    bar = b"\r\x1b[2K\x1b[1mtrain\x1b[0m \x1b[90m\xe2\x94\x81\x1b[0m \x1b[32m  %d/400\x1b[0m"
    stream = (b"\x1b[?25l" + bar % 0 + b"\r\x1b[2Krun 1 \x1b[1m(\x1b[0mx\x1b[1m)\x1b[0m: on cpu\n" + bar % 1
              + bar % 2 + b"\r\x1b[2Kstep 2 finished: saving\n" + bar % 2 + b"\n\x1b[?25h" + b"stopped at step 2\n")
    shown = b"".join(plain.feed(stream[i:i + 7]) for i in range(0, len(stream), 7))  # in pieces, as a pipe gives
    assert shown.decode().splitlines() == ["run 1 (x): on cpu", "step 2 finished: saving", "train ━   2/400",
                                           "stopped at step 2"]
    for _ in range(10000):  # redrawn for a week, the bar holds one line's memory
        plain.feed(bar % 3)
    assert len(plain.partial) < 100
