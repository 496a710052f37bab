"""Which checkpoints may be deleted, and deleting them. One rule set, used by training and `ckpt prune` alike."""

import json
from pathlib import Path
from typing import Any

from sqlite_utils import Database

from gptctl.registry import queries


def deletable(checkpoints: list[dict[str, Any]], keep_last: int, permanent: set[int], protected_paths: set[str]) -> list[dict[str, Any]]:
    """Checkpoints of one run that retention would delete, oldest first.

    Never deleted: pinned rows, permanent steps, the newest valid checkpoint, the last
    `keep_last` valid checkpoints, and any path another run started from (`protected_paths`).
    """
    valid = sorted((c for c in checkpoints if c["state"] == "valid"), key=lambda c: c["step"])
    kept_by_recency = {c["step"] for c in valid[-max(keep_last, 1):]}
    return [
        c
        for c in valid
        if c["step"] not in kept_by_recency
        and not c["pinned"]
        and c["step"] not in permanent
        and c["path"] not in protected_paths
    ]


def plan(db: Database, run: dict[str, Any], keep_last: int | None = None) -> list[dict[str, Any]]:
    """What retention deletes for `run`: its own --keep-last-n-checkpoints unless `keep_last` is given."""
    settings = json.loads(run["settings"])
    keep = keep_last if keep_last is not None else settings.get("keep_last_n_checkpoints", 1)
    parents = {r["parent_checkpoint"] for r in db.query("select parent_checkpoint from runs where parent_checkpoint is not null")}
    return deletable(queries.checkpoints_of(db, run["id"]), keep, set(settings.get("permanent_checkpoints", [])), parents)


def delete(db: Database, rows: list[dict[str, Any]]) -> int:
    """Remove the files, then mark the rows; a crash in between leaves rows that the next look marks missing."""
    freed = 0
    for row in rows:
        path = Path(row["path"])
        if path.exists():
            freed += path.stat().st_size
            path.unlink()
        queries.mark_checkpoint(db, row["id"], "deleted")
    return freed
