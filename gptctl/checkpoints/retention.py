"""Which checkpoints may be deleted, and deleting them. One rule set, used by training and `ckpt prune` alike."""

from pathlib import Path
from typing import Any, Callable

from sqlite_utils import Database

from gptctl.checkpoints import store
from gptctl.checkpoints.directory import checkpoints_dir, is_own_checkpoint_file, remove_checkpoint
from gptctl.registry import queries


def deletable(checkpoints: list[dict[str, Any]], keep_last: int, permanent: set[int], protected_paths: set[str]) -> list[dict[str, Any]]:
    """Checkpoints of one run that retention would delete, oldest first.

    Never deleted: pinned rows, permanent steps, the newest valid checkpoint, the last `keep_last`
    healthy valid checkpoints (so the newest healthy one, whatever keep-last says: an unhealthy
    checkpoint, one a rolled-back run diverged from again, does not count), and any path another run
    started from (`protected_paths`). At deletion, queries.mark_deleting also spares a path a reader has leased.
    """
    valid = sorted((c for c in checkpoints if c["state"] == "valid"), key=lambda c: c["step"])
    healthy = [c for c in valid if queries.is_healthy(c)]
    kept_by_recency = {c["step"] for c in healthy[-max(keep_last, 1):] + valid[-1:]}
    return [
        c
        for c in valid
        if c["step"] not in kept_by_recency
        and not c["pinned"]
        and c["step"] not in permanent
        and c["path"] not in protected_paths
    ]


def plan(db: Database, run: dict[str, Any], keep_last: int | None = None, warn: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """What retention deletes for `run`: its own --keep-last-n-checkpoints unless `keep_last` is given.

    Decided on verified facts: the checkpoint kept as the run's newest must match its size and
    sha256 first (cached by stat, so cheap after its first look); one that does not is marked and
    the newest verified one takes its place. With none verified, nothing is deleted. Rows newer
    than the verified newest (registered meanwhile) are left for a later look.
    A row whose path is not in the run's own checkpoints directory is left alone, with a warning.
    """
    if Path(run["run_dir"]).is_symlink():  # a copy of the home (cp -a) holds the same link: its files are shared
        warn(f"run {run['id']}: its directory {run['run_dir']} is a symlink; retention deletes nothing through it")
        return []
    newest = store.newest_good(db, run["id"], warn)
    if newest is None:
        return []
    rules = store.rules_of(run)
    keep = keep_last if keep_last is not None else rules.keep_last_n_checkpoints
    rows = [r for r in queries.checkpoints_of(db, run["id"]) if r["step"] <= newest["step"]]
    # The registry stores both in one spelling (homepaths.py), as queries.mark_deleting compares them.
    parents = {r["parent_checkpoint"] for r in db.query("select parent_checkpoint from runs where parent_checkpoint is not null")}
    protected = {c["path"] for c in rows if c["state"] == "valid" and queries.stored_path(db, c["path"]) in parents}
    own = []
    for row in deletable(rows, keep, set(rules.permanent_checkpoints), protected):
        if is_own_checkpoint_file(run, row["path"]):
            own.append(row)
        else:
            warn(_foreign(run, row))
    return own


def delete(db: Database, rows: list[dict[str, Any]], warn: Callable[[str], None] = print) -> int:
    """Delete planned checkpoints (see directory.remove_checkpoint); returns the bytes freed.

    Only files in their run's own checkpoints directory are ever unlinked: this is checked again
    here, whatever the caller planned.
    """
    runs: dict[str, dict[str, Any]] = {}
    freed = 0
    for row in rows:
        run = runs.setdefault(row["run_id"], queries.get_run(db, row["run_id"]))
        if not is_own_checkpoint_file(run, row["path"]):
            warn(_foreign(run, row))
            continue
        removed = remove_checkpoint(db, run, row)
        if removed is None and queries.checkpoint_state(db, row["id"]) == row["state"]:  # not taken by another deleter meanwhile
            warn(f"kept step {row['step']} of run {run['id']}: a reader is loading it, or a run now starts from it")
        freed += removed or 0
    return freed


def _foreign(run: dict[str, Any], row: dict[str, Any]) -> str:
    return (f"not deleting step {row['step']} of run {run['id']}: its registered path {row['path']} is not in the "
            f"run's checkpoints directory {checkpoints_dir(run)} (was the registry edited?)")
