"""The registry's view of checkpoint files on disk: hashing and verification, no torch needed."""

import hashlib
import json
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
        mark_checkpoint(db, row["id"], state)
        warn(f"checkpoint step {row['step']} ({row['path']}) is {state}; trying the previous one")
    return None


CHECKPOINT_GLOB = "model_*.pt"
TMP_PREFIX = ".tmp-"  # temporary files of a save in progress; never a checkpoint name


def reconcile(db: Database, run: dict[str, Any]) -> list[str]:
    """Make the registry agree with a run's checkpoint directory; returns what it changed.

    - a registered file that vanished is marked missing (stat only);
    - a checkpoint file without a row (killed between rename and insert) is registered: the name is
      only ever given by an atomic rename of a complete file, so hashing it is all that is needed;
    - leftover temporary files of an interrupted save are removed, unless a trainer holds the run.
    """
    from gptctl.registry.locks import run_is_locked
    from gptctl.registry.queries import register_checkpoint

    changes = []
    directory = Path(run["run_dir"]) / "checkpoints"
    for row in checkpoints_of(db, run["id"], states=["valid"]):
        if not Path(row["path"]).is_file():
            mark_checkpoint(db, row["id"], "missing")
            changes.append(f"step {row['step']}: file vanished, marked missing")
    if not directory.is_dir():
        return changes
    known = {row["path"] for row in checkpoints_of(db, run["id"]) if row["state"] != "deleted"}
    settings_permanent = set(json.loads(run["settings"]).get("permanent_checkpoints", []))
    for path in sorted(directory.glob(CHECKPOINT_GLOB)):
        step = path.stem.removeprefix("model_")
        if str(path) in known or not step.isdigit():
            continue
        register_checkpoint(db, run["id"], int(step), path, path.stat().st_size, sha256_of(path),
                            pinned=int(step) in settings_permanent)
        changes.append(f"step {int(step)}: unregistered checkpoint file registered")
    if not run_is_locked(Path(run["run_dir"])):
        for tmp in directory.glob(TMP_PREFIX + "*"):
            tmp.unlink(missing_ok=True)
            changes.append(f"removed leftover {tmp.name}")
    return changes
