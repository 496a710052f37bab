"""Reads and writes of runs, checkpoints and metrics. Only the launcher and global rank 0 write."""

import os
import re
import secrets
import socket
import sqlite3
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from sqlite_utils import Database

from gptctl.errors import UserError
from gptctl.registry import homepaths
from gptctl.registry.db import transaction
from gptctl.registry.locks import STALE_AFTER_S, heartbeat_age, run_is_locked

ACTIVE = ("created", "running")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id(db: Database) -> str:
    while True:
        run_id = secrets.token_hex(4)
        if not list(db.query("select 1 from runs where id = ?", [run_id])):
            return run_id


def insert_run(db: Database, row: dict[str, Any]) -> None:
    home = homepaths.home_of(db)
    row = {**row, "run_dir": Path(row["run_dir"]).name,
           "parent_checkpoint": homepaths.to_stored(home, row.get("parent_checkpoint"))}
    db["runs"].insert({"created_at": now(), "status": "created", "host": socket.gethostname(), **row})


# Rows come out with their paths in this home (homepaths.py): every row read goes through one of these.

def run_row(db: Database, row: dict[str, Any]) -> dict[str, Any]:
    home = homepaths.home_of(db)
    return {**row, "run_dir": homepaths.run_dir(home, row["run_dir"]),
            "parent_checkpoint": homepaths.from_stored(home, row.get("parent_checkpoint"))}


def checkpoint_row(db: Database, row: dict[str, Any]) -> dict[str, Any]:
    return {**row, "path": homepaths.from_stored(homepaths.home_of(db), row["path"])}


def stored_path(db: Database, path: Path | str) -> str:
    """How the registry spells a file's path (to compare with its rows in SQL)."""
    return homepaths.to_stored(homepaths.home_of(db), path)


def update_run(db: Database, run_id: str, **values: Any) -> None:
    db["runs"].update(run_id, values)


def get_run(db: Database, run_id: str) -> dict[str, Any]:
    from sqlite_utils.db import NotFoundError

    try:
        return run_row(db, db["runs"].get(run_id))
    except NotFoundError:
        raise UserError(f"run {run_id} is not in the registry of {homepaths.home_of(db)} (was the home moved, "
                        "or its registry replaced?)") from None


_HEX = re.compile(r"[0-9a-f]+")


def resolve_run(db: Database, ref: str) -> dict[str, Any]:
    """The one run `ref` names: its exact id, else the newest run of that exact name, else the run whose
    hex id starts with `ref` (two such runs are an error). Compared as plain strings, case and all:
    no LIKE, so `%` and `_` in a reference are characters, not wildcards."""
    rows = list(db.query("select * from runs where id = ?", [ref]))
    if not rows:
        rows = list(db.query("select * from runs where name = ? order by rowid desc limit 1", [ref]))
    if not rows and _HEX.fullmatch(ref):
        rows = list(db.query("select * from runs where substr(id, 1, ?) = ? order by rowid desc",
                             [len(ref), ref]))
        if len(rows) > 1:
            raise UserError(f"run {ref!r} is ambiguous: it begins the ids {', '.join(r['id'] for r in rows)}; "
                            "give more characters")
    if not rows:
        raise UserError(f"no run {ref!r} in the registry; `gptctl runs list` shows the runs")
    return refresh_status(db, run_row(db, rows[0]))


def list_runs(db: Database) -> list[dict[str, Any]]:
    rows = list(db.query("select * from runs order by rowid desc"))
    return [refresh_status(db, run_row(db, row)) for row in rows]


def newest_run_named(db: Database, name: str) -> dict[str, Any] | None:
    """The newest run of this exact name, whatever its kind and status (refreshed), or None."""
    # Read to the end before refresh_status writes: writing while a SELECT is open on the same
    # connection fails with "database is locked" at once, without waiting, if another process wrote meanwhile.
    rows = list(db.query("select * from runs where name = ? order by rowid desc limit 1", [name]))
    return refresh_status(db, run_row(db, rows[0])) if rows else None


def free_name(db: Database, base: str) -> str:
    """`base`, or the first of base-2, base-3, … that no run has (a new run's default name)."""
    names = {r["name"] for r in db.query("select name from runs where name = ? or substr(name, 1, ?) = ?",
                                         [base, len(base) + 1, base + "-"])}
    return base if base not in names else next(f"{base}-{n}" for n in range(2, len(names) + 3) if f"{base}-{n}" not in names)


def refresh_status(db: Database, row: dict[str, Any]) -> dict[str, Any]:
    """A run that claims to be active but whose trainer is gone is stale: on this host, nobody holds its
    lock; from any host, its lock's heartbeat stopped (a node that died, seen from another).

    It ended when it last did something: its last metric, or now if it never trained a step.
    """
    if row["status"] in ACTIVE and not _trainer_alive(row):
        last = [m["time"] for m in db.query("select time from metrics where run_id = ? and time is not null "
                                            "order by step desc limit 1", [row["id"]])]
        ended = row["ended_at"] or (datetime.fromtimestamp(last[0], timezone.utc).isoformat(timespec="seconds") if last else now())
        try:
            update_run(db, row["id"], status="stale", ended_at=ended)
        except sqlite3.OperationalError:
            pass  # a full disk or a read-only registry: still shown stale, recorded on a later look
        row = {**row, "status": "stale", "ended_at": ended}
    return row


def _trainer_alive(row: dict[str, Any]) -> bool:
    run_dir = Path(row["run_dir"])
    if row["host"] == socket.gethostname():
        return run_is_locked(run_dir)
    return run_is_locked(run_dir) or heartbeat_age(run_dir) < STALE_AFTER_S


# What `runs list` and `runs show` add to a run row: a constant number of index lookups per run, so
# the listing stays fast however many steps the runs have (metrics: pk(run_id, step) and the partial
# index on val-loss steps of migration 0002; checkpoints: (run_id, step)).
_OVERVIEW_SQL = """
select r.*,
  coalesce(m.step, r.last_step) as step, m.loss, m.tokens_seen, v.val_loss, v.step as val_step,
  coalesce(c.n, 0) as checkpoint_count, coalesce(c.bytes, 0) as checkpoint_bytes
from runs r
left join metrics m on m.run_id = r.id and m.step = (select max(step) from metrics where run_id = r.id)
left join metrics v on v.run_id = r.id
  and v.step = (select max(step) from metrics where run_id = r.id and val_loss is not null)
left join (select run_id, count(*) as n, sum(bytes) as bytes from checkpoints where state = 'valid' group by run_id) c
  on c.run_id = r.id
{where}
order by r.rowid desc
"""


def run_overviews(db: Database, run_id: str | None = None) -> list[dict[str, Any]]:
    """Runs (newest first) with progress, last loss and val loss, tokens seen, elapsed seconds
    (start to end, or to now while active) and their valid checkpoints' count and total bytes."""
    active = list(db.query(f"select * from runs where status in ({', '.join('?' * len(ACTIVE))})", ACTIVE))
    for row in active:
        refresh_status(db, run_row(db, row))
    sql = _OVERVIEW_SQL.format(where="where r.id = ?" if run_id else "")
    rows = [run_row(db, row) for row in db.query(sql, [run_id] if run_id else [])]
    for row in rows:
        row["elapsed_s"] = seconds_between(row["started_at"], row["ended_at"]) if row["started_at"] else None
    return rows


def seconds_between(start: str, end: str | None = None) -> float:
    """Seconds from one registry timestamp to another (or to now)."""
    stop = datetime.fromisoformat(end) if end else datetime.now(timezone.utc)
    return max((stop - datetime.fromisoformat(start)).total_seconds(), 0.0)


# checkpoints: state is valid | missing | corrupt | deleting (retention removing the file) | deleted
# (corrupt: its size or sha256 no longer matches, or it does not load as a plain-data checkpoint)


_ANY = object()


def register_checkpoint(db: Database, run_id: str, step: int, path: Path, size: int, sha256: str, pinned: bool,
                        replacing: Any = _ANY, verified: tuple[int, int, int] | None = None) -> bool:
    """Record a complete checkpoint file as valid; returns whether a row was written. With `replacing`,
    an existing row of that step is only overwritten while it still has that state (None: only a new
    row is inserted), so a reader registering a file it found cannot revive a row a trainer changed meanwhile.
    `verified`: the file's (size, mtime_ns, inode) when its sha256 was computed, as `record_verified`."""
    condition = "" if replacing is _ANY else " where checkpoints.state is ?"
    size_, mtime_ns, inode = verified or (None, None, None)
    return db.execute(
        """insert into checkpoints (run_id, step, path, bytes, sha256, created_at, pinned, state,
                                    verified_size, verified_mtime_ns, verified_inode, health)
           values (?, ?, ?, ?, ?, ?, ?, 'valid', ?, ?, ?, 'healthy')
           on conflict(run_id, step) do update set path = excluded.path, bytes = excluded.bytes,
             sha256 = excluded.sha256, created_at = excluded.created_at,
             pinned = max(checkpoints.pinned, excluded.pinned), state = 'valid', health = 'healthy',
             verified_size = excluded.verified_size, verified_mtime_ns = excluded.verified_mtime_ns,
             verified_inode = excluded.verified_inode""" + condition,
        [run_id, step, stored_path(db, path), size, sha256, now(), int(pinned), size_, mtime_ns, inode]
        + ([] if replacing is _ANY else [replacing]),
    ).rowcount == 1


def known_sha256(db: Database, path: Path) -> tuple[str | None, list]:
    """(the sha256 recorded for `path` while its (size, mtime_ns, inode) stay what they were, or None;
    the row to `remember_sha256` once a new hash is computed)."""
    info = Path(path).stat()
    key = [info.st_size, info.st_mtime_ns, info.st_ino]
    rows = list(db.query("select size, mtime_ns, inode, sha256 from verified_files where path = ?", [str(path)]))
    known = rows[0]["sha256"] if rows and [rows[0]["size"], rows[0]["mtime_ns"], rows[0]["inode"]] == key else None
    return known, [str(path), *key]


def remember_sha256(db: Database, rows: list[list]) -> None:
    """Record files' hashes for `known_sha256` (a registry that cannot be written only loses the cache)."""
    import sqlite3

    try:
        db.conn.executemany("insert or replace into verified_files (path, size, mtime_ns, inode, sha256) "
                            "values (?, ?, ?, ?, ?)", rows)
    except sqlite3.OperationalError:
        pass


def record_verified(db: Database, checkpoint_id: int, stat_key: tuple[int, int, int]) -> None:
    """The file matched its sha256 with this (size, mtime_ns, inode): later looks with the same stat trust it."""
    db.execute("update checkpoints set verified_size = ?, verified_mtime_ns = ?, verified_inode = ? where id = ?",
               [*stat_key, checkpoint_id])


def checkpoints_of(db: Database, run_id: str | None = None, states: Iterable[str] | None = None) -> list[dict]:
    where, params = [], []
    if run_id is not None:
        where.append("run_id = ?")
        params.append(run_id)
    if states is not None:
        states = list(states)
        where.append(f"state in ({', '.join('?' * len(states))})")
        params.extend(states)
    sql = "select * from checkpoints" + (" where " + " and ".join(where) if where else "") + " order by run_id, step"
    return [checkpoint_row(db, row) for row in db.query(sql, params)]


def mark_checkpoint(db: Database, checkpoint_id: int, state: str, only_if: str | None = None,
                    sha256: str | None = None) -> bool:
    """Set a checkpoint's state; with `only_if`, only while it still has that state (another process,
    e.g. retention, may have moved it on since it was read), and with `sha256` only while the row still
    describes that file (a trainer may have saved the step again meanwhile). Returns whether the row changed."""
    sql, params = "update checkpoints set state = ? where id = ?", [state, checkpoint_id]
    if only_if is not None:
        sql, params = sql + " and state = ?", params + [only_if]
    if sha256 is not None:
        sql, params = sql + " and sha256 = ?", params + [sha256]
    return db.execute(sql, params).rowcount == 1


def is_healthy(row: dict[str, Any]) -> bool:
    return row.get("health") in (None, "healthy")  # None: registered before health was judged


def mark_unhealthy(db: Database, checkpoint_id: int, why: str) -> None:
    db.execute("update checkpoints set health = ? where id = ?", [f"unhealthy: {why}", checkpoint_id])


def add_event(db: Database, run_id: str, step: int | None, kind: str, detail: str) -> None:
    """A run's event: skipped (a non-finite step), spike, rollback, diverged."""
    db["events"].insert({"run_id": run_id, "step": step, "time": now(), "kind": kind, "detail": detail})


def events_of(db: Database, run_id: str) -> list[dict[str, Any]]:
    return list(db.query("select step, time, kind, detail from events where run_id = ? order by id", [run_id]))


def checkpoint_state(db: Database, checkpoint_id: int) -> str:
    return next(iter(db.query("select state from checkpoints where id = ?", [checkpoint_id])))["state"]


def mark_deleting(db: Database, checkpoint_id: int, only_if: str) -> bool:
    """Retention's claim on a checkpoint, in one statement: only while it still has state `only_if`, no
    live reader lease holds its path and no run records it as its parent. A reader's lease and a
    finetune's run row are written in statements of their own, so each comes strictly before or after
    this one: either the reader sees the row valid and keeps its file, or it sees it gone and moves on."""
    purge_stale_leases(db)
    return db.execute(
        """update checkpoints set state = 'deleting' where id = ? and state = ?
           and not exists (select 1 from checkpoint_leases l where l.path = checkpoints.path and l.expires_at > ?)
           and not exists (select 1 from runs r where r.parent_checkpoint = checkpoints.path)""",
        [checkpoint_id, only_if, time.time()],
    ).rowcount == 1


# checkpoint_leases: a reader's claim on a file (see refs.checkpoint_for_reading)

LEASE_SECONDS = 24 * 3600  # bounds a lease whose holder cannot be checked: a process on another host


def acquire_lease(db: Database, path: Path, require_valid: bool) -> int | None:
    """Lease `path` for this process; returns the lease id, or None when the file is not there to read:
    with `require_valid`, its checkpoint row is no longer valid, else a row of that path is being deleted."""
    purge_stale_leases(db)
    path = stored_path(db, path)
    condition = ("exists (select 1 from checkpoints where path = ? and state = 'valid')" if require_valid
                 else "not exists (select 1 from checkpoints where path = ? and state in ('deleting', 'deleted'))")
    cursor = db.execute(
        f"insert into checkpoint_leases (path, pid, host, expires_at, created_at) select ?, ?, ?, ?, ? where {condition}",
        [path, os.getpid(), socket.gethostname(), time.time() + LEASE_SECONDS, now(), path],
    )
    return cursor.lastrowid if cursor.rowcount == 1 else None


def release_lease(db: Database, lease_id: int) -> None:
    db.execute("delete from checkpoint_leases where id = ?", [lease_id])


def renew_leases(db: Database) -> None:
    """This process's leases last another LEASE_SECONDS (a reader that holds one for days: gptctl serve)."""
    db.execute("update checkpoint_leases set expires_at = ? where pid = ? and host = ?",
               [time.time() + LEASE_SECONDS, os.getpid(), socket.gethostname()])


def purge_stale_leases(db: Database) -> None:
    """Leases of processes on this host that are gone (killed readers), and expired ones of other hosts,
    whose holders cannot be checked from here (a live holder renews its lease: renew_leases)."""
    host = socket.gethostname()
    db.execute("delete from checkpoint_leases where expires_at <= ? and host != ?", [time.time(), host])
    for lease in list(db.query("select id, pid from checkpoint_leases where host = ?", [host])):
        if not pid_alive(lease["pid"]):
            release_lease(db, lease["id"])


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def checkpoint_listing(db: Database, run_id: str | None = None) -> list[dict[str, Any]]:
    """Checkpoints not deleted, with the val loss measured at their step (None if that step had no
    eval) and their age in seconds."""
    sql = """select c.*, m.val_loss from checkpoints c
             left join metrics m on m.run_id = c.run_id and m.step = c.step
             where c.state != 'deleted'""" + (" and c.run_id = ?" if run_id else "") + " order by c.run_id, c.step"
    rows = [checkpoint_row(db, row) for row in db.query(sql, [run_id] if run_id else [])]
    for row in rows:
        row["age_s"] = seconds_between(row["created_at"])
    return rows


# metrics


def write_metrics(db: Database, run_id: str, rows: list[dict[str, Any]]) -> None:
    """One transaction per batch: the trainer flushes rarely, so per-step cost stays flat."""
    if not rows:
        return
    columns = ["step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen", "time", "hellaswag_acc"]
    with transaction(db):
        for row in rows:
            present = [c for c in columns if row.get(c) is not None]
            db.execute(
                f"insert into metrics (run_id, {', '.join(present)}) values (?, {', '.join('?' * len(present))})"
                f" on conflict(run_id, step) do update set "
                + ", ".join(f"{c} = excluded.{c}" for c in present if c != "step"),
                [run_id, *[row[c] for c in present]],
            )


def write_gradient_stats(db: Database, run_id: str, step: int, rows: list[dict[str, Any]]) -> None:
    """One step's per-parameter gradient norms and update/weight ratios (--log-gradients), in one transaction."""
    with transaction(db):
        db.conn.executemany(
            "insert or replace into grad_stats (run_id, step, name, grad_norm, update_ratio) values (?, ?, ?, ?, ?)",
            [(run_id, step, r["name"], r["grad_norm"], r["update_ratio"]) for r in rows],
        )


def metrics_of(db: Database, run_id: str) -> list[dict[str, Any]]:
    return list(db.query("select * from metrics where run_id = ? order by step", [run_id]))


def delete_metrics_after(db: Database, run_id: str, step: int) -> None:
    """On resume, steps after the checkpoint will be trained again; drop their stale numbers."""
    with transaction(db):
        db.execute("delete from metrics where run_id = ? and step > ?", [run_id, step])
        db.execute("delete from grad_stats where run_id = ? and step > ?", [run_id, step])


def latest_run(db: Database) -> dict[str, Any]:
    rows = list(db.query("select * from runs order by rowid desc limit 1"))
    if not rows:
        raise UserError("the registry has no runs yet; pass --run RUN")
    return run_row(db, rows[0])


def checkpoint_at(db: Database, run_id: str, step: int) -> dict[str, Any]:
    rows = list(db.query("select * from checkpoints where run_id = ? and step = ? and state != 'deleted'", [run_id, step]))
    if not rows:
        steps = [str(c["step"]) for c in checkpoints_of(db, run_id) if c["state"] != "deleted"]
        raise UserError(f"run {run_id} has no checkpoint at step {step}; it has: {', '.join(steps) or 'none'}")
    return checkpoint_row(db, rows[0])


def set_pinned(db: Database, checkpoint_id: int, pinned: bool) -> None:
    db["checkpoints"].update(checkpoint_id, {"pinned": int(pinned)})
