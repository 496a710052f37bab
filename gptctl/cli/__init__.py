"""The command-line interface: parses, calls into gptctl, prints. Nothing heavy is imported here."""

import os
import re
import sqlite3
import sys
from pathlib import Path

import typer
from typer.core import TyperGroup

from gptctl.errors import UserError
from gptctl.paths import home_dir

# The old scripts took `--max_steps`; their users still type it. Rewriting the option name
# once, before Click parses, makes every snake_case spelling an alias without doubling --help.
_SNAKE_OPTION = re.compile(r"^(--[a-z0-9]+(?:_[a-z0-9]+)+)(=.*)?$", re.DOTALL)


def kebab_args(args: list[str]) -> list[str]:
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + list(args[i:])
        match = _SNAKE_OPTION.match(arg)
        out.append(match.group(1).replace("_", "-") + (match.group(2) or "") if match else arg)
    return out


class GptctlGroup(TyperGroup):
    def main(self, args=None, *pargs, **kwargs):
        args = sys.argv[1:] if args is None else list(args)
        return super().main(kebab_args(args), *pargs, **kwargs)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(exc.exit_code)
        except sqlite3.DatabaseError as exc:  # damage found past opening (a corrupt page, a foreign file)
            typer.echo(f"Error: the registry in {home_dir()} is damaged ({exc}); `gptctl registry rebuild` "
                       "moves it aside and re-creates it from the run directories", err=True)
            raise typer.Exit(2)


app = typer.Typer(
    cls=GptctlGroup,
    name="gptctl",
    help="Train, finetune, resume and manage nanoGPT-style GPT-2 runs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def root(
    home: Path = typer.Option(
        None,
        "--home",
        envvar="GPTCTL_HOME",
        help="Directory holding the registry (gptctl.db) and one directory per run. (default: ./runs)",
    ),
):
    if home is not None:
        os.environ["GPTCTL_HOME"] = str(home)


def _register_commands() -> None:
    # Each module adds its commands to `app`; imported here so `gptctl --help` lists them all.
    from gptctl.cli import ckpt, data, estimate, eval, export, registry, runs, sample, train  # noqa: F401


def main() -> None:
    app()


_register_commands()
