"""`gptctl eval`: HellaSwag accuracy or val loss of a checkpoint."""

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer

from gptctl.cli import app
from gptctl.errors import UserError
from gptctl.paths import home_dir
from gptctl.refs import checkpoint_for_reading
from gptctl.settings import DEVICES

TASKS = ("hellaswag", "val-loss")
CHECKPOINT = "RUN[:STEP]|PATH"


def _check(task, data_root, hellaswag_file, limit, batch_size, device) -> None:
    if task not in TASKS:
        raise UserError(f"--task: unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task == "hellaswag" and data_root is not None:
        raise UserError("--data-root: only goes with --task val-loss; drop it for hellaswag")
    if task == "hellaswag" and batch_size is not None:
        raise UserError("--batch-size: only goes with --task val-loss; hellaswag scores one item (4 endings) at a time")
    if task == "val-loss" and hellaswag_file is not None:
        raise UserError("--hellaswag-file: only goes with --task hellaswag")
    if limit is not None and limit < 1:
        raise UserError(f"--limit: must be at least 1, got {limit}")
    if batch_size is not None and batch_size < 1:
        raise UserError(f"--batch-size: must be at least 1, got {batch_size}")
    if device not in DEVICES:
        raise UserError(f"--device: unknown device {device!r}; choose one of {', '.join(DEVICES)}")


@contextmanager
def _progress(description: str, total: int, show_accuracy: bool):
    """A rich bar on stderr when it is a terminal; yields `advance(**fields)`."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    console = Console(stderr=True)
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    if show_accuracy:
        columns.insert(3, TextColumn("acc {task.fields[acc]}"))
    progress = Progress(*columns, console=console, transient=True, disable=not console.is_terminal)
    task = progress.add_task(description, total=total, acc="-")
    with progress:
        yield lambda **fields: progress.update(task, advance=1, **fields)


@app.command("eval")
def eval_cmd(
    checkpoint: str = typer.Argument(..., metavar=CHECKPOINT,
                                     help="A run (its newest valid checkpoint), RUN:STEP, or a checkpoint file."),
    task: str = typer.Option(..., "--task", help="hellaswag (4-way completion accuracy) or val-loss (prepared val shards)."),
    data_root: Optional[Path] = typer.Option(None, "--data-root", show_default=False,
                                             help="val-loss: prepared shards to read the val split of. (default: the run's data root, from the checkpoint)"),
    hellaswag_file: Optional[Path] = typer.Option(None, "--hellaswag-file", show_default=False,
                                                  help="hellaswag: a local JSONL file in HellaSwag's schema (ctx, endings, label). "
                                                  "(default: the validation set, downloaded once into GPTCTL_CACHE or ~/.cache/gptctl)"),
    limit: Optional[int] = typer.Option(None, "--limit", show_default=False,
                                        help="Only the first N items (hellaswag) or batches (val-loss). (default: all)"),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", show_default=False,
                                             help="val-loss: sequences per batch. (default: the run's --batch-size)"),
    device: str = typer.Option("auto", "--device", show_default=False, help="auto, cuda, cpu or mps. (default: auto)"),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON."),
):
    """Evaluate a checkpoint: HellaSwag accuracy, or the mean loss over the val split of prepared shards."""
    _check(task, data_root, hellaswag_file, limit, batch_size, device)
    with checkpoint_for_reading(checkpoint, CHECKPOINT, home_dir()) as path:  # retention spares it while it loads
        if task == "hellaswag":
            from gptctl.data.hellaswag import fetch_val_file, read_items

            items = read_items(hellaswag_file or fetch_val_file(), limit)  # a bad file fails before the model loads
        from gptctl.engine.sample import Sampler  # torch: only once the command line is known to be good

        loaded = Sampler(path, device, option=CHECKPOINT)
    if task == "hellaswag":
        result = _hellaswag(loaded, path, items)
        summary = (f"hellaswag: accuracy {result['accuracy']:.4f} ({result['correct']}/{result['total']}); "
                   f"by summed loss {result['accuracy_sum']:.4f}")
    else:
        result = _val_loss(loaded, path, data_root, batch_size, limit)
        summary = f"val loss {result['val_loss']:.4f} over {result['tokens']:,} tokens ({result['batches']} batches)"
    typer.echo(json.dumps({"task": task, "checkpoint": str(path)} | result, indent=2) if as_json else summary)


def _announce(loaded, path: Path) -> None:
    typer.echo(f"evaluating {path}: {loaded.describe()}", err=True)


def _hellaswag(loaded, path: Path, items) -> dict:
    from gptctl.data.hellaswag import encode
    from gptctl.engine.distributed import autocast_for
    from gptctl.engine.evaluate import hellaswag_accuracy

    encoded = encode(items, loaded.enc)
    _announce(loaded, path)
    with _progress("hellaswag", len(encoded), show_accuracy=True) as advance:
        score = hellaswag_accuracy(loaded.model, encoded, loaded.device, autocast_for(loaded.device, loaded.dtype),
                                   on_item=lambda correct, done: advance(acc=f"{correct / done:.3f}"))
    return {"accuracy": score.accuracy, "correct": score.correct, "total": score.total,
            "accuracy_sum": score.accuracy_sum, "correct_sum": score.correct_sum}


def _val_loss(loaded, path: Path, data_root: Path | None, batch_size: int | None, limit: int | None) -> dict:
    from gptctl.engine.distributed import autocast_for
    from gptctl.engine.evaluate import val_batches, val_loss

    settings = loaded.settings
    data_root = data_root or settings.data_root
    if data_root is None:
        raise UserError(f"--data-root: the checkpoint is a {settings.kind} model with no data root in its settings; "
                        "give --data-root DIR of prepared shards")
    batch_size = batch_size or settings.batch_size
    stream, batches = val_batches(data_root, settings.seq_len, batch_size, limit)
    _announce(loaded, path)  # only once the shards are known to be good: errors stay one line
    with _progress("val loss", batches, show_accuracy=False) as advance:
        result = val_loss(loaded.model, stream, batches, settings.seq_len, batch_size, loaded.device,
                          autocast_for(loaded.device, loaded.dtype), on_batch=advance)
    return {"val_loss": result.loss, "tokens": result.tokens, "batches": result.batches, "data_root": str(data_root)}
