"""`--detach`: a training command that goes on in the background, free of the terminal that started it.

The command runs again, as itself, in a new session (no controlling terminal, so closing the terminal
or logging out sends it no SIGHUP) with stdin closed. Until its workers are about to start it writes to
this terminal as usual, so every check and refusal reads exactly as without --detach and the start-up
exit code is passed on. At that point it moves its console output into the run directory and tells
this process which run it trains, over a pipe; this process says so and returns at once.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

DETACH_ENV = "GPTCTL_DETACH_FD"  # the pipe to report the run on; set only in the detached process
POLL_SECONDS = 0.2
CONSOLE_LOG = "console.log"  # the detached launcher's own output (its workers' lines are in train.log too)


def start_detached(argv: list[str], waiting: Callable[[dict[str, Any]], None] = lambda run: None
                   ) -> tuple[int, dict[str, Any] | None]:
    """Run `gptctl ARGV` (without --detach) detached; wait until it trains or ends.

    Returns (0, the run) once its workers train; (its exit code, the run with its final "status") when it
    ended before they did: "interrupted" when stopped meanwhile (`gptctl runs stop --now`, a signal), else
    failed to start; (its exit code, None) when it ended before creating or taking the run (a refusal:
    said on this terminal)."""
    read_end, write_end = os.pipe()
    try:
        child = subprocess.Popen(
            [sys.executable, "-m", "gptctl", *[a for a in argv if a != "--detach"]],
            env={**os.environ, DETACH_ENV: str(write_end)}, pass_fds=(write_end,),
            stdin=subprocess.DEVNULL, start_new_session=True,
        )
    finally:
        os.close(write_end)  # the child's copy is the only one left: EOF once it reports or exits
    try:
        with os.fdopen(read_end, "rb") as pipe:
            report = pipe.read()
    except KeyboardInterrupt:  # still starting: a Ctrl-C here is meant for it, which no terminal reaches now
        child.send_signal(signal.SIGINT)
        return child.wait(), None
    if not report:
        return child.wait(), None
    run = json.loads(report)
    waiting(run)
    code, status = _until_training(child, run)
    return code, run if code == 0 else {**run, "status": status}


def _until_training(child: subprocess.Popen, run: dict[str, Any]) -> tuple[int, str | None]:
    """(0, None) once the workers record that they train; else the launcher's exit code when it ends first,
    and the run's status then (stopped, or torchrun or the workers failed to start: their lines are in
    the console log)."""
    from gptctl.paths import home_dir
    from gptctl.registry import open_registry, queries

    db = open_registry(home_dir(), create=False, check_home=False)
    try:
        while child.poll() is None:
            if queries.get_run(db, run["run_id"])["status"] in ("running", "completed"):
                return 0, None
            time.sleep(POLL_SECONDS)  # created, or failed/interrupted at start: wait for the launcher's end
    except KeyboardInterrupt:
        return 0, None  # it goes on starting in the background; this terminal only stopped waiting
    code, status = child.returncode, queries.get_run(db, run["run_id"])["status"]
    if code == 0 and status in ("running", "completed"):
        return 0, None  # it trained, and ended between two looks
    return code or 1, status


def hand_off(run: dict[str, Any], run_dir: Path) -> None:
    """In the detached process, just before its workers start: move the console into the run directory
    and report the run to the process that started it. Does nothing in a process not started by `start_detached`."""
    fd = os.environ.pop(DETACH_ENV, None)
    if fd is None:
        return
    log = run_dir / CONSOLE_LOG
    sys.stdout.flush()
    sys.stderr.flush()
    out = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    report = {"run_id": run["id"], "name": run["name"], "run_dir": str(run_dir), "pid": os.getpid(),
              "console_log": str(log)}
    os.write(int(fd), json.dumps(report).encode())
    os.close(int(fd))


def detached() -> bool:
    """Whether this process is a detached command that has not started its workers yet."""
    return DETACH_ENV in os.environ
