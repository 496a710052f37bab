"""Reads and writes of runs, checkpoints and metrics. Only the launcher and global rank 0 write."""

import secrets
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable

from sqlite_utils import Database

from gptctl.errors import UserError
from gptctl.registry.db import transaction
from gptctl.registry.locks import run_is_locked

ACTIVE = ("created", "running")
UNFINISHED = ("created", "running", "interrupted", "failed", "stale")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def new_run_id(db: Database) -> str:
    while True:
        run_id = secrets.token_hex(4)
        if not list(db.query("select 1 from runs where id = ?", [run_id])):
            return run_id


def insert_run(db: Database, row: dict[str, Any]) -> None:
    db["runs"].insert({"created_at": now(), "status": "created", "host": socket.gethostname(), **row})


def update_run(db: Database, run_id: str, **values: Any) -> None:
    db["runs"].update(run_id, values)


def get_run(db: Database, run_id: str) -> dict[str, Any]:
    return db["runs"].get(run_id)


def resolve_run(db: Database, ref: str) -> dict[str, Any]:
    """A run by id, unique id prefix, or name (the newest run of that name)."""
    rows = list(db.query("select * from runs where id = ?", [ref]))
    if not rows:
        rows = list(db.query("select * from runs where id like ? order by created_at desc", [ref + "%"]))
        if len(rows) > 1:
            raise UserError(f"run {ref!r} is ambiguous: matches {', '.join(r['id'] for r in rows)}; give more characters")
    if not rows:
        rows = list(db.query("select * from runs where name = ? order by created_at desc, rowid desc limit 1", [ref]))
    if not rows:
        raise UserError(f"no run {ref!r} in the registry; `gptctl runs list` shows the runs")
    return refresh_status(db, rows[0])


def list_runs(db: Database) -> list[dict[str, Any]]:
    rows = list(db.query("select * from runs order by created_at desc, rowid desc"))
    return [refresh_status(db, row) for row in rows]


def newest_unfinished_run(db: Database, name: str, kind: str) -> dict[str, Any] | None:
    for row in db.query(
        "select * from runs where name = ? and kind = ? order by created_at desc, rowid desc", [name, kind]
    ):
        row = refresh_status(db, row)
        return row if row["status"] in UNFINISHED else None
    return None


def refresh_status(db: Database, row: dict[str, Any]) -> dict[str, Any]:
    """A run that claims to be active but whose launcher no longer holds its lock is stale."""
    if row["status"] in ACTIVE and row["host"] == socket.gethostname() and not run_is_locked(Path(row["run_dir"])):
        update_run(db, row["id"], status="stale", ended_at=row["ended_at"] or now())
        row = {**row, "status": "stale"}
    return row


# checkpoints


def register_checkpoint(db: Database, run_id: str, step: int, path: Path, size: int, sha256: str, pinned: bool) -> None:
    db.execute(
        """insert into checkpoints (run_id, step, path, bytes, sha256, created_at, pinned, state)
           values (?, ?, ?, ?, ?, ?, ?, 'valid')
           on conflict(run_id, step) do update set path = excluded.path, bytes = excluded.bytes,
             sha256 = excluded.sha256, created_at = excluded.created_at,
             pinned = max(checkpoints.pinned, excluded.pinned), state = 'valid'""",
        [run_id, step, str(path), size, sha256, now(), int(pinned)],
    )


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
    return list(db.query(sql, params))


def mark_checkpoint(db: Database, checkpoint_id: int, state: str) -> None:
    db["checkpoints"].update(checkpoint_id, {"state": state})


# metrics


def write_metrics(db: Database, run_id: str, rows: list[dict[str, Any]]) -> None:
    """One transaction per batch: the trainer flushes rarely, so per-step cost stays flat."""
    if not rows:
        return
    columns = ["step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen", "time"]
    with transaction(db):
        for row in rows:
            present = [c for c in columns if row.get(c) is not None]
            db.execute(
                f"insert into metrics (run_id, {', '.join(present)}) values (?, {', '.join('?' * len(present))})"
                f" on conflict(run_id, step) do update set "
                + ", ".join(f"{c} = excluded.{c}" for c in present if c != "step"),
                [run_id, *[row[c] for c in present]],
            )


def metrics_of(db: Database, run_id: str) -> list[dict[str, Any]]:
    return list(db.query("select * from metrics where run_id = ? order by step", [run_id]))


def delete_metrics_after(db: Database, run_id: str, step: int) -> None:
    """On resume, steps after the checkpoint will be trained again; drop their stale numbers."""
    with transaction(db):
        db.execute("delete from metrics where run_id = ? and step > ?", [run_id, step])



def latest_run(db: Database) -> dict[str, Any]:
    rows = list(db.query("select * from runs order by created_at desc, rowid desc limit 1"))
    if not rows:
        raise UserError("the registry has no runs yet; pass --run RUN")
    return rows[0]


def checkpoint_at(db: Database, run_id: str, step: int) -> dict[str, Any]:
    rows = list(db.query("select * from checkpoints where run_id = ? and step = ? and state != 'deleted'", [run_id, step]))
    if not rows:
        steps = [str(c["step"]) for c in checkpoints_of(db, run_id) if c["state"] != "deleted"]
        raise UserError(f"run {run_id} has no checkpoint at step {step}; it has: {', '.join(steps) or 'none'}")
    return rows[0]


def set_pinned(db: Database, checkpoint_id: int, pinned: bool) -> None:
    db["checkpoints"].update(checkpoint_id, {"pinned": int(pinned)})
