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
from gptctl.checkpoints import files, store
from gptctl.checkpoints.directory import checkpoints_dir, is_own_checkpoint_file
from gptctl.checkpoints.files import CHECKPOINT_GLOB, CHECKPOINT_NAME, step_of_name
from gptctl.digest import sha256_of
from gptctl.errors import UserError
from gptctl.paths import registry_path
from gptctl.registry import queries
from gptctl.registry.db import _open, run_directories, transaction
from gptctl.registry.diagnose import explain, integrity_problem, is_damaged
from gptctl.registry.homepaths import adopt
from gptctl.registry.runinfo import RUN_INFO
from gptctl.settings import CheckpointSettings


@dataclass
class RebuildReport:
    moved_aside: Path | None = None
    moved_why: str = ""  # what was moved aside: a damaged registry, or the journal of a deleted one
    runs: list[dict[str, Any]] = field(default_factory=list)  # one row per run added: id, name, status, checkpoints
    skipped_runs: list[str] = field(default_factory=list)  # run directories not added, and why: the command fails
    skipped: list[str] = field(default_factory=list)  # files not trusted, and other notes


def rebuild(home: Path, progress: Callable[[str], None] = lambda _: None) -> RebuildReport:
    """Add every run directory of `home` that the registry lacks, with its checkpoints and metrics.

    A damaged registry is first moved aside (`gptctl.db.damaged-TIME`); runs already registered are
    left as they are, so running it twice changes nothing. Each run is added in one transaction, after
    its files were read: a rebuild killed at any moment leaves each run wholly in or wholly out, and
    the next rebuild adds the rest. A run directory that cannot be read is reported, never passed over.
    """
    report = RebuildReport()
    path = registry_path(home)
    if not path.exists() and any(Path(f"{path}{s}").exists() for s in JOURNALS):
        # The journal of a registry that was deleted (`rm gptctl.db` while a run trained) holds pages of that
        # file, not of the new one: kept aside, never applied to it.
        report.moved_aside = _move_aside(path, "orphan-journal")
        report.moved_why = "the journal of a deleted registry (never replayed)"
    try:
        if (problem := integrity_problem(path)) is not None:  # damage anywhere in the file, not only in runs
            raise sqlite3.DatabaseError(problem)
        db = _open(path)
        db.execute("select count(*) from runs").fetchall()
    except sqlite3.Error as exc:
        if not is_damaged(exc, path):  # a full disk, a lock, a read-only file: a healthy registry stays put
            raise UserError(explain(exc, path)) from None
        report.moved_aside, report.moved_why = _move_aside(path), "the damaged registry"
        db = _open(path)
    known = {row["id"] for row in db.query("select id from runs")}
    readable = []
    for run_dir in run_directories(home):
        if run_dir.name.rpartition("-")[2] in known:
            continue
        progress(f"{run_dir.name}: verifying its checkpoints")
        try:
            readable.append((run_dir, *_read_run(run_dir, report)))
        except (OSError, ValueError) as exc:
            report.skipped_runs.append(f"{run_dir}: {exc}")
    # Added oldest first: the registry orders runs by insertion, never by hosts' clocks (queries.py)
    for run_dir, run, found in sorted(readable, key=lambda r: r[1]["created_at"] or ""):
        with transaction(db):
            if list(db.query("select 1 from runs where id = ?", [run["id"]])):
                continue  # another rebuild added it meanwhile: this transaction writes nothing
            queries.insert_run(db, run)
            for step, (file, size, sha) in found.steps.items():
                store.register(db, run["id"], step, file, size, sha, found.rules)
            for step, (file, size, sha) in found.corrupt.items():
                queries.register_checkpoint(db, run["id"], step, file, size, sha, pinned=False)
                queries.mark_checkpoint(db, queries.checkpoint_at(db, run["id"], step)["id"], "corrupt")
            queries.write_metrics(db, run["id"], found.metrics)
            last = max(found.steps, default=0)
            queries.update_run(db, run["id"], last_step=last,
                               status="completed" if found.steps and last >= (run["max_steps"] or 0) else "interrupted")
        known.add(run["id"])
        report.runs.append({"id": run["id"], "name": run["name"], "run_dir": str(run_dir), "last_step": last,
                            "checkpoints": len(found.steps), "bad_checkpoints": found.bad, "metrics": len(found.metrics)})
    return report


JOURNALS = ("-wal", "-shm", "-journal")  # SQLite's files beside the registry


def _move_aside(path: Path, why: str = "damaged") -> Path:
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.{why}-{stamp}")
    for suffix in ("", *JOURNALS):
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, f"{aside}{suffix}")
    return aside


@dataclass
class _Found:
    """What a run directory's checkpoints say: the verified ones, the newest one's settings and metrics."""
    steps: dict[int, tuple[Path, int, str]] = field(default_factory=dict)  # step: (file, bytes, sha256)
    corrupt: dict[int, tuple[Path, int, str]] = field(default_factory=dict)  # files that do not load as their step
    settings: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    rules: CheckpointSettings | None = None  # of the settings of record: which steps are permanent (pinned)
    bad: int = 0


def _read_run(run_dir: Path, report: RebuildReport) -> tuple[dict[str, Any], _Found]:
    """The run row of a directory and its checkpoints. The settings of record are those of its newest
    verified checkpoint (what trained, with every resume's changes); config.json, kept current by
    gptctl but editable by hand, counts only for a run that never saved, and is put right when it differs."""
    name, _, run_id = run_dir.name.rpartition("-")
    info = _json_object(run_dir / RUN_INFO, report) or {}
    if info.get("id", run_id) != run_id:
        raise ValueError(f"{RUN_INFO} names run {info.get('id')!r}, the directory {run_id!r}")
    config = _json_object(run_dir / "config.json", report)
    found = _checkpoints(run_dir, run_id, report)
    settings = found.settings or config
    if settings is None:
        raise ValueError("neither config.json nor any checkpoint holds its settings")
    if found.settings is not None and config != found.settings:
        write_text_atomic(run_dir / "config.json", json.dumps(found.settings, indent=2) + "\n")
        report.skipped.append(f"{run_dir / 'config.json'}: differed from the settings of its newest checkpoint "
                              f"(step {max(found.steps)}), which were taken and written back")
    home = run_dir.parent.resolve()
    parent = adopt(home, info.get("parent_checkpoint") or settings.get("pretrained_checkpoint"))
    created = datetime.fromtimestamp(run_dir.stat().st_mtime, timezone.utc).isoformat(timespec="seconds")
    run = {
        "id": run_id, "name": info.get("name") or settings.get("run_name") or name,
        "kind": info.get("kind") or settings.get("kind") or "pretrain",
        "settings": json.dumps(settings), "run_dir": str(run_dir.resolve()), "command": info.get("command"),
        "parent_checkpoint": parent, "parent_kind": info.get("parent_kind") or _parent_kind(home, parent, settings),
        "created_at": info.get("created_at") or created, "host": info.get("host"),
        "max_steps": settings.get("max_steps"), "status": "interrupted", "last_step": 0,
    }
    found.rules = store.rules_of(run)
    return run, found


def _parent_kind(home: Path, parent: str | None, settings: dict[str, Any]) -> str | None:
    """An older run.json's parent: the settings' pretrained_checkpoint gives weights, another file a state."""
    if parent is None:
        return None
    weights = settings.get("pretrained_checkpoint")
    return "weights" if weights and adopt(home, weights) == parent else "state"


def _json_object(path: Path, report: RebuildReport) -> dict[str, Any] | None:
    """A JSON object file, or None (noted) when it is missing or unreadable."""
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        report.skipped.append(f"{path}: unreadable ({exc}); not used")
        return None
    if not isinstance(value, dict):
        report.skipped.append(f"{path}: not a JSON object; not used")
        return None
    return value


def _checkpoints(run_dir: Path, run_id: str, report: RebuildReport) -> _Found:
    """Each checkpoint file that is what its name says (loads as plain data, holds that step); the
    others are reported, not trusted."""
    found, run = _Found(), {"id": run_id, "run_dir": str(run_dir)}
    newest = None
    for path in sorted(checkpoints_dir(run).glob(CHECKPOINT_GLOB)):
        if not CHECKPOINT_NAME.fullmatch(path.name) or not is_own_checkpoint_file(run, path) \
                or path.is_symlink() or not path.is_file():
            report.skipped.append(f"{path}: not a checkpoint file of run {run_id}")
            found.bad += 1
            continue
        step = step_of_name(path)
        try:
            state = files.load_step(path, step, mmap=True)
        except files.UnsafeCheckpoint as exc:
            report.skipped.append(f"{path}: {exc}; registered as corrupt")
            found.bad += 1
            # Registered, as corrupt: a run whose every checkpoint is bad is refused, never started over beside them
            found.corrupt[step] = (path, path.stat().st_size, sha256_of(path))
            continue
        found.steps[step] = (path, path.stat().st_size, sha256_of(path))
        newest = state
    if newest is not None:
        found.settings = newest["settings"]
        found.metrics = [m for m in newest.get("metrics") or [] if isinstance(m, dict) and isinstance(m.get("step"), int)]
    return found
