"""The registry's view of checkpoint files on disk: hashing and verification, no torch needed."""

import json
import re
import stat
from pathlib import Path
from typing import Any, Callable

from sqlite_utils import Database

from gptctl.atomic import TMP_PREFIX
from gptctl.digest import sha256_of  # noqa: F401 (also this module's, for its callers)
from gptctl.registry import queries


def check_file(db: Database, row: dict[str, Any], full: bool) -> str:
    """'valid', 'missing' or 'corrupt' for a checkpoint row: its size on every look (a stat is free),
    its sha256 when `full`. A match is cached by the file's (size, mtime_ns, inode): a later full look
    at an unchanged file does not read it again, and any write or replacement changes the key."""
    path = Path(row["path"])
    try:
        info = path.stat()
    except OSError:
        return "missing"
    if not stat.S_ISREG(info.st_mode):
        return "missing"
    if info.st_size != row["bytes"]:
        return "corrupt"
    if not full:
        return "valid"
    key = (info.st_size, info.st_mtime_ns, info.st_ino)
    if key == (row.get("verified_size"), row.get("verified_mtime_ns"), row.get("verified_inode")):
        return "valid"
    if sha256_of(path) != row["sha256"]:
        return "corrupt"
    queries.record_verified(db, row["id"], key)
    return "valid"


def stat_key(path: Path) -> tuple[int, int, int]:
    """What check_file compares to trust a file without hashing it again."""
    info = path.stat()
    return info.st_size, info.st_mtime_ns, info.st_ino


def newest_verified_checkpoint(db: Database, run_id: str, warn=print, healthy: bool = False) -> dict[str, Any] | None:
    """The newest checkpoint of a run that exists and matches its size and sha256 (and with `healthy`,
    was not judged unhealthy); bad ones are marked."""
    for row in reversed(queries.checkpoints_of(db, run_id, states=["valid"])):
        if healthy and not queries.is_healthy(row):
            continue
        state = check_file(db, row, full=True)
        if state == "valid":
            return row
        queries.mark_checkpoint(db, row["id"], state, only_if="valid", sha256=row["sha256"])
        warn(f"checkpoint step {row['step']} ({row['path']}) is {state}; trying the previous one")
    return None


def load_check(path: Path) -> int | None:
    """`reconcile`'s `inspect` for commands that may import torch: it is imported only once an
    unregistered file needs loading (engine.checkpoint.stored_step)."""
    from gptctl.engine.checkpoint import stored_step

    return stored_step(path)


def verify(db: Database, run_id: str | None) -> list[dict[str, Any]]:
    """Check every registered checkpoint of `run_id` (None: all runs): exists, size, sha256, and loads as
    plain data; mark the ones whose state changed. Imports torch (a verification really loads the file)."""
    from gptctl.engine.checkpoint import UnsafeCheckpoint, load

    report = []
    for row in queries.checkpoints_of(db, run_id, states=["valid", "corrupt", "missing"]):
        state, detail = check_file(db, row, full=True), ""
        if state == "valid":
            try:
                load(row["path"])
            except UnsafeCheckpoint as exc:
                state, detail = "corrupt", str(exc)
        if state != row["state"]:
            queries.mark_checkpoint(db, row["id"], state, only_if=row["state"])  # unless retention got there first
        report.append({"run_id": row["run_id"], "step": row["step"], "path": row["path"], "state": state, "detail": detail})
    return report


def reconcile_runs(db: Database, runs: list[dict[str, Any]], inspect: Callable[[Path], int | None] | None = None
                   ) -> list[str]:
    """`reconcile` each run; what changed, each line naming its run."""
    return [f"run {run['id']}: {change}" for run in runs for change in reconcile(db, run, inspect)]


CHECKPOINT_GLOB = "model_*.pt"
CHECKPOINT_NAME = re.compile(r"model_\d+\.pt")


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
    if not is_own_checkpoint_file(run, row["path"]) or Path(run["run_dir"]).is_symlink():
        return None
    if row["state"] != "deleting" and not queries.mark_deleting(db, row["id"], only_if=row["state"]):
        return None  # changed meanwhile, leased by a reader, or become a run's parent
    path = Path(row["path"])
    try:
        freed = path.stat().st_size
        path.unlink()
    except FileNotFoundError:  # already gone: a crash after the unlink, or someone finishing the same deletion
        freed = 0
    queries.mark_checkpoint(db, row["id"], "deleted")
    return freed


def reconcile(db: Database, run: dict[str, Any], inspect: Callable[[Path], int | None] | None = None,
              by_trainer: bool = False) -> list[str]:
    """Make the registry agree with a run's checkpoint directory; returns what it changed or found.

    - a registered file that vanished is marked missing, one whose size changed corrupt (stat only);
      a missing one that is back is valid again once its sha256 matches;
    - a deletion that was interrupted (a 'deleting' row) is finished;
    - a checkpoint file without a row (e.g. killed between rename and insert) is registered only when
      `inspect` (engine.checkpoint.stored_step: a torch load as plain data) finds in it the step its
      name says, and it is a regular file really inside the run's checkpoints directory. A partial
      manual copy, a symlink or a foreign file is never trusted. Torch-free callers (ckpt list) pass
      no `inspect`: such files then stay unregistered, and unlisted, until a torch path looks. While
      a trainer holds the run, only it (`by_trainer`) registers them: it is about to register its own;
    - leftover temporary files of an interrupted save are removed, unless a trainer holds the run.
    """
    from gptctl.registry.locks import run_is_locked

    changes = []
    directory = checkpoints_dir(run)
    for row in queries.checkpoints_of(db, run["id"], states=["valid", "deleting", "missing"]):
        if row["state"] == "deleting":
            if remove_checkpoint(db, run, row) is not None:
                changes.append(f"step {row['step']}: finished deleting it")
            continue
        if row["state"] == "missing":  # back (moved back, a disk remounted)? Trusted again once its sha256 matches
            if Path(row["path"]).is_file() and check_file(db, row, full=True) == "valid" \
                    and queries.mark_checkpoint(db, row["id"], "valid", only_if="missing", sha256=row["sha256"]):
                changes.append(f"step {row['step']}: file is back and matches its sha256, valid again")
            continue
        state = check_file(db, row, full=False)
        if state == "corrupt" and not is_own_checkpoint_file(run, row["path"]):
            continue  # a row edited to point elsewhere: retention reports it on every prune, and never deletes it
        if state != "valid" and queries.mark_checkpoint(db, row["id"], state, only_if="valid", sha256=row["sha256"]):
            changes.append(f"step {row['step']}: file vanished, marked missing" if state == "missing" else
                           f"step {row['step']}: file size changed (registered {row['bytes']} bytes), marked corrupt")
    if not directory.is_dir():
        return changes
    trainer_active = run_is_locked(Path(run["run_dir"]))
    seen = {row["step"]: row["state"] for row in queries.checkpoints_of(db, run["id"])}
    settings_permanent = set(json.loads(run["settings"]).get("permanent_checkpoints", []))
    for path in sorted(directory.glob(CHECKPOINT_GLOB)):
        if not CHECKPOINT_NAME.fullmatch(path.name):
            continue
        step = int(path.stem.removeprefix("model_"))
        if seen.get(step, "deleted") != "deleted" or (trainer_active and not by_trainer):
            continue
        refusal = _orphan_refusal(run, path, step, inspect)
        if refusal:
            changes.append(f"step {step}: {path.name} not registered: {refusal}")
            continue
        try:
            size, sha, verified = path.stat().st_size, sha256_of(path), stat_key(path)
        except FileNotFoundError:  # registered and deleted by a live trainer while we looked
            continue
        if queries.register_checkpoint(db, run["id"], step, path, size, sha, pinned=step in settings_permanent,
                                       replacing=seen.get(step), verified=verified):
            changes.append(f"step {step}: unregistered checkpoint file registered")
    if not trainer_active:
        for tmp in directory.glob(TMP_PREFIX + "*"):
            tmp.unlink(missing_ok=True)
            changes.append(f"removed leftover {tmp.name}")
    return changes


def _orphan_refusal(run: dict[str, Any], path: Path, step: int, inspect: Callable[[Path], int | None] | None) -> str | None:
    """Why an unregistered checkpoint-named file may not be registered, or None when it may."""
    if path.is_symlink():
        return "it is a symlink; only a regular file in the run's checkpoints directory is a checkpoint"
    if not path.is_file() or not is_own_checkpoint_file(run, path):
        return "it is not a regular file in the run's checkpoints directory"
    if inspect is None:
        return "not checked yet; `gptctl ckpt verify` loads it and registers it if it is a checkpoint of this step"
    stored = inspect(path)
    if stored is None:
        return "it does not load as a plain-data gptctl checkpoint"
    if stored != step:
        return f"it holds step {stored}, not the step {step} its name says"
    return None
