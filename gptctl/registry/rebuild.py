"""Re-create the registry from the run directories: they hold everything needed.

Each run directory has `config.json` (its settings) and `run.json` (id, name, kind, command, parent;
older runs: derived from the directory name), and each checkpoint holds its step, settings and every
metric up to its step. What a rebuilt registry cannot know: metrics after the newest checkpoint
(they are trained again on resume), manual pins (permanent steps are pinned again), W&B ids.
"""

import json
import os
import sqlite3
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

from gptctl.atomic import write_text_atomic
from gptctl.paths import registry_path
from gptctl.registry import files, queries
from gptctl.registry.db import _open, run_directories

RUN_INFO = "run.json"  # written by create_run beside config.json


@dataclass
class RebuildReport:
    moved_aside: Path | None = None
    runs: list[dict[str, Any]] = field(default_factory=list)  # one row per run added: id, name, status, checkpoints
    skipped: list[str] = field(default_factory=list)  # what could not be used, and why


def write_run_info(run: dict[str, Any]) -> None:
    """What the registry knows of a run that its settings do not say, for a rebuild."""
    keys = ("id", "name", "kind", "command", "parent_checkpoint", "created_at", "host")
    write_text_atomic(Path(run["run_dir"]) / RUN_INFO, json.dumps({k: run.get(k) for k in keys}, indent=2) + "\n")


def rebuild(home: Path, progress: Callable[[str], None] = lambda _: None) -> RebuildReport:
    """Add every run directory of `home` that the registry lacks, with its checkpoints and metrics.

    A damaged registry is first moved aside (`gptctl.db.damaged-TIME`); runs already registered are
    left as they are, so running it twice changes nothing.
    """
    report = RebuildReport()
    path = registry_path(home)
    try:
        db = _open(path)
        db.execute("select count(*) from runs").fetchall()
    except sqlite3.DatabaseError:
        report.moved_aside = _move_aside(path)
        db = _open(path)
    known = {row["id"] for row in db.query("select id from runs")}
    for run_dir in run_directories(home):
        try:
            run = _run_row(run_dir)
        except (OSError, ValueError) as exc:
            report.skipped.append(f"{run_dir}: {exc}")
            continue
        if run["id"] in known:
            continue
        progress(f"run {run['id']} ({run['name']}): verifying its checkpoints")
        queries.insert_run(db, run)
        steps, bad = _register_checkpoints(db, run, report)
        metrics = _metrics_of(db, run, steps)
        queries.write_metrics(db, run["id"], metrics)
        max_steps = json.loads(run["settings"]).get("max_steps") or 0
        last = max(steps, default=0)
        queries.update_run(db, run["id"], last_step=last,
                           status="completed" if steps and last >= max_steps else "interrupted")
        known.add(run["id"])
        report.runs.append({"id": run["id"], "name": run["name"], "run_dir": str(run_dir), "last_step": last,
                            "checkpoints": len(steps), "bad_checkpoints": bad, "metrics": len(metrics)})
    return report


def _move_aside(path: Path) -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.damaged-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, f"{aside}{suffix}")
    return aside


def _run_row(run_dir: Path) -> dict[str, Any]:
    settings = json.loads((run_dir / "config.json").read_text())
    if not isinstance(settings, dict):
        raise ValueError("config.json is not an object")
    info_path = run_dir / RUN_INFO
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    name, _, run_id = run_dir.name.rpartition("-")
    if info.get("id", run_id) != run_id:
        raise ValueError(f"{RUN_INFO} names run {info.get('id')!r}, the directory {run_id!r}")
    created = datetime.fromtimestamp((run_dir / "config.json").stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    return {
        "id": run_id, "name": info.get("name") or settings.get("run_name") or name,
        "kind": info.get("kind") or settings.get("kind") or "pretrain",
        "settings": json.dumps(settings), "run_dir": str(run_dir.resolve()), "command": info.get("command"),
        "parent_checkpoint": info.get("parent_checkpoint") or settings.get("pretrained_checkpoint"),
        "created_at": info.get("created_at") or created, "host": info.get("host"),
        "max_steps": settings.get("max_steps"), "status": "interrupted", "last_step": 0,
    }


def _register_checkpoints(db, run: dict[str, Any], report: RebuildReport) -> tuple[list[int], int]:
    """Register each checkpoint file that is what its name says; the others are reported, not trusted."""
    from gptctl.engine.checkpoint import UnsafeCheckpoint, load

    permanent = set(json.loads(run["settings"]).get("permanent_checkpoints") or [])
    steps, bad = [], 0
    for path in sorted(files.checkpoints_dir(run).glob(files.CHECKPOINT_GLOB)):
        if not files.CHECKPOINT_NAME.fullmatch(path.name) or not files.is_own_checkpoint_file(run, path) \
                or path.is_symlink() or not path.is_file():
            report.skipped.append(f"{path}: not a checkpoint file of run {run['id']}")
            bad += 1
            continue
        step = int(path.stem.removeprefix("model_"))
        try:
            state = load(path)
            if int(state.get("step", -1)) != step:
                raise UnsafeCheckpoint(f"{path} holds step {state.get('step')}, not {step}")
        except (UnsafeCheckpoint, AttributeError, TypeError, ValueError) as exc:
            report.skipped.append(f"{path}: {exc}")
            bad += 1
            continue
        queries.register_checkpoint(db, run["id"], step, path, path.stat().st_size, files.sha256_of(path),
                                    pinned=step in permanent)
        steps.append(step)
    return steps, bad


def _metrics_of(db, run: dict[str, Any], steps: list[int]) -> list[dict[str, Any]]:
    """Every step's metrics up to the newest checkpoint, as that checkpoint recorded them."""
    if not steps:
        return []
    from gptctl.engine.checkpoint import load

    row = queries.checkpoint_at(db, run["id"], max(steps))
    metrics = load(Path(row["path"])).get("metrics") or []
    return [m for m in metrics if isinstance(m, dict) and isinstance(m.get("step"), int)]
