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

from gptctl.registry.db import open_registry, registry_path  # noqa: E402

__all__ = ["open_registry", "registry_path"]
