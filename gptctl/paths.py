"""Where gptctl keeps its state: GPTCTL_HOME (or --home), default ./runs."""

import os
from pathlib import Path

DB_NAME = "gptctl.db"


def home_dir() -> Path:
    return Path(os.environ.get("GPTCTL_HOME") or "runs")


def registry_path(home: Path | None = None) -> Path:
    return (home or home_dir()) / DB_NAME
