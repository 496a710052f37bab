"""Where a run's checkpoint files live, and the only way gptctl deletes one."""

from pathlib import Path
from typing import Any

from sqlite_utils import Database

from gptctl.checkpoints.files import CHECKPOINT_NAME
from gptctl.registry import queries


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
    midway leaves a 'deleting' row, which `store.reconcile` finishes; a row never says deleted while its
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
