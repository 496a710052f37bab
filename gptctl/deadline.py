"""When a launch must have stopped: --deadline, or the end of the SLURM job it runs in.

A deadline is a wall-clock instant (seconds since the epoch). The workers stop before it with a margin
measured as they go (engine/trainer.py: one more step and one save, plus --deadline-margin), so that the
last checkpoint is written while the job still runs. Pure Python: the CLI parses deadlines before it
starts anything.
"""

import math
import os
import re
import shutil
import subprocess
import time
from datetime import datetime, timedelta

# Read by the workers: the launch's deadline (epoch seconds) and the headroom to keep before it.
DEADLINE_ENV = "GPTCTL_DEADLINE"
MARGIN_ENV = "GPTCTL_DEADLINE_MARGIN"

_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
_CLOCK = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}))?")
LONGEST = timedelta(days=366)  # a deadline further away than this is a typo, not a plan


def parse_deadline(text: str, now: float | None = None) -> float:
    """Epoch seconds of a deadline given as a duration from now (90m, 2h30m, 1d12h, 3600s), a time of
    day (06:00: the next one to come) or an ISO date and time (2026-12-04T06:00, local time unless it
    names its zone). ValueError, in the user's terms, for anything else or a time already past."""
    now = time.time() if now is None else now
    text = text.strip()
    start = datetime.fromtimestamp(now).astimezone()
    if text and (match := _DURATION.fullmatch(text)) and any(match.groups()):
        days, hours, minutes, seconds = (int(g or 0) for g in match.groups())
        seconds += 60 * minutes + 3600 * hours + 86400 * days  # in Python's integers: no overflow
        if not seconds:
            raise ValueError("a deadline of zero is already past")
        if seconds > LONGEST.total_seconds():
            raise ValueError(f"{text!r} is more than a year away")
        return now + seconds
    if match := _CLOCK.fullmatch(text):
        hour, minute, second = (int(g or 0) for g in match.groups())
        if hour > 23 or minute > 59 or second > 59:
            raise ValueError(f"{text!r} is not a time of day")
        at = start.replace(hour=hour, minute=minute, second=second, microsecond=0)
        return (at if at > start else at + timedelta(days=1)).timestamp()
    try:
        at = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"expected a duration (90m, 2h30m, 1d), a time of day (06:00) or a date and time "
                         f"(2026-12-04T06:00); got {text!r}") from None
    if at.tzinfo is None:
        at = at.astimezone()  # a naive time is local time
    if at <= start:
        raise ValueError(f"{text} is already past")
    if at - start > LONGEST:
        raise ValueError(f"{text!r} is more than a year away")
    return at.timestamp()


def slurm_end_time(env: dict[str, str] | None = None, ask_squeue: bool = False) -> float | None:
    """The end of the SLURM job this process runs in (epoch seconds), or None outside one or when unknown.
    SLURM_JOB_END_TIME where SLURM sets it (recent versions); else, if `ask_squeue`, squeue's answer
    (the launcher asks once; workers never do, so that a node's GPUs do not all query slurmctld)."""
    env = os.environ if env is None else env
    if "SLURM_JOB_ID" not in env:
        return None
    value = env.get("SLURM_JOB_END_TIME", "")
    if value.isdigit() and int(value) > 0:
        return float(value)
    if not ask_squeue or shutil.which("squeue") is None:
        return None
    try:
        out = subprocess.run(["squeue", "-h", "-j", env["SLURM_JOB_ID"], "-o", "%e"], capture_output=True,
                             text=True, timeout=10).stdout.strip()
        return datetime.fromisoformat(out).astimezone().timestamp()  # squeue prints local time
    except (OSError, subprocess.SubprocessError, ValueError):  # "N/A", "UNLIMITED", no answer
        return None


def launch_deadline(deadline: float | None, env: dict[str, str] | None = None) -> float | None:
    """The earlier of --deadline and the SLURM job's end."""
    ends = [t for t in (deadline, slurm_end_time(env, ask_squeue=True)) if t is not None]
    return min(ends) if ends else None


def worker_deadline(env: dict[str, str] | None = None) -> tuple[float | None, float]:
    """(deadline, margin seconds) for a worker: the launcher's, or inside SLURM the job's end."""
    env = os.environ if env is None else env
    ends = [t for t in (_float(env.get(DEADLINE_ENV)), slurm_end_time(env)) if t is not None]
    margin = _float(env.get(MARGIN_ENV))
    return (min(ends) if ends else None), (DEFAULT_MARGIN if margin is None else margin)


DEFAULT_MARGIN = 60.0  # --deadline-margin's default


def _float(value: str | None) -> float | None:
    try:
        number = float(value) if value else None
        return number if number is not None and math.isfinite(number) else None
    except ValueError:
        return None
