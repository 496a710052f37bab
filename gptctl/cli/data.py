"""`gptctl data ...`: prepare tokenized datasets. Parses and shows progress; the work is in gptctl/data/."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from gptctl.cli import app
from gptctl.errors import UserError

data_app = typer.Typer(help="Prepare tokenized datasets.", no_args_is_help=True)
app.add_typer(data_app, name="data")


def _number(value: str | None, option: str, kind=int):
    """Counts take K/M/B suffixes (100M); parsed here so a typo is a one-line error."""
    if value is None:
        return None
    if kind is int:
        from gptctl.data.prepare import parse_count

        return parse_count(value, option)
    try:
        return kind(value)
    except ValueError:
        raise UserError(f"{option}: {value!r} is not a number") from None


@data_app.command("prepare")
def prepare_cmd(
    source: str = typer.Argument(
        None, metavar="[SOURCE]", show_default=False,
        help="fineweb-edu (HuggingFaceFW/fineweb-edu, streamed) or tinyshakespeare (downloaded); leave out to use --input.",
    ),
    inputs: list[Path] = typer.Option(
        None, "--input", "-i", show_default=False,
        help="Local input file; repeat for several. .txt/other: one document; .jsonl: field 'text'; .parquet: column 'text'.",
    ),
    data_root: Path = typer.Option(None, "--data-root", show_default=False, help="Directory to write the shards and "
                                   "manifest.json into (default: $GPTCTL_DATA_ROOT, else ./data, where pretrain reads)."),
    data_files: list[Path] = typer.Option(
        None, "--data-files", show_default=False,
        help="fineweb-edu only: read these local .parquet/.jsonl files (FineWeb-Edu's schema) instead of the Hub, "
        "through the same streaming code; repeat for several.",
    ),
    subset: str = typer.Option(None, "--subset", help="fineweb-edu only: the Hub subset to stream (default: sample-10BT)."),
    max_tokens: str = typer.Option(None, "--max-tokens", help="Stop after this many tokens, e.g. 1B (default: all of the source)."),
    name: str = typer.Option(
        None, "--name", help="Shard file-name prefix (default: edufineweb, tinyshakespeare, or the stem of the first --input)."
    ),
    tokenizer: str = typer.Option("gpt2", "--tokenizer", help="gpt2 or r50k_base (the same GPT-2 BPE)."),
    val_fraction: str = typer.Option(
        None, "--val-fraction",
        help="The LAST fraction of the tokens is val; local files and tinyshakespeare only (default: 0.1). "
        "Costs a counting pass.",
    ),
    val_tokens: str = typer.Option(
        None, "--val-tokens",
        help="The FIRST N tokens are val, e.g. 100M (default for fineweb-edu: one shard, as build-nanogpt's fineweb.py).",
    ),
    shard_size: str = typer.Option("100M", "--shard-size", help="Maximum tokens per shard file."),
    workers: str = typer.Option(None, "--workers", help="Tokenizer processes (default: the number of CPUs)."),
    force: bool = typer.Option(False, "--force", help="Start over: replace a dataset or an unfinished prepare in --data-root."),
    as_json: bool = typer.Option(False, "--json", help="Print the manifest as JSON instead of a summary."),
):
    """Tokenize a corpus into uint16 .npy shards (train + val) and a manifest, on all cores.

    An interrupted prepare continues from its last finished shard when the same command is run again.
    """
    from gptctl.data.prepare import PrepareOptions, run, validate
    from gptctl.paths import default_data_root

    data_root = data_root or default_data_root()
    opts = PrepareOptions(
        data_root=data_root,
        inputs=list(inputs or []),
        source=source,
        data_files=list(data_files or []),
        subset=subset,
        max_tokens=_number(max_tokens, "--max-tokens"),
        name=name,
        tokenizer=tokenizer,
        val_fraction=_number(val_fraction, "--val-fraction", float),
        val_tokens=_number(val_tokens, "--val-tokens"),
        shard_size=_number(shard_size, "--shard-size"),
        workers=_number(workers, "--workers"),
        force=force,
    )
    plan = validate(opts)  # fail fast, before the progress bar appears
    if plan.resume:
        done = plan.resume["shards"]
        typer.echo(
            f"Resuming the unfinished prepare in {data_root}: {len(done)} shards "
            f"({sum(s['tokens'] for s in done):,} tokens) are done.",
            err=True,
        )
    manifest = _run_with_progress(plan, run)

    if as_json:
        typer.echo(json.dumps(manifest, indent=2))
    else:
        typer.echo(
            f"Prepared {manifest['name']}: {manifest['train_tokens']:,} train tokens, "
            f"{manifest['val_tokens']:,} val tokens, {len(manifest['shards'])} shards in {data_root}"
        )


def _run_with_progress(plan, run) -> dict:
    """A rich bar per phase with tokens, tokens/s and, when the total is known, an ETA."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.fields[tokens]:>14,} tokens {task.fields[rate]:>12}"),
        TimeRemainingColumn(),
        console=console,
        transient=True,
        disable=not console.is_terminal,
    )
    tasks: dict[str, tuple] = {}  # phase -> (task id, tokens at its start, start time)

    def on_progress(phase: str, tokens: int, done: int, total: int | None) -> None:
        if phase not in tasks:  # resumed tokens must not count as speed
            task = progress.add_task(phase, total=total, completed=done, tokens=tokens, rate="")
            tasks[phase] = (task, tokens, time.monotonic())
        task, start_tokens, start = tasks[phase]
        elapsed = max(time.monotonic() - start, 1e-9)
        rate = f"{(tokens - start_tokens) / elapsed:,.0f}/s" if tokens > start_tokens else ""
        progress.update(task, completed=done, tokens=tokens, rate=rate)

    with progress:
        return run(plan, on_progress)
