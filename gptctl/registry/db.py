"""Opening the registry: WAL so readers never block the trainer, a busy timeout so writers wait."""

import re
import sqlite3
from pathlib import Path

from sqlite_utils import Database

from gptctl.errors import UserError
from gptctl.paths import registry_path
from gptctl.registry.migrations import migrations

BUSY_TIMEOUT_MS = 30_000


REBUILD = "`gptctl registry rebuild`"


class RegistryDamaged(UserError):
    """The registry file cannot be read as a gptctl registry."""


def open_registry(home: Path | None = None, create: bool = True) -> Database:
    """Open (and migrate) the registry. With create=False a missing registry is an empty one in memory.

    A home whose registry is gone but whose run directories are not is refused: a new, empty registry
    would let `--auto-resume` start those runs over from step 0 beside their checkpoints.
    """
    path = registry_path(home)
    if not path.exists():
        orphans = run_directories(path.parent)
        if orphans:
            raise UserError(f"{path} is missing but {path.parent} holds {len(orphans)} run "
                            f"director{'y' if len(orphans) == 1 else 'ies'}; {REBUILD} re-creates the registry from them")
        if not create:
            db = Database(memory=True)
            migrations.apply(db)
            return db
    try:
        return _open(path)
    except sqlite3.DatabaseError as exc:
        raise RegistryDamaged(f"the registry {path} is damaged ({exc}); {REBUILD} moves it aside and "
                              "re-creates it from the run directories") from None


def run_directories(home: Path) -> list[Path]:
    """Directories under `home` that hold a run: NAME-ID with a config.json (what create_run writes)."""
    if not home.is_dir():
        return []
    return sorted(d for d in home.iterdir()
                  if RUN_DIR_NAME.fullmatch(d.name) and (d / "config.json").is_file() and not d.is_symlink())


RUN_DIR_NAME = re.compile(r".+-[0-9a-f]{8}", re.DOTALL)


def _open(path: Path) -> Database:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
    db = Database(conn)
    db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
    db.execute("PRAGMA journal_mode = WAL")
    db.execute("PRAGMA synchronous = NORMAL")
    db.execute("PRAGMA foreign_keys = ON")
    if migrations.pending(db):
        # BEGIN IMMEDIATE serialises two processes migrating a new registry at the same time.
        with transaction(db):
            migrations.apply(db)
    return db


class transaction:
    """BEGIN IMMEDIATE … COMMIT: takes the write lock up front, so the busy timeout applies."""

    def __init__(self, db: Database):
        self.db = db

    def __enter__(self):
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, *exc):
        self.db.execute("ROLLBACK" if exc[0] else "COMMIT")
