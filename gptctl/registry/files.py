"""The registry's view of checkpoint files on disk: hashing and verification, no torch needed."""

import hashlib
import json
import re
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


def newest_verified_checkpoint(db: Database, run_id: str, warn=print) -> dict[str, Any] | None:
    """The newest checkpoint of a run that exists and matches its size and sha256; bad ones are marked."""
    for row in reversed(checkpoints_of(db, run_id, states=["valid"])):
        state = check_file(row, full=True)
        if state == "valid":
            return row
        mark_checkpoint(db, row["id"], state, only_if="valid")
        warn(f"checkpoint step {row['step']} ({row['path']}) is {state}; trying the previous one")
    return None


CHECKPOINT_GLOB = "model_*.pt"
CHECKPOINT_NAME = re.compile(r"model_\d+\.pt")
TMP_PREFIX = ".tmp-"  # temporary files of a save in progress; never a checkpoint name


def checkpoints_dir(run: dict[str, Any]) -> Path:
    return Path(run["run_dir"]) / "checkpoints"


def is_own_checkpoint_file(run: dict[str, Any], path: str | Path) -> bool:
    """Whether `path` is a checkpoint file directly in the run's own checkpoints directory.

    The only files gptctl ever deletes; a registry row pointing anywhere else (edited by hand or
    tampered with, or a symlink out of the directory) is never unlinked.
    """
    path = Path(path)
    return bool(CHECKPOINT_NAME.fullmatch(path.name)) and path.resolve().parent == checkpoints_dir(run).resolve()


def remove_checkpoint(db: Database, run: dict[str, Any], row: dict[str, Any]) -> int | None:
    """Delete one checkpoint of `run`: mark the row deleting, unlink the file, mark it deleted.

    Returns the bytes freed, or None when the row is not this process's to delete: its path is
    outside the run's checkpoints directory, or another process changed its state first. A crash
    midway leaves a 'deleting' row, which `reconcile` finishes; a row never says deleted while its
    file is still there, and a concurrent reader never sees a half-deleted checkpoint as valid.
    """
    if not is_own_checkpoint_file(run, row["path"]):
        return None
    if row["state"] != "deleting" and not mark_checkpoint(db, row["id"], "deleting", only_if=row["state"]):
        return None
    path = Path(row["path"])
    try:
        freed = path.stat().st_size
        path.unlink()
    except FileNotFoundError:  # already gone: a crash after the unlink, or someone finishing the same deletion
        freed = 0
    mark_checkpoint(db, row["id"], "deleted")
    return freed


def reconcile(db: Database, run: dict[str, Any]) -> list[str]:
    """Make the registry agree with a run's checkpoint directory; returns what it changed.

    - a registered file that vanished is marked missing (stat only);
    - a deletion that was interrupted (a 'deleting' row) is finished;
    - a checkpoint file without a row (killed between rename and insert) is registered: the name is
      only ever given by an atomic rename of a complete file, so hashing it is all that is needed;
    - leftover temporary files of an interrupted save are removed, unless a trainer holds the run.
    """
    from gptctl.registry.locks import run_is_locked
    from gptctl.registry.queries import register_checkpoint

    changes = []
    directory = checkpoints_dir(run)
    for row in checkpoints_of(db, run["id"], states=["valid", "deleting"]):
        if row["state"] == "deleting":
            if remove_checkpoint(db, run, row) is not None:
                changes.append(f"step {row['step']}: finished deleting it")
        elif not Path(row["path"]).is_file() and mark_checkpoint(db, row["id"], "missing", only_if="valid"):
            changes.append(f"step {row['step']}: file vanished, marked missing")
    if not directory.is_dir():
        return changes
    seen = {row["step"]: row["state"] for row in checkpoints_of(db, run["id"])}
    settings_permanent = set(json.loads(run["settings"]).get("permanent_checkpoints", []))
    for path in sorted(directory.glob(CHECKPOINT_GLOB)):
        if not CHECKPOINT_NAME.fullmatch(path.name):
            continue
        step = int(path.stem.removeprefix("model_"))
        if seen.get(step, "deleted") != "deleted":
            continue
        try:
            size, sha = path.stat().st_size, sha256_of(path)
        except FileNotFoundError:  # registered and deleted by a live trainer while we looked
            continue
        if register_checkpoint(db, run["id"], step, path, size, sha, pinned=step in settings_permanent,
                               replacing=seen.get(step)):
            changes.append(f"step {step}: unregistered checkpoint file registered")
    if not run_is_locked(Path(run["run_dir"])):
        for tmp in directory.glob(TMP_PREFIX + "*"):
            tmp.unlink(missing_ok=True)
            changes.append(f"removed leftover {tmp.name}")
    return changes
