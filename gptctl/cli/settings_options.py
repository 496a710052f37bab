"""Command-line options generated from the settings groups, so each setting is declared exactly once."""

import inspect
import typing
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from pydantic_core import PydanticUndefined

from gptctl.errors import UserError
from gptctl.settings import TRAIN_GROUPS, LaunchSettings, is_option, option_name, rules_of

# Each group's options under its own heading in --help; on the command line they are all flat.
GROUPS = tuple((group, group.panel) for group in TRAIN_GROUPS) + ((LaunchSettings, "Launch (this launch only)"),)


def _cli_type(annotation: Any) -> Any:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    base = args[0] if typing.get_origin(annotation) in (typing.Union, getattr(__import__("types"), "UnionType")) and args else annotation
    if base in (int, float, bool, Path):
        return Optional[base]
    return Optional[str]  # literals, lists and strings are parsed and checked by pydantic


def _help(field) -> str:
    text = (field.description or "").replace("[", "\\[")  # rich markup would eat "[wandb]" in 'gptctl[wandb]'
    if "(default:" not in text and field.default is not PydanticUndefined and field.default is not None:
        default = field.default
        text += f" (default: {str(default).lower() if isinstance(default, bool) else default})"
    return text


def with_settings_options(kind: str, defaults: dict[str, Any] | None = None,
                          groups: tuple = GROUPS, only: frozenset[str] | None = None,
                          refused: dict[str, str] | None = None) -> Callable:
    """Decorate a command `fn(settings_values: dict, **own_options)`: adds one option per setting of `kind`
    in `groups` (or only those named in `only`), and a hidden one per setting in `refused` that the command
    refuses in one line with its reason (instead of click's "No such option").

    Every generated option defaults to None, meaning "not given", so a --config file value
    is overridden only by what the user actually typed.
    """
    defaults = defaults or {}

    def decorate(fn: Callable) -> Callable:
        own = list(inspect.signature(fn).parameters.values())[1:]
        names = []
        params = []
        annotations = {p.name: fn.__annotations__.get(p.name, p.annotation) for p in own}
        for panel, name, field in ((p, n, f) for m, p in groups for n, f in m.model_fields.items()):
            if not is_option(name, kind) or (only is not None and name not in only):
                continue
            cli_type = _cli_type(field.annotation)
            decls = [f"{option_name(name)}/--no-{name.replace('_', '-')}"] if cli_type is Optional[bool] else [option_name(name)]
            decls += rules_of(name).get("aliases", [])
            help_text = _help(field)
            if name in defaults:
                help_text = help_text.split(" (default:")[0] + f" (default: {defaults[name]})"
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=typer.Option(None, *decls, help=help_text, rich_help_panel=panel), annotation=cli_type))
            annotations[name] = cli_type
            names.append(name)
        for name in refused or {}:
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[str],
                                            default=typer.Option(None, option_name(name), hidden=True)))
            annotations[name] = Optional[str]

        def command(**kwargs):
            for name, why in (refused or {}).items():
                if kwargs.pop(name) is not None:
                    raise UserError(f"{option_name(name)}: {why}; drop the option")
            values = {n: kwargs.pop(n) for n in names}
            return fn(values, **kwargs)

        command.__name__, command.__doc__ = fn.__name__, fn.__doc__
        command.__signature__ = inspect.Signature(
            [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own] + params
        )
        command.__annotations__ = annotations
        return command

    return decorate
