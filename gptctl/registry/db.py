"""Opening the registry: WAL so readers never block the trainer (a rollback journal on a network
filesystem, see storage.py), a busy timeout so writers wait."""

import os
import shutil
import sqlite3
import tempfile
from pathlib import Path

from sqlite_utils import Database
from sqlite_utils.migrations import Migrations

from gptctl.errors import UserError
from gptctl.paths import registry_path
from gptctl.registry import storage
from gptctl.registry.diagnose import REBUILD, STATE_FILES, explain, is_damaged
from gptctl.registry.homepaths import RUN_DIR_NAME
from gptctl.registry.migrations import migrations


class RegistryDamaged(UserError):
    """The registry file cannot be read as a gptctl registry."""


def open_registry(home: Path | None = None, create: bool = True, check_home: bool = True) -> Database:
    """Open (and migrate) the registry. With create=False a missing registry is an empty one in memory.

    A registry that does not know every run directory beside it (missing, empty, another home's, or
    rebuilt with skips) is refused: it would let `--auto-resume` start those runs over from step 0
    beside their checkpoints. `check_home=False` is for the trainer and launcher of a run that exists.
    """
    path = registry_path(home)
    if not path.exists():
        if check_home and (unknown := unregistered_run_directories(path.parent, set())):
            raise UserError(f"{path} is missing but {path.parent} holds {_count(unknown)}; {REBUILD} re-creates "
                            "the registry from them")
        if not create:
            db = Database(memory=True)
            db.gptctl_home = path.parent.resolve()
            migrations.apply(db)
            return db
    try:
        db = _open(path) if _writable(path) else _open_snapshot(path)
        known = {row[0] for row in db.execute("select id from runs").fetchall()} if check_home else set()
    except (sqlite3.Error, OSError) as exc:
        raise (RegistryDamaged if is_damaged(exc, path) else UserError)(explain(exc, path)) from None
    if check_home and (unknown := unregistered_run_directories(path.parent, known)):
        raise UserError(f"the registry {path} does not know {_count(unknown)} beside it ({', '.join(d.name for d in unknown[:3])}"
                        f"{', …' if len(unknown) > 3 else ''}); {REBUILD} adds them, or move them out of {path.parent}")
    return db


def _count(directories: list[Path]) -> str:
    return f"{len(directories)} run director{'y' if len(directories) == 1 else 'ies'}"


RUN_MARKERS = ("config.json", "run.json", "checkpoints")  # what create_run writes in a run directory


def run_directories(home: Path) -> list[Path]:
    """Directories under `home` that hold a run: NAME-ID (what create_run makes) with anything a run
    writes in it. Not a symlink: a run lives in its home."""
    if not home.is_dir():
        return []
    return sorted(d for d in home.iterdir() if RUN_DIR_NAME.fullmatch(d.name) and d.is_dir() and not d.is_symlink()
                  and any((d / marker).exists() for marker in RUN_MARKERS))


def unregistered_run_directories(home: Path, known: set[str]) -> list[Path]:
    """The run directories of `home` whose run id the registry lacks; one being created right now (its
    creator holds its lock until its row is in) is not one."""
    from gptctl.registry.locks import run_is_locked

    return [d for d in run_directories(home) if d.name.rpartition("-")[2] not in known and not run_is_locked(d)]


def _writable(path: Path) -> bool:
    """Whether this process may write the registry (and its journal beside it)."""
    if not path.exists():
        return True  # created by _open, or refused there in gptctl's words
    try:
        read_only_fs = os.statvfs(path.parent).f_flag & os.ST_RDONLY
    except OSError:
        return True
    return not read_only_fs and os.access(path, os.W_OK) and os.access(path.parent, os.W_OK | os.X_OK)


def _open_snapshot(path: Path) -> Database:
    """A read-only home (a read-only mount, an archived home): its registry, copied into memory with its
    journal, so that the commands that read it work; whatever they would record (a stale status, a reader
    lease) stays in memory, and commands that must write refuse before they start (paths.writable_home)."""
    with tempfile.TemporaryDirectory(prefix="gptctl-snapshot-") as tmp:
        copy = Path(tmp) / path.name
        for suffix in STATE_FILES:  # a hot rollback journal too: opening the copy rolls it back, as SQLite would
            if Path(f"{path}{suffix}").is_file():
                shutil.copyfile(f"{path}{suffix}", f"{copy}{suffix}")
        source = sqlite3.connect(copy)
        memory = sqlite3.connect(":memory:", isolation_level=None)
        try:
            source.backup(memory)
        finally:
            source.close()
    db = Database(memory)
    db.gptctl_home = path.parent.resolve()
    _refuse_foreign(db, path)
    migrations.apply(db)
    return db


def _refuse_foreign(db: Database, path: Path) -> None:
    """Another program's SQLite file is not made a registry by adding gptctl's tables to it."""
    tables = {row[0] for row in db.execute("select name from sqlite_master where type = 'table'").fetchall()}
    if tables and Migrations.migrations_table not in tables:  # every gptctl registry has it, since 0001
        raise UserError(f"{path} is an SQLite database but not a gptctl registry (it has tables "
                        f"{', '.join(sorted(tables)[:4])}); move it away, or point --home at another directory")


def _open(path: Path) -> Database:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=storage.BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    db = Database(conn)
    db.gptctl_home = path.parent.resolve()  # rows' paths are relative to it (homepaths.py)
    _refuse_foreign(db, path)  # before anything is set in its header
    db.execute(f"PRAGMA busy_timeout = {storage.BUSY_TIMEOUT_MS}")
    if storage.is_network(path.parent):  # WAL's shared memory is one host's (storage.py)
        db.execute("PRAGMA journal_mode = DELETE")
        db.execute("PRAGMA synchronous = FULL")
    else:
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")
    if migrations.pending(db):
        # BEGIN IMMEDIATE serialises two processes migrating a new registry at the same time.
        with transaction(db):
            migrations.apply(db)
    return db


class transaction:
    """BEGIN IMMEDIATE … COMMIT: takes the write lock up front, so the busy timeout applies. Inside
    another transaction it is part of that one (e.g. a rebuild adds a run's rows all at once)."""

    def __init__(self, db: Database):
        self.db = db
        self.outer = False

    def __enter__(self):
        self.outer = not self.db.conn.in_transaction
        if self.outer:
            self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, *exc):
        if self.outer:
            self.db.execute("ROLLBACK" if exc[0] else "COMMIT")
