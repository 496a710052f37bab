"""The registry's view of checkpoint files on disk: hashing and verification, no torch needed."""

import hashlib
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from gptctl.registry.queries import checkpoints_of, mark_checkpoint


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            sha.update(chunk)
    return sha.hexdigest()


def check_file(row: dict[str, Any], full: bool) -> str:
    """'valid', 'missing' or 'corrupt' for a checkpoint row: stat always, sha256 when `full`."""
    path = Path(row["path"])
    if not path.is_file():
        return "missing"
    if path.stat().st_size != row["bytes"]:
        return "corrupt"
    if full and sha256_of(path) != row["sha256"]:
        return "corrupt"
    return "valid"


def mark_vanished(db: Database, run_id: str | None = None) -> None:
    """Cheap reconciliation (stat only): registered files that vanished are marked missing."""
    for row in checkpoints_of(db, run_id, states=["valid"]):
        if not Path(row["path"]).is_file():
            mark_checkpoint(db, row["id"], "missing")


def newest_verified_checkpoint(db: Database, run_id: str, warn=print) -> dict[str, Any] | None:
    """The newest checkpoint of a run that exists and matches its size and sha256; bad ones are marked."""
    for row in reversed(checkpoints_of(db, run_id, states=["valid"])):
        state = check_file(row, full=True)
        if state == "valid":
            return row
        mark_checkpoint(db, row["id"], state)
        warn(f"checkpoint step {row['step']} ({row['path']}) is {state}; trying the previous one")
    return None
