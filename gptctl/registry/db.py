"""Opening the registry: WAL so readers never block the trainer, a busy timeout so writers wait."""

import sqlite3
from pathlib import Path

from sqlite_utils import Database

from gptctl.paths import home_dir, registry_path
from gptctl.registry.migrations import migrations

BUSY_TIMEOUT_MS = 30_000


def open_registry(home: Path | None = None, create: bool = True) -> Database:
    """Open (and migrate) the registry. With create=False a missing registry is an empty one in memory."""
    path = registry_path(home)
    if not path.exists() and not create:
        db = Database(memory=True)
        migrations.apply(db)
        return db
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
