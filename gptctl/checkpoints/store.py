"""The checkpoint store: checkpoint files on disk and their rows in the registry, kept in agreement.

One function for each question: `newest_good` (the checkpoint a start, a rollback, a resume's check
and retention take), `verify` (every row), `register` (a complete file becomes a row, pinned when its
step is permanent), `reconcile` (the registry made to agree with a run's directory). The run's
retention settings are parsed from its stored settings in one place, `rules_of`.
torch is loaded only where a file is really read (files.py).
"""

import json
import stat
from pathlib import Path
from typing import Any, Callable

from pydantic import ValidationError
from sqlite_utils import Database

from gptctl.atomic import TMP_PREFIX
from gptctl.checkpoints import files
from gptctl.checkpoints.directory import checkpoints_dir, is_own_checkpoint_file, remove_checkpoint
from gptctl.checkpoints.files import CHECKPOINT_GLOB, CHECKPOINT_NAME, step_of_name
from gptctl.digest import sha256_of
from gptctl.registry import queries
from gptctl.registry.locks import run_is_locked
from gptctl.settings import CheckpointSettings

Warn = Callable[[str], None]


def rules_of(run: dict[str, Any]) -> CheckpointSettings:
    """The run's checkpoint settings (keep-last, permanent steps) from its stored settings; a run stored
    before an option existed keeps what a new run keeps by default. A resume may change them: read anew."""
    stored = json.loads(run.get("settings") or "{}")
    given = {name: stored[name] for name in CheckpointSettings.model_fields if stored.get(name) is not None}
    try:
        return CheckpointSettings.model_validate(given)
    except ValidationError:  # stored by a gptctl with looser rules (a permanent step 0): read as stored, as ever
        return CheckpointSettings.model_construct(**given)


def register(db: Database, run_id: str, step: int, path: Path, size: int, sha256: str, rules: CheckpointSettings,
             **how: Any) -> bool:
    """Record a complete checkpoint file as valid, pinned when its step is one of the run's permanent
    ones (`how`: queries.register_checkpoint's `replacing` and `verified`). Returns whether a row was written."""
    return queries.register_checkpoint(db, run_id, step, path, size, sha256, pinned=step in rules.permanent_checkpoints,
                                       **how)


def pin(db: Database, run_id: str, step: int, pinned: bool) -> None:
    """`ckpt pin`/`unpin`: retention keeps a pinned checkpoint (a permanent step stays kept either way).
    UserError naming the run's steps when it has none at `step`."""
    queries.set_pinned(db, queries.checkpoint_at(db, run_id, step)["id"], pinned)


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


def _loads(row: dict[str, Any]) -> str | None:
    """Why a verified file does not load as the gptctl checkpoint of its row's step (None: it does)."""
    try:
        files.load_step(Path(row["path"]), row["step"], mmap=True)  # the settings and keys; tensors mapped
    except (files.UnsafeCheckpoint, OSError) as exc:
        return str(exc)
    return None


def newest_good(db: Database, run_id: str, warn: Warn = print, healthy: bool = False, loads: bool = False,
                distrust: int | None = None, at_least: int | None = None) -> dict[str, Any] | None:
    """The newest checkpoint row of a run whose file exists and matches its size and sha256, and with
    `loads`, loads as a gptctl checkpoint of its step (torch); each bad one on the way is marked
    (missing or corrupt) with a warning, and the previous one is tried.

    `healthy`: pass over checkpoints judged unhealthy. `distrust`: a step a run rolled back to and
    diverged from again; it is marked unhealthy and passed over. `at_least`: only steps at or above it
    (None when the newest good one is older)."""
    for row in reversed(queries.checkpoints_of(db, run_id, states=["valid"])):
        if healthy and not queries.is_healthy(row):
            continue
        state = check_file(db, row, full=True)
        if state != "valid":
            queries.mark_checkpoint(db, row["id"], state, only_if="valid", sha256=row["sha256"])
            warn(f"checkpoint step {row['step']} ({row['path']}) is {state}; trying the previous one")
            continue
        if at_least is not None and row["step"] < at_least:
            return None  # verified first: a resume says a damaged newest checkpoint before its workers start
        if row["step"] == distrust:
            queries.mark_unhealthy(db, row["id"], "the run diverged again after rolling back to it")
            continue
        why = _loads(row) if loads else None
        if why is None:
            return row
        queries.mark_checkpoint(db, row["id"], "corrupt", only_if="valid", sha256=row["sha256"])
        warn(f"checkpoint step {row['step']} does not load ({why}); marked corrupt, trying the previous one")
    return None


def verify(db: Database, run_id: str | None) -> list[dict[str, Any]]:
    """Check every registered checkpoint of `run_id` (None: all runs): exists, size, sha256, and loads as
    the plain-data gptctl checkpoint of its step; mark the ones whose state changed. Imports torch."""
    report = []
    for row in queries.checkpoints_of(db, run_id, states=["valid", "corrupt", "missing"]):
        state, detail = check_file(db, row, full=True), ""
        if state == "valid" and (why := _loads(row)) is not None:
            state, detail = "corrupt", why
        if state != row["state"]:
            queries.mark_checkpoint(db, row["id"], state, only_if=row["state"])  # unless retention got there first
        report.append({"run_id": row["run_id"], "step": row["step"], "path": row["path"], "state": state, "detail": detail})
    return report


def listing(db: Database, run_id: str | None = None) -> list[dict[str, Any]]:
    """queries.checkpoint_listing, each row saying whether its step is one of its run's permanent ones."""
    rules: dict[str, CheckpointSettings] = {}
    rows = queries.checkpoint_listing(db, run_id)
    for row in rows:
        if row["run_id"] not in rules:
            rules[row["run_id"]] = rules_of(queries.get_run(db, row["run_id"]))
        row["permanent"] = row["step"] in rules[row["run_id"]].permanent_checkpoints
        row["age_s"] = row.pop("age_s")  # last, after "permanent", as `ckpt list --json` has always printed them
    return rows


def reconcile_runs(db: Database, runs: list[dict[str, Any]], inspect: Callable[[Path], int | None] | None = None
                   ) -> list[str]:
    """`reconcile` each run; what changed, each line naming its run."""
    return [f"run {run['id']}: {change}" for run in runs for change in reconcile(db, run, inspect)]


def reconcile(db: Database, run: dict[str, Any], inspect: Callable[[Path], int | None] | None = None,
              by_trainer: bool = False) -> list[str]:
    """Make the registry agree with a run's checkpoint directory; returns what it changed or found.

    - a registered file that vanished is marked missing, one whose size changed corrupt (stat only);
      a missing one that is back is valid again once its sha256 matches;
    - a deletion that was interrupted (a 'deleting' row) is finished;
    - a checkpoint file without a row (e.g. killed between rename and insert) is registered only when
      `inspect` (files.stored_step: a torch load as plain data) finds in it the step its
      name says, and it is a regular file really inside the run's checkpoints directory. A partial
      manual copy, a symlink or a foreign file is never trusted. Torch-free callers (ckpt list) pass
      no `inspect`: such files then stay unregistered, and unlisted, until a torch path looks. While
      a trainer holds the run, only it (`by_trainer`) registers them: it is about to register its own;
    - leftover temporary files of an interrupted save are removed, unless a trainer holds the run.
    """
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
    rules = rules_of(run)
    for path in sorted(directory.glob(CHECKPOINT_GLOB)):
        if not CHECKPOINT_NAME.fullmatch(path.name):
            continue
        step = step_of_name(path)
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
        if register(db, run["id"], step, path, size, sha, rules, replacing=seen.get(step), verified=verified):
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
