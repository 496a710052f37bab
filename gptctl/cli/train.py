"""`gptctl pretrain` and `gptctl resume`."""

from pathlib import Path
from typing import Any, Optional

import typer

from gptctl import control
from gptctl.cli import app
from gptctl.cli.settings_options import with_settings_options
from gptctl.errors import UserError
from gptctl.registry import open_registry, queries
from gptctl.paths import home_dir
from gptctl.settings import build_settings


def _finish(outcome: control.Outcome, as_json: bool) -> None:
    info = control.summary(outcome.run)
    if as_json:
        typer.echo(control.dump(info))
    else:
        loss = f"{info['loss']:.4f}" if info["loss"] is not None else "-"
        val = f"{info['val_loss']:.4f}" if info["val_loss"] is not None else "-"
        typer.echo(f"run {info['run_id']} {info['status']} at step {info['last_step']}/{info['max_steps']}: "
                   f"loss {loss}, val loss {val}; {len(info['checkpoints'])} checkpoint(s) in {info['run_dir']}", err=True)
    raise typer.Exit(outcome.exit_code)


@app.command()
@with_settings_options()
def pretrain(
    values: dict[str, Any],
    config: Optional[Path] = typer.Option(None, "--config", help="TOML file of settings; command-line options override it."),
    save_config: bool = typer.Option(False, "--save-config", help="Also write the resolved settings as config.toml in the run directory."),
    auto_resume: bool = typer.Option(False, "--auto-resume", help="Continue the newest unfinished run with this --run-name, or start one."),
    resume: bool = typer.Option(False, "--resume", help="Start from the checkpoint given by --checkpoint-path."),
    checkpoint_path: Optional[Path] = typer.Option(None, "--checkpoint-path", help="Checkpoint file for --resume."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary at the end."),
):
    """Train GPT-2 from scratch on prepared token shards (torchrun workers; DDP with several processes)."""
    settings = build_settings(values, config, kind="pretrain")
    control.check_checkpoint_path(checkpoint_path, resume)
    control.check_data(settings)
    control.check_world_size(settings)
    if auto_resume and not resume:
        db = open_registry(home_dir(), create=False)
        previous = queries.newest_unfinished_run(db, settings.run_name or settings.kind, settings.kind)
        if previous is not None:
            settings = control.resume_settings(previous, values.get("max_steps"))
            _resume(previous, settings, as_json)
    run, lock = control.create_run(settings, control.command_line(), save_config)
    typer.echo(f"run {run['id']} ({run['name']}) in {run['run_dir']}", err=True)
    _finish(control.execute(run, lock, init_checkpoint=str(checkpoint_path) if resume else None), as_json)


def _resume(run: dict[str, Any], settings, as_json: bool) -> None:
    lock = control.lock_existing(run)
    db = open_registry(home_dir())
    queries.update_run(db, run["id"], settings=settings.model_dump_json(), max_steps=settings.max_steps, status="created")
    typer.echo(f"resuming run {run['id']} ({run['name']}) from step {run['last_step'] or 0}", err=True)
    _finish(control.execute(queries.get_run(db, run["id"]), lock), as_json)


@app.command("resume")
def resume_cmd(
    run_ref: str = typer.Argument(..., metavar="RUN", help="Run id (or unique prefix) or name."),
    max_steps: Optional[int] = typer.Option(None, "--max-steps", help="Raise the run's step budget."),
    as_json: bool = typer.Option(False, "--json", help="Print a machine-readable summary at the end."),
):
    """Continue a run from its newest valid checkpoint with its stored settings."""
    db = open_registry(home_dir(), create=False)
    run = queries.resolve_run(db, run_ref)
    if run["status"] == "completed" and max_steps is None:
        raise UserError(f"run {run['id']} is completed at step {run['last_step']}; pass --max-steps to train further")
    settings = control.resume_settings(run, max_steps)
    _resume(run, settings, as_json)
