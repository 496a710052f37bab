"""`gptctl data ...`: prepare tokenized datasets. Heavy imports happen inside the commands."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from gptctl.cli import app

data_app = typer.Typer(help="Prepare tokenized datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("prepare")
def prepare_cmd(
    inputs: list[Path] = typer.Option(
        ..., "--input", "-i", help="Input file; repeat for several. .txt/other: one document; .jsonl: field 'text'; .parquet: column 'text'."
    ),
    data_root: Path = typer.Option(..., "--data-root", help="Directory to write the shards and manifest.json into."),
    name: str = typer.Option(None, "--name", help="Shard file-name prefix (default: stem of the first --input)."),
    tokenizer: str = typer.Option("gpt2", "--tokenizer", help="gpt2 or r50k_base (the same GPT-2 BPE)."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Fraction of the token stream, taken from its end, used for val."),
    shard_size: int = typer.Option(100_000_000, "--shard-size", help="Maximum tokens per shard file."),
    force: bool = typer.Option(False, "--force", help="Replace an existing manifest.json and *.npy shards in --data-root."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON instead of a summary."),
):
    """Tokenize local text/JSONL/Parquet files into uint16 .npy shards (train + val) and a manifest."""
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    from gptctl.data.prepare import PrepareOptions, prepare, total_input_bytes, validate

    opts = PrepareOptions(
        inputs=list(inputs),
        data_root=data_root,
        name=name,
        tokenizer=tokenizer,
        val_fraction=val_fraction,
        shard_size=shard_size,
        force=force,
    )
    validate(opts)  # fail fast, before the progress bar appears

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]tokenizing"),
        BarColumn(),
        DownloadColumn(),
        TextColumn("{task.fields[docs]:,} docs"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    with progress:
        task = progress.add_task("tokenizing", total=total_input_bytes(opts.inputs), docs=0)
        docs = 0

        def on_progress(ndocs: int, nbytes: int) -> None:
            nonlocal docs
            docs += ndocs
            progress.update(task, advance=nbytes, docs=docs)

        manifest = prepare(opts, on_progress=on_progress)

    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
    else:
        typer.echo(
            f"Prepared {manifest['name']}: {manifest['train_tokens']:,} train tokens, "
            f"{manifest['val_tokens']:,} val tokens, {len(manifest['shards'])} shards in {data_root}"
        )
