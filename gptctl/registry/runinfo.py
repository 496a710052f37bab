"""run.json: what the registry knows of a run that its settings do not say, kept in its run directory
so that `gptctl registry rebuild` (gptctl/rebuild.py) can re-create the run's row from the directory."""

import json
from pathlib import Path
from typing import Any

from gptctl.atomic import write_text_atomic

RUN_INFO = "run.json"  # written by create_run beside config.json


def write_run_info(run: dict[str, Any]) -> None:
    keys = ("id", "name", "kind", "command", "parent_checkpoint", "parent_kind", "created_at", "host")
    write_text_atomic(Path(run["run_dir"]) / RUN_INFO, json.dumps({k: run.get(k) for k in keys}, indent=2) + "\n")
