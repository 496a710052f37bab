"""The SQLite run registry: every run, checkpoint and metric. Pure Python (sqlite-utils)."""

import sys


def _import_sqlite_utils_lightly() -> None:
    # sqlite-utils imports pandas and numpy when they are installed (datasets brings pandas), only
    # to adapt their values on insert, which gptctl never does; that costs the CLI ~0.7 s per call.
    blocked = [m for m in ("pandas", "numpy") if m not in sys.modules]
    for name in blocked:
        sys.modules[name] = None  # makes `import name` raise ImportError, which sqlite-utils tolerates
    try:
        import sqlite_utils  # noqa: F401
    finally:
        for name in blocked:
            sys.modules.pop(name, None)


_import_sqlite_utils_lightly()

import sqlite3  # noqa: E402

from gptctl.registry import db as _db, removal as _removal  # noqa: E402
from gptctl.registry.db import registry_path  # noqa: E402


def open_registry(home=None, create: bool = True, check_home: bool = True):
    """`db.open_registry`; a command's look (check_home) also finishes a `runs rm` that a crash interrupted."""
    db = _db.open_registry(home, create=create, check_home=check_home)
    if check_home:
        try:
            _removal.finish_interrupted(db)
        except (OSError, sqlite3.Error):
            pass  # a read-only or full home: finished by a later command that can write
    return db


__all__ = ["open_registry", "registry_path"]
