"""`gptctl export`: write a checkpoint's model as a transformers directory or as plain safetensors."""

from contextlib import nullcontext
from pathlib import Path

import typer

from gptctl.cli import app
from gptctl.errors import UserError
from gptctl.paths import home_dir
from gptctl.refs import checkpoint_for_reading
from gptctl.protected import why_protected

FORMATS = ("hf", "safetensors")  # gptctl.engine.hf.WRITERS; repeated here so a bad --format never imports torch


def _check_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--output: {out} is a file; give a directory to create")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise UserError(f"--output: {out} is not empty; give a new or empty directory, or --force to replace it")
        reason = why_protected(out, home_dir())
        if reason:
            raise UserError(f"--output: {reason}, and --force never removes those; give a new directory")


@app.command("export")
def export_cmd(
    checkpoint: str = typer.Argument(..., metavar="RUN[:STEP]|PATH",
                                     help="A run (its newest valid checkpoint), RUN:STEP, or a checkpoint file."),
    fmt: str = typer.Option("hf", "--format", show_default=False,
                            help="hf: a directory transformers' AutoModelForCausalLM.from_pretrained loads (GPT2LMHeadModel "
                                 "for --arch gpt2, Qwen3ForCausalLM for modern), with GPT-2 tokenizer files; safetensors: gptctl's own weights and gptctl.json. (default: hf)"),
    output: Path = typer.Option(..., "--output", "-o", help="Directory to write; must be new or empty."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --output directory."),
):
    """Export a checkpoint's model for Hugging Face transformers or as plain safetensors weights."""
    if fmt not in FORMATS:
        raise UserError(f"--format: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    out = output.expanduser().resolve()
    _check_output(out, force)
    with checkpoint_for_reading(checkpoint, "RUN[:STEP]|PATH", home_dir()) as path:  # retention spares it while it loads
        if path.is_relative_to(out):
            raise UserError(f"--output: {out} holds the checkpoint being exported; choose another directory")
        from gptctl.engine import hf
        from gptctl.engine.sample import Sampler  # torch: only once the command line is known to be good

        hf.require_safetensors("--format")  # a missing package fails before the model is loaded
        loaded = Sampler(path, "cpu", option="RUN[:STEP]|PATH")
    from rich.console import Console

    typer.echo(f"exporting {path}: {loaded.describe()}", err=True)
    console = Console(stderr=True)
    info = {"model": loaded.settings.model, "recipe": loaded.settings.recipe, "kind": loaded.settings.kind,
            "step": loaded.step}
    with console.status(f"writing {out}") if console.is_terminal else nullcontext():
        names = hf.export(loaded.model, loaded.enc, fmt, out, info)
    typer.echo(f"wrote {', '.join(names)}", err=True)
    if fmt == "hf":
        typer.echo(f'load it with transformers: AutoModelForCausalLM.from_pretrained("{out}"), '
                   f'AutoTokenizer.from_pretrained("{out}")', err=True)
    typer.echo(str(out))
