"""Settings files: --config files read (TOML), and a run's settings written as one (--save-config).

gptctl/settings.py holds the settings and their rules; this module only reads and writes their files.
"""

import tomllib
from pathlib import Path
from typing import Any

from gptctl.errors import UserError
from gptctl.presets import RECIPES
from gptctl.settings import (FINETUNE_FROM_PARENT, RENAMED_SETTINGS, TrainSettings, is_option, rules_of,
                             setting_field)

# Why a setting that is not an option cannot come from a --config file, and what to do instead.
_NOT_IN_CONFIG = {
    "pretrained_checkpoint": "pass the checkpoint on the command line (pretrain --init-from, finetune "
                             "--pretrained-checkpoint)",
    "block_size": "it comes from the checkpoint a run starts from",
    "data_fingerprint": "gptctl records what --data-root holds when a run is made",
    "kind": "the command (pretrain or finetune) sets it",
}


def given_settings(overrides: dict[str, Any], config_file: Path | None, kind: str) -> dict[str, Any]:
    """What the user set: a --config file's settings, then the command line's over them (None: not given).

    A config file holds its recipe's values besides its own choices (--save-config writes every setting): with
    another --recipe on the command line, the file's values that are just its recipe's (classic's: the defaults)
    are that recipe's, not choices, and give way to the command line's recipe, so the run trains with, and
    records, the recipe it names; what the file sets otherwise still overrides the recipe."""
    given = read_config(config_file, kind) if config_file is not None else {}
    command_line = {k: v for k, v in overrides.items() if v is not None}
    recipe = given.get("recipe", "classic")
    if command_line.get("recipe", recipe) != recipe:
        recipe_keys = {k for values in RECIPES.values() for k in values}
        own = lambda k: RECIPES.get(recipe, {}).get(k, TrainSettings.model_fields[k].default)  # noqa: E731
        given = {k: v for k, v in given.items() if not (k in recipe_keys and v == own(k))}
    return {**given, **command_line}


def read_config(path: Path, kind: str) -> dict[str, Any]:
    """The settings of a --config file: only those `gptctl KIND` takes as options, as on its command line."""
    if not path.is_file():
        raise UserError(f"--config: file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"--config: {path} is not valid TOML ({exc})") from None
    values = {key.replace("-", "_"): value for key, value in data.items()}
    for key in values:
        if key in RENAMED_SETTINGS:
            continue  # a config file saved by an earlier version: TrainSettings reads it as what it became
        if setting_field(key) is None:
            raise UserError(f"--config: unknown setting {key!r} in {path}; `gptctl {kind} --help` lists the settings")
        if not is_option(key, kind):
            only = rules_of(key).get("only")
            why = (_NOT_IN_CONFIG.get(key) or (FINETUNE_FROM_PARENT.get(key) if kind == "finetune" else None)
                   or f"it is a setting of `gptctl {only}`, not of `gptctl {kind}`")
            raise UserError(f"--config: {path} sets {key!r}, which a config file may not: {why}")
    return values


def to_toml(settings: TrainSettings) -> str:
    """The settings as TOML that --config reads back (flat keys, so a tiny writer suffices).

    Only the options of the run's kind are settings; the rest (e.g. the checkpoint it started from)
    are kept as comments, since a config file may not set them."""
    lines = []
    for key, value in settings.model_dump(mode="json").items():
        if value is None or key == "kind":
            continue
        lines.append(("" if is_option(key, settings.kind) else "# ") + f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
