"""Directories a command must never remove, whatever --force says: the registry, runs and prepared data."""

import json
import os
from pathlib import Path

from gptctl.paths import DB_NAME, registry_path

# What marks a directory as gptctl's own even when the registry does not know it (copied by hand, another home).
_DATA_MARKERS = ("manifest.json",)
_SHARD_SUFFIXES = (".npy",)


def why_protected(directory: Path, home: Path) -> str | None:
    """Why removing `directory` would destroy the registry, a run or a data root (None if it would not).

    Protected: `directory` is, holds or lies inside the registry's home, a registered run directory or
    a registered data root; or anything under it looks like one (a registry file, a checkpoints
    directory with checkpoints, a data manifest or token shards).
    """
    directory = directory.resolve()
    for what, path in _registered(home):
        path = path.resolve()
        if directory == path or path.is_relative_to(directory):
            return f"{directory} holds {what} {path}"
        if directory.is_relative_to(path) and what != "the registry of":
            return f"{directory} is inside {what} {path}"
    for root, dirs, names in os.walk(directory):
        here = Path(root)
        if DB_NAME in names:
            return f"{directory} holds a gptctl registry ({here / DB_NAME})"
        if here.name == "checkpoints" and any(n.startswith("model_") and n.endswith(".pt") for n in names):
            return f"{directory} holds checkpoints ({here})"
        if any(n in _DATA_MARKERS or n.endswith(_SHARD_SUFFIXES) for n in names):
            return f"{directory} holds prepared data ({here})"
    return None


def _registered(home: Path) -> list[tuple[str, Path]]:
    """The registry file's directory, every run directory and every data root the registry knows."""
    found = [("the registry of", registry_path(home).parent)]
    if not registry_path(home).is_file():
        return found
    from gptctl.registry import open_registry
    from gptctl.registry.homepaths import home_of, run_dir

    db = open_registry(home, create=False)
    for row in db.query("select run_dir, settings from runs"):
        found.append(("the run directory", Path(run_dir(home_of(db), row["run_dir"]))))
        data_root = json.loads(row["settings"] or "{}").get("data_root")
        if data_root:
            found.append(("the data root", Path(data_root)))
    return found
