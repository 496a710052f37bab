"""How the registry names files: relative to the home that holds it, so that a home is a self-contained thing.

A copied or moved home (`cp -a`, `mv`) then acts on its own files where it is now, never on the
original's: a run's directory is always HOME/NAME-ID, whatever a row says, and a checkpoint inside the
home is stored as `NAME-ID/checkpoints/model_N.pt`. Only a file outside the home (a checkpoint a run was
started from with --init-from FILE) is stored as an absolute path; retention never deletes such a file.
"""

import re
from pathlib import Path

RUN_DIR_NAME = re.compile(r".+-[0-9a-f]{8}", re.DOTALL)  # NAME-ID, as control.create_run names it


def absolute(path: Path | str) -> Path:
    """`path` made absolute with its directory's symlinks resolved, its own name kept (a symlink stays
    a symlink, so that checks on the file itself still see it)."""
    path = Path(path).expanduser().absolute()
    return path.parent.resolve() / path.name


def to_stored(home: Path, path: Path | str | None) -> str | None:
    """The registry's form of a file path: relative to `home` (resolved) when inside it, else absolute.
    `path` is absolute, or already in this form (relative to the home, never to the working directory)."""
    if path is None or not Path(path).is_absolute():
        return None if path is None else str(path)
    path = absolute(path)
    return str(path.relative_to(home)) if path.is_relative_to(home) else str(path)


def from_stored(home: Path, stored: str | None) -> str | None:
    """The file a stored path names in this home."""
    if stored is None:
        return None
    return stored if Path(stored).is_absolute() else str(home / stored)


def run_dir(home: Path, stored: str) -> str:
    """A run's directory: always HOME/NAME-ID (only its last component is ever taken from a row)."""
    return str(home / Path(stored).name)


def adopt(home: Path, path: str | None, run_dirs: dict[str, str] | None = None) -> str | None:
    """The stored form of an absolute path written by an older version or in another home (the original
    of a copy): recognised by what it is, a file in a run directory or the imports of this home, not by
    where that home was. `run_dirs` maps old absolute run directories to their NAME-ID."""
    if path is None or not Path(path).is_absolute():
        return path
    path_ = Path(path)
    for old, name in (run_dirs or {}).items():
        if path_.is_relative_to(old):
            return str(Path(name) / path_.relative_to(old))
    stored = to_stored(home, path_)
    if not Path(stored).is_absolute():
        return stored
    if path_.parent.name == "checkpoints" and RUN_DIR_NAME.fullmatch(path_.parent.parent.name) \
            and (home / path_.parent.parent.name).is_dir():
        return f"{path_.parent.parent.name}/checkpoints/{path_.name}"
    if path_.parent.name == "imports" and (home / "imports" / path_.name).is_file():
        return f"imports/{path_.name}"
    return stored


def home_of(db) -> Path:
    """The (resolved) home of an open registry: the directory of its file, as SQLite reports it, so
    that a row's paths are read against the home the registry is in now."""
    home = getattr(db, "gptctl_home", None)
    if home is None:
        file = next((row[2] for row in db.execute("PRAGMA database_list").fetchall() if row[1] == "main"), "")
        home = Path(file).resolve().parent if file else Path.cwd().resolve()  # in memory: no rows to place
        db.gptctl_home = home
    return home
