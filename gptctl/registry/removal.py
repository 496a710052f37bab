"""`gptctl runs rm`: delete runs (directory, checkpoints, registry rows) so that a crash at any moment
leaves each run either whole or gone, never a row without its directory or a directory without its row.

Per run, under the run's lock and inside one registry transaction (BEGIN IMMEDIATE: no reader can lease
one of its checkpoints meanwhile): the directory is renamed to NAME-ID.removing, which no longer names a
run directory, then the rows are deleted and the transaction commits; the renamed directory is removed
last. A crash before the commit leaves the rows and a renamed directory; a crash after it, a renamed
directory without rows. Either way the next command that opens the registry finishes the removal
(`finish_interrupted`): the rename is the point of no return. Pure Python: no torch.
"""

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from gptctl.errors import UserError
from gptctl.registry import queries
from gptctl.registry.db import transaction
from gptctl.registry.homepaths import from_stored, home_of
from gptctl.registry.locks import DirectoryLock, run_is_locked
from gptctl.registry.runinfo import RUN_INFO

SUFFIX = ".removing"
RUN_TABLES = ("grad_stats", "metrics", "events", "launches", "checkpoints")  # rows keyed by run_id


@dataclass
class Removal:
    run: dict
    bytes: int  # what deleting the directory frees
    checkpoints: int  # valid ones
    missing: bool  # the directory is already gone (deleted by hand): only the rows go


def plan(db, runs: list[dict], force: bool) -> list[Removal]:
    """What removing `runs` deletes; UserError (nothing deleted) for a run that must stay."""
    home = home_of(db)
    ids = {r["id"] for r in runs}
    removals = []
    for run in runs:
        run_dir = Path(run["run_dir"])
        who = f"run {run['id']} ({run['name']})"
        if run_dir.is_symlink() or run_dir.parent.resolve() != home:
            raise UserError(f"{who}: its directory {run_dir} is not a directory of the home {home}; "
                            "gptctl deletes only what lies in its home")
        if run["status"] in queries.ACTIVE:
            raise UserError(f"{who} is running; stop it first (`gptctl runs stop {run['name']}`)")
        if run_is_locked(run_dir):
            raise UserError(f"{who} is held by another gptctl command (a launch starting, or another `runs rm`); "
                            "try again when it is done")
        if run["status"] == "queued" and not force:
            raise UserError(f"{who} is queued for a job script that will train it; cancel the job, then add --force")
        child = _child(db, run, ids)
        if child is not None:
            raise UserError(f"{who}: its checkpoint {child['parent_checkpoint']} is where run {child['id']} "
                            f"({child['name']}) started from; remove that run too (or first)")
        pinned = [c["step"] for c in queries.checkpoints_of(db, run["id"], states=["valid"]) if c["pinned"]]
        if pinned and not force:
            raise UserError(f"{who} has pinned checkpoint(s) at step {', '.join(map(str, pinned))}; "
                            "unpin them (`gptctl ckpt unpin`) or add --force")
        valid = len(queries.checkpoints_of(db, run["id"], states=["valid"]))
        removals.append(Removal(run, _size(run_dir), valid, not run_dir.is_dir()))
    return removals


def remove(db, removal: Removal) -> None:
    """Delete one run (see the module's docstring for why in this order)."""
    run = removal.run
    run_dir = Path(run["run_dir"])
    lock = None
    gone = UserError(f"run {run['id']} ({run['name']}) was removed meanwhile by another `runs rm`")
    if not removal.missing:
        lock = DirectoryLock(run_dir)
        try:
            if not lock.acquire():
                raise UserError(f"run {run['id']} ({run['name']}) was started meanwhile; nothing of it was deleted")
        except FileNotFoundError:
            raise gone from None
    tombstone = run_dir.with_name(run_dir.name + SUFFIX)
    try:
        with transaction(db):
            readers = _readers(db, run)
            if readers:
                raise UserError(f"run {run['id']} ({run['name']}): {readers[0]} is being read (`gptctl sample`, "
                                "`eval` or `export`); try again when it is done; nothing was deleted")
            if db.execute("select 1 from runs where id = ?", [run["id"]]).fetchone() is None:
                raise gone
            if not removal.missing:
                os.rename(run_dir, tombstone)  # the point of no return: the next command finishes a crash
            try:
                _delete_rows(db, run["id"], run_dir.name)
            except BaseException:
                if not removal.missing:
                    os.rename(tombstone, run_dir)  # the rows stay (a full disk): so does the directory
                raise
    finally:
        if lock is not None:
            lock.release()
    _delete_tree(tombstone)


def finish_interrupted(db) -> list[str]:
    """Removals a crash interrupted (NAME-ID.removing directories): finished; returns their names."""
    done = []
    for tombstone in home_of(db).glob("*" + SUFFIX):
        if not tombstone.is_dir() or tombstone.is_symlink() or run_is_locked(tombstone):
            continue  # a removal in progress holds the run's lock, which moved with the directory
        name = tombstone.name.removesuffix(SUFFIX)
        run_id = _run_id_of(tombstone)
        if run_id is None and not any(tombstone.iterdir()):
            tombstone.rmdir()  # a removal killed at its very end (run.json goes last): nothing left in it
            done.append(name)
            continue
        if run_id is None or name.rpartition("-")[2] != run_id:
            continue  # not a run directory this command renamed: not ours to delete
        row = db.execute("select run_dir from runs where id = ?", [run_id]).fetchone()
        if row is not None and Path(row[0]).name != name:
            continue  # the run's directory is another one: this is a copy of it, left alone
        with transaction(db):
            _delete_rows(db, run_id, name)
        _delete_tree(tombstone)
        done.append(name)
    return done


def _delete_tree(tombstone: Path) -> None:
    """Everything but run.json, then run.json, then the directory: killed halfway, what is left still
    says which run it was (finish_interrupted checks it), or is empty."""
    if not tombstone.is_dir():
        return
    for child in tombstone.iterdir():
        if child.name == RUN_INFO:
            continue
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
        else:
            child.unlink(missing_ok=True)
    (tombstone / RUN_INFO).unlink(missing_ok=True)
    try:
        tombstone.rmdir()
    except OSError:
        shutil.rmtree(tombstone, ignore_errors=True)


def _run_id_of(directory: Path) -> str | None:
    """The id a run directory's own run.json gives (what it is, not what it is called)."""
    try:
        info = json.loads((directory / RUN_INFO).read_text())
    except (OSError, ValueError):
        return None
    return info.get("id") if isinstance(info, dict) and isinstance(info.get("id"), str) else None


def _delete_rows(db, run_id: str, dir_name: str) -> None:
    db.execute("delete from checkpoint_leases where substr(path, 1, ?) = ?", [len(dir_name) + 1, dir_name + "/"])
    for table in RUN_TABLES:
        db.execute(f"delete from {table} where run_id = ?", [run_id])
    db.execute("delete from runs where id = ?", [run_id])


def _child(db, run: dict, removing: set[str]) -> dict | None:
    """A run that is not being removed and started from one of `run`'s checkpoints."""
    prefix = Path(run["run_dir"]).name + "/"
    rows = db.query("select id, name, parent_checkpoint from runs where substr(parent_checkpoint, 1, ?) = ?",
                    [len(prefix), prefix])
    return next(({**r, "parent_checkpoint": from_stored(home_of(db), r["parent_checkpoint"])}
                 for r in rows if r["id"] not in removing), None)


def _readers(db, run: dict) -> list[str]:
    queries.purge_stale_leases(db)
    prefix = Path(run["run_dir"]).name + "/"
    return [queries.checkpoint_row(db, r)["path"] for r in
            db.query("select path from checkpoint_leases where substr(path, 1, ?) = ?", [len(prefix), prefix])]


def _size(directory: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(directory):
        for name in names:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except OSError:
                pass
    return total
