"""`gptctl runs logs`: a run's own log (train.log: steps, losses, LR, tokens/s, evals, saves and why it
stopped), its last lines, and new ones as they come until the run ends. Pure Python: no torch."""

import json
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path

LOG_NAME = "train.log"  # written by the run's rank 0 (engine/progress.py), appended by every launch
BLOCK = 1 << 16


def log_path(run: dict) -> Path:
    """Where the run writes its log: --log-dir, else its run directory."""
    log_dir = json.loads(run["settings"]).get("log_dir")
    return (Path(log_dir) if log_dir else Path(run["run_dir"])) / LOG_NAME


def last_lines(path: Path, count: int | None) -> tuple[list[str], int]:
    """The last `count` lines of `path` (all when None) and the offset its end had: following goes on from
    there. Read backwards block by block: a log of a two-week run is not read whole for its end."""
    try:
        with open(path, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            if count is None:
                f.seek(0)
                return _lines(f.read(end)), end
            data, position = b"", end
            while position > 0 and data.count(b"\n") <= count:
                step = min(BLOCK, position)
                position -= step
                f.seek(position)
                data = f.read(step) + data
    except FileNotFoundError:
        return [], 0
    lines = _lines(data)
    return (lines[-count:] if count else []), end


def follow(path: Path, offset: int, running: Callable[[], bool], poll_s: float = 0.5) -> Iterator[str]:
    """Lines appended to `path` from `offset` on, as they come, until `running()` says the run ended (the
    lines written up to then included). A line is handed out only once it ends."""
    partial = b""
    while True:
        still = running()  # asked before the read: the run's last lines are read after it ended
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_size < offset:
                    offset = 0  # replaced by a shorter file: read it from its start
                f.seek(offset)
                data = f.read()
                offset = f.tell()
        except FileNotFoundError:
            data = b""
        *ended, partial = (partial + data).split(b"\n")
        yield from (line.decode(errors="replace") for line in ended)
        if not still:
            if partial:
                yield partial.decode(errors="replace")
            return
        time.sleep(poll_s)


def _lines(data: bytes) -> list[str]:
    return data.decode(errors="replace").splitlines()
