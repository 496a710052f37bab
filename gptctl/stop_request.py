"""A stop asked of a run from any terminal or node of its home (`gptctl runs stop`): a file in the run's
directory, not a signal to a process id that only one host knows.

The file counts the requests. gptctl's launcher (launch.run_workers) takes each new one as the SIGTERM
it would have received: the first stops the run after the step, saved (the same path as a signal);
a second (or `--now`, which asks twice at once) kills the workers without the save. Workers started by
a bare torchrun (a job script's `--print-command`) have no launcher: their rank 0 looks at the file
itself, and takes a request as a first signal. Whoever starts a launch clears the file first, so that
a request made of an earlier launch never stops a later one. Pure Python: no torch.
"""

import json
import os
import socket
import time
from pathlib import Path

from gptctl.atomic import write_text_atomic

STOP_FILE = "stop-request.json"
LOOK_EVERY_S = 1.0  # a stat a second costs nothing, even on a network filesystem
MERGE_S = 2 * LOOK_EVERY_S  # plain requests this close together are one


def ask(run_dir: Path, now: bool = False) -> int:
    """Record a stop request; returns how many the launch has had (2 or more: stop now, without saving).

    A plain request within MERGE_S of the one before is the same request (two `runs stop` typed at
    once in two terminals mean one SIGTERM, not two); later, or with `now`, it is one more."""
    count, at = _read(run_dir)
    recent = count > 0 and time.time() - at < MERGE_S
    count = max(count, 1) + 1 if now else count if recent else count + 1
    write_text_atomic(run_dir / STOP_FILE, json.dumps(
        {"requests": count, "at": time.time(), "by": f"pid {os.getpid()} on {socket.gethostname()}"}) + "\n")
    return count


def requests(run_dir: Path) -> int:
    """How many stops have been asked of the run's current launch (0: none)."""
    return _read(run_dir)[0]


def _read(run_dir: Path) -> tuple[int, float]:
    """(requests, when the last was made); a file there, however damaged, is one request of long ago."""
    try:
        info = json.loads((run_dir / STOP_FILE).read_text())
    except FileNotFoundError:
        return 0, 0.0
    except (OSError, ValueError):
        return 1, 0.0
    if not isinstance(info, dict):
        return 1, 0.0
    count, at = info.get("requests", 1), info.get("at", 0.0)
    return (count if isinstance(count, int) and count > 0 else 1), (at if isinstance(at, (int, float)) else 0.0)


def clear(run_dir: Path) -> None:
    """A new launch (its lock just taken): requests made of an earlier one do not stop it."""
    (run_dir / STOP_FILE).unlink(missing_ok=True)


class Watch:
    """A look at a run's requests at most every LOOK_EVERY_S seconds; `new()` is how many arrived since."""

    def __init__(self, run_dir: Path):
        self.run_dir, self.seen, self.next_look = run_dir, 0, 0.0

    def new(self) -> int:
        now = time.monotonic()
        if now < self.next_look:
            return 0
        self.next_look = now + LOOK_EVERY_S
        count = requests(self.run_dir)
        arrived, self.seen = max(count - self.seen, 0), max(count, self.seen)
        return arrived


def stop_run(db, run: dict, now: bool = False, wait: bool = True, poll_s: float = 0.5,
             asked=lambda count: None) -> dict:
    """`gptctl runs stop`: ask a live run to stop (twice with `now`), and with `wait` return its row once its
    launcher has let go of it. Refused (UserError) when the run is not being trained."""
    from gptctl.errors import UserError
    from gptctl.registry import queries
    from gptctl.registry.locks import run_is_locked

    run_dir = Path(run["run_dir"])
    if run["status"] not in queries.ACTIVE:
        raise UserError(f"run {run['id']} ({run['name']}) is not running: it is {run['status']} at step "
                        f"{run['last_step'] or 0}; nothing to stop")
    count = ask(run_dir, now)
    queries.add_event(db, run["id"], run["last_step"], "stop",
                      f"`gptctl runs stop{' --now' if now else ''}` from {socket.gethostname()}: "
                      + ("stop now, without saving the step" if count > 1 else "finish the step, save it and stop"))
    asked(count)
    if not wait:
        return run
    while True:
        row = queries.refresh_status(db, queries.get_run(db, run["id"]))
        if row["status"] not in queries.ACTIVE and not run_is_locked(run_dir):
            return row
        time.sleep(poll_s)
