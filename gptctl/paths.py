"""Where gptctl keeps its state: GPTCTL_HOME (or --home), default ./runs."""

import os
from pathlib import Path

from gptctl.errors import UserError

DB_NAME = "gptctl.db"


def home_dir() -> Path:
    """The home directory (it need not exist yet); UserError when something else is in its place."""
    home = Path(os.environ.get("GPTCTL_HOME") or "runs")
    try:
        if home.exists() and not home.is_dir():
            raise UserError(f"GPTCTL_HOME: {home} is not a directory; point GPTCTL_HOME (or --home) at a directory")
    except OSError as exc:  # e.g. a name longer than the filesystem allows
        raise UserError(f"GPTCTL_HOME: {exc.strerror} ({home}); point GPTCTL_HOME (or --home) at a shorter path") from None
    return home


# Where `data prepare` writes and `pretrain` reads when --data-root is left out, relative to the current
# directory as the home's default is; runs record it resolved, so a resume from elsewhere finds the same.
DATA_ROOT_ENV = "GPTCTL_DATA_ROOT"
DEFAULT_DATA_ROOT = "data"


def default_data_root() -> Path:
    return Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)


def writable_home() -> Path:
    """The home, created if it is missing, as a directory this process can write in; UserError otherwise."""
    home = home_dir()
    try:
        home.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"GPTCTL_HOME: cannot create {home} ({exc.strerror}); point GPTCTL_HOME (or --home) "
                        "at a directory you can write") from None
    if not os.access(home, os.W_OK | os.X_OK):
        raise UserError(f"GPTCTL_HOME: {home} is not writable; point GPTCTL_HOME (or --home) at a directory you can write")
    registry = registry_path(home)
    if registry.exists() and not os.access(registry, os.W_OK):  # its commands would write a copy in memory
        raise UserError(f"GPTCTL_HOME: the registry {registry} is not writable; make it writable (chmod u+w), or "
                        "point GPTCTL_HOME (or --home) at a home you can write")
    return home


def registry_path(home: Path | None = None) -> Path:
    return (home or home_dir()) / DB_NAME
