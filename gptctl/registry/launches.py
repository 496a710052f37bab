"""A run's launches: every start of its workers as a row, and what they add up to (goodput).

The main worker opens a row when it starts training, updates it with every metrics flush (a heartbeat)
and closes it with the reason it ended: completed, deadline, signal, diverged, rollback (a new row
continues from the checkpoint rolled back to) or crash. A row nobody closed was ended from outside:
the launcher closes it (kill when it killed the workers, crash otherwise); a worker that finds one
open when it starts closes it as crash (torchrun restarted it) or kill (everything died with it).

Metrics of steps trained again are replaced (queries.delete_metrics_after); these rows keep the count,
and the time, of the work lost.
"""

import math
import socket
import time
from typing import Any

from sqlite_utils import Database

from gptctl.registry.db import transaction

# Reasons that cut a run short against its will: the interruptions Young/Daly's interval is about.
INTERRUPTIONS = ("signal", "kill", "crash")


def start(db: Database, run_id: str, first_step: int, world_size: int, started_at: float,
          stale_reason: str) -> int:
    """Open this start's row; close rows left open by starts nobody saw end (`stale_reason`)."""
    with transaction(db):
        db.execute("update launches set reason = ?, ended_at = coalesce(updated_at, started_at) "
                   "where run_id = ? and reason is null", [stale_reason, run_id])
        reached = db.execute("select max(last_step) from launches where run_id = ?", [run_id]).fetchone()[0]
        cursor = db.execute(
            "insert into launches (run_id, started_at, updated_at, host, world_size, first_step, last_step, "
            "redone_steps, steps, step_s, eval_s, save_s, saves) values (?, ?, ?, ?, ?, ?, ?, ?, 0, 0, 0, 0, 0)",
            [run_id, started_at, time.time(), socket.gethostname(), world_size, first_step, first_step,
             max((reached or 0) - first_step, 0)])
        return cursor.lastrowid


def update(db: Database, launch_id: int, **values: Any) -> None:
    db["launches"].update(launch_id, {**values, "updated_at": time.time()})


def close(db: Database, launch_id: int, reason: str, **values: Any) -> None:
    now = time.time()
    db["launches"].update(launch_id, {**values, "reason": reason, "ended_at": now, "updated_at": now})


def close_open(db: Database, run_id: str, reason: str) -> None:
    """The launcher, after its workers ended: rows they left open ended now, for `reason`."""
    now = time.time()
    db.execute("update launches set reason = ?, ended_at = ?, updated_at = ? where run_id = ? and reason is null",
               [reason, now, now, run_id])


def of_run(db: Database, run_id: str) -> list[dict[str, Any]]:
    return list(db.query("select * from launches where run_id = ? order by id", [run_id]))


def newest(db: Database, run_id: str) -> dict[str, Any] | None:
    rows = list(db.query("select * from launches where run_id = ? order by id desc limit 1", [run_id]))
    return rows[0] if rows else None


def goodput(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """What a run's launches add up to, or None before any:

    wall_s: time its launches held their processes (start to end, or to the last heartbeat);
    useful_s: step time of the steps that were kept, i.e. not trained again after a crash, kill or rollback;
    goodput: useful_s / wall_s; redone_steps; interruptions (signal, kill, crash) and the mean time
    between them; save_s: the loop's mean wait per checkpoint; and, once there is an interruption and a
    timed save, Young/Daly's checkpoint interval √(2 · save · MTBF), in seconds and in steps."""
    if not rows:
        return None
    wall = sum(max((r["ended_at"] or r["updated_at"] or r["started_at"]) - r["started_at"], 0.0) for r in rows)
    useful = 0.0
    for i, row in enumerate(rows):
        trained = (row["last_step"] or row["first_step"]) - row["first_step"]
        later = [r["first_step"] for r in rows[i + 1:]]
        kept_until = min([row["last_step"] or row["first_step"], *later])
        kept = max(kept_until - row["first_step"], 0)
        if trained > 0:
            useful += (row["step_s"] or 0.0) * kept / trained
    interruptions = sum(r["reason"] in INTERRUPTIONS for r in rows)
    saves = sum(r["saves"] or 0 for r in rows)
    steps = sum(r["steps"] or 0 for r in rows)
    save_s = sum(r["save_s"] or 0.0 for r in rows) / saves if saves else None
    step_s = sum(r["step_s"] or 0.0 for r in rows) / steps if steps else None
    mtbf = wall / interruptions if interruptions else None
    interval_s = math.sqrt(2 * save_s * mtbf) if (mtbf and save_s) else None
    return {
        "launches": len(rows), "wall_s": wall, "useful_s": useful, "goodput": useful / wall if wall > 0 else None,
        "redone_steps": sum(r["redone_steps"] or 0 for r in rows), "interruptions": interruptions,
        "mtbf_s": mtbf, "save_s": save_s, "step_s": step_s, "suggested_interval_s": interval_s,
        "suggested_interval_steps": max(round(interval_s / step_s), 1) if (interval_s and step_s) else None,
        "peak_memory": max((r["peak_memory"] or 0 for r in rows), default=0) or None,
        "startup_s": sum(r["startup_s"] or 0.0 for r in rows),
    }
