"""The command-line interface: parses, calls into gptctl, prints. Nothing heavy is imported here."""

import importlib
import os
import re
import sys
from pathlib import Path

import typer
from typer.core import TyperCommand, TyperGroup, TyperOption

from gptctl.errors import UserError
from gptctl.paths import home_dir

# The old scripts took `--max_steps`; their users still type it. Rewriting the option name
# once, before Click parses, makes every snake_case spelling an alias without doubling --help.
_SNAKE_OPTION = re.compile(r"^(--[a-z0-9]+(?:[-_][a-z0-9]+)*)(=.*)?$", re.DOTALL)


# Flags of the old scripts that are now options with values: written as they were, they mean this.
DEFAULT_LOG_GRADIENTS = "100"  # bare --log_gradients: every 100 steps
_SEED_FLAGS = {
    "--decay-lr": ["--lr-scheduler", "cosine"], "--decay-lr=true": ["--lr-scheduler", "cosine"],
    "--no-decay-lr": ["--lr-scheduler", "constant"], "--decay-lr=false": ["--lr-scheduler", "constant"],
}
_INTEGER = re.compile(r"^[-+]?\d+$")


def kebab_args(args: list[str]) -> list[str]:
    out = []
    for i, arg in enumerate(args):
        if arg == "--":
            return out + list(args[i:])
        match = _SNAKE_OPTION.match(arg)
        arg = match.group(1).replace("_", "-") + (match.group(2) or "") if match else arg
        if arg.lower() in _SEED_FLAGS:
            out += _SEED_FLAGS[arg.lower()]
        elif arg == "--log-gradients" and not (i + 1 < len(args) and _INTEGER.match(args[i + 1])):
            out += [arg, DEFAULT_LOG_GRADIENTS]
        else:
            out.append(arg)
    return out


# Top-level commands, the module that defines each and its one-line help. `gptctl --help` lists them
# from here without importing any command module; a command's module is imported only when that
# command runs (or shows its own help). tests/test_cli_validation.py checks these lines against the
# commands' own docstrings, so they cannot drift.
COMMANDS = {
    "pretrain": ("train", "Train GPT-2 on prepared token shards, from scratch or --init-from weights (torchrun "
                          "workers; DDP or FSDP)."),
    "finetune": ("train", "Instruction-tune a pretrained model on databricks-dolly-15k (or a local file in its "
                          "schema)."),
    "resume": ("train", "Continue a run from its newest valid checkpoint with its stored settings."),
    "data": ("data", "Prepare tokenized datasets."),
    "estimate": ("estimate", "Estimate FLOPs, training time, GPU memory, checkpoint disk and communication of a run."),
    "runs": ("runs_manage", "The run registry."),  # it imports runs.py, which defines `runs` and its list/show/plot
    "ckpt": ("ckpt", "Checkpoints and their retention."),
    "sample": ("sample", "Generate text from a checkpoint, streaming tokens to stdout as they are generated."),
    "chat": ("chat", "Chat with a checkpoint in the terminal, streaming each reply as it is generated."),
    "eval": ("eval", "Evaluate a checkpoint: HellaSwag accuracy, or the mean loss over the val split of prepared "
                     "shards."),
    "export": ("export", "Export a checkpoint's model for Hugging Face transformers or as plain safetensors weights."),
    "serve": ("serve", "Serve a checkpoint over an OpenAI-compatible HTTP API, with a chat page."),
    "registry": ("registry", "The registry file itself (gptctl.db)."),
}


class GptctlGroup(TyperGroup):
    _listing = False  # set while the group's own help is drawn: commands are then only names and lines

    def main(self, args=None, *pargs, **kwargs):
        args = sys.argv[1:] if args is None else list(args)
        return super().main(kebab_args(args), *pargs, **kwargs)

    def list_commands(self, ctx):
        return list(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return super().get_command(ctx, name)
        if self._listing:
            return TyperCommand(name, short_help=COMMANDS[name][1])
        if name not in self.commands:
            importlib.import_module(f"gptctl.cli.{COMMANDS[name][0]}")  # registers its commands on `app`
            self.commands.update(typer.main.get_command(app).commands)  # click commands of those imported
        return self.commands[name]

    def parse_args(self, ctx, args):
        if not args and self.no_args_is_help and not ctx.resilient_parsing:
            # Click's NoArgsIsHelpError leaves the help to typer's rich formatter, which the index no longer uses.
            typer.echo(ctx.get_help(), err=True)
            ctx.exit(2)
        return super().parse_args(ctx, args)

    def format_help(self, ctx, formatter):
        # The index of commands in Click's plain layout: typer's rich help costs more to import and draw
        # than the rest of `gptctl --help` together (each command's own --help keeps rich's panels).
        self._listing = True
        try:
            return super(TyperGroup, self).format_help(ctx, formatter)
        finally:
            self._listing = False

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            typer.echo(f"Error: {exc}", err=True)
            raise typer.Exit(exc.exit_code)
        except Exception as exc:
            sqlite3 = sys.modules.get("sqlite3")  # not imported at start: --help does not need it
            fixable = isinstance(exc, OSError) and exc.errno in _fixable_errnos()
            if not fixable and (sqlite3 is None or not isinstance(exc, sqlite3.Error)):
                raise
            # A full disk, a read-only home, a lock held too long or real damage, past opening: the real
            # cause in one line (registry/diagnose.py), never "damaged" for what is not.
            from gptctl.paths import registry_path
            from gptctl.registry import diagnose

            try:
                path = registry_path(home_dir())
            except UserError as bad_home:
                typer.echo(f"Error: {bad_home}", err=True)
                raise typer.Exit(2)
            typer.echo(f"Error: {diagnose.explain_file_error(exc, path) if fixable else diagnose.explain(exc, path)}",
                       err=True)
            raise typer.Exit(2)


def _fixable_errnos() -> tuple[int, ...]:
    from gptctl.registry.diagnose import FIXABLE_ERRNOS

    return FIXABLE_ERRNOS


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


def _flag_shows_no_type(display_type_rich):
    """Typer labels a flag `<bool>` in help, which reads as if it took a value (`--help <bool>`)."""
    def display(self, ctx):
        return None if self.is_flag else display_type_rich(self, ctx)
    return display


TyperOption.display_type_rich = _flag_shows_no_type(TyperOption.display_type_rich)


def main() -> None:
    app()
