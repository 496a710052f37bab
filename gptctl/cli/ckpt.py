"""`gptctl ckpt list|pin|unpin|prune|verify`."""

import json
from pathlib import Path
from typing import Optional

import typer
from gptctl.cli import app
from gptctl.cli.listing import format_duration, format_size, print_listing
from gptctl.errors import UserError
from gptctl.checkpoints import files, store
from gptctl.registry import open_registry, queries
from gptctl.paths import home_dir, writable_home

RETENTION_HELP = """Checkpoints and their retention.

Retention runs after every save (keeping the run's --keep-last-n-checkpoints) and on `ckpt prune`. It never deletes:

- a pinned checkpoint or a permanent step (--permanent-checkpoints);
- the newest valid checkpoint of a run;
- a checkpoint another run started from (a finetune's parent);
- a file outside the run's own checkpoints directory, whatever the registry says.

Retention decides on verified facts: before anything is deleted, the checkpoint it keeps as a run's newest must match its size and sha256 (cached by size, mtime and inode); one that does not is marked corrupt and the newest verified one takes its place. A checkpoint a reader (sample, export, eval, a finetune choosing its parent) holds is never deleted.

A file is removed before its row is marked deleted; an interrupted deletion is finished later. Every look (list, prune, verify) first reconciles the registry with the disk: vanished files are marked missing, files whose size changed corrupt. An unregistered model_*.pt is registered only by prune, verify and the commands that load checkpoints, and only if it is a regular file in the run's checkpoints directory that loads as a plain-data gptctl checkpoint of the step its name says.
"""

ckpt_app = typer.Typer(help=RETENTION_HELP, no_args_is_help=True)
app.add_typer(ckpt_app, name="ckpt")


@ckpt_app.command("list")
def list_cmd(
    run_ref: Optional[str] = typer.Option(None, "--run", help="Only this run (id, prefix or name)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Registered checkpoints: step, size, age, val loss at that step, pinned or permanent, state, path."""
    db = open_registry(home_dir(), create=False)
    rows = store.listing(db, _scope(db, run_ref))
    if as_json:
        typer.echo(json.dumps([{**r, "pinned": bool(r["pinned"])} for r in rows], indent=2))
        return
    headers = ("run", "step", "size", "age", "val loss", "pinned", "state", "health", "path")
    cells = [
        (r["run_id"], str(r["step"]), format_size(r["bytes"]), format_duration(r["age_s"]),
         "-" if r["val_loss"] is None else f"{r['val_loss']:.4f}",
         "permanent" if r["permanent"] else "yes" if r["pinned"] else "", r["state"],
         _health(r), _short(r["path"]))
        for r in rows
    ]
    print_listing(headers, [list(row) for row in cells], right=frozenset({"step", "size"}))
    valid = [r for r in rows if r["state"] == "valid"]
    typer.echo(f"{len(rows)} checkpoint(s); {len(valid)} valid, {format_size(sum(r['bytes'] or 0 for r in valid))}")


def _health(row) -> str:
    """healthy, or unhealthy (the why is in --json); blank where it was never judged."""
    return (row.get("health") or "").split(":")[0]


def _short(path: str) -> str:
    """Relative to the working directory when under it (the default home is ./runs), else absolute."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _scope(db, run_ref: str | None, inspect=None) -> str | None:
    """The run id that --run names (None: all runs), with those runs reconciled with the disk first."""
    run = queries.resolve_run(db, run_ref) if run_ref else None
    _reconcile(db, [run] if run else queries.list_runs(db), inspect)
    return run["id"] if run else None


def _reconcile(db, runs: list[dict], inspect=None) -> None:
    """`inspect` (files.stored_step, which imports torch) lets unregistered files that load as checkpoints
    of their step be registered; `ckpt list` stays torch-free and leaves them unregistered."""
    for change in store.reconcile_runs(db, runs, inspect):
        typer.echo(change, err=True)


def _run_or_latest(db, run_ref: str | None) -> dict:
    if run_ref:
        return queries.resolve_run(db, run_ref)
    run = queries.latest_run(db)
    typer.echo(f"using the most recent run {run['id']} ({run['name']})", err=True)
    return run


def _set_pin(step: int, run_ref: str | None, pinned: bool) -> None:
    writable_home()  # a read-only home's registry is a copy in memory: a pin there would be lost
    db = open_registry(home_dir(), create=False)
    run = _run_or_latest(db, run_ref)
    store.pin(db, run["id"], step, pinned)
    typer.echo(f"{'pinned' if pinned else 'unpinned'} step {step} of run {run['id']}")


@ckpt_app.command("pin")
def pin_cmd(step: int = typer.Argument(..., help="Checkpoint step."),
            run_ref: Optional[str] = typer.Option(None, "--run", help="Run (default: the most recent).")):
    """Protect a checkpoint from retention (same as a permanent step)."""
    _set_pin(step, run_ref, True)


@ckpt_app.command("unpin")
def unpin_cmd(step: int = typer.Argument(..., help="Checkpoint step."),
              run_ref: Optional[str] = typer.Option(None, "--run", help="Run (default: the most recent).")):
    """Let retention delete a checkpoint again (permanent steps of the run stay protected)."""
    _set_pin(step, run_ref, False)


@ckpt_app.command("prune")
def prune_cmd(
    run_ref: Optional[str] = typer.Option(None, "--run", help="Only this run (default: the most recent)."),
    all_runs: bool = typer.Option(False, "--all", help="Every run in the registry."),
    keep_last: Optional[int] = typer.Option(None, "--keep-last", min=1, help="Keep this many newest (default: each run's own setting)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Show the plan, change nothing."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask for confirmation."),
):
    """Delete checkpoints that retention allows: never pinned, permanent, newest, or a finetune's parent."""
    from gptctl.checkpoints import retention

    if run_ref and all_runs:
        raise UserError("--run and --all exclude each other; give one")
    if not dry_run:
        writable_home()
    db = open_registry(home_dir(), create=False)
    runs = queries.list_runs(db) if all_runs else [_run_or_latest(db, run_ref)]
    _reconcile(db, runs, files.stored_step)
    doomed = [row for run in runs for row in retention.plan(db, run, keep_last, warn=_warn)]
    for r in doomed:
        typer.echo(f"delete {r['run_id']} step {r['step']} ({format_size(r['bytes'])}) {r['path']}")
    typer.echo(f"{len(doomed)} checkpoint(s), {format_size(sum(r['bytes'] or 0 for r in doomed))} to free")
    if not doomed or dry_run:
        return
    if not yes and not typer.confirm("Delete them?", default=False):
        raise typer.Exit(1)
    freed = retention.delete(db, doomed, warn=_warn)
    typer.echo(f"freed {format_size(freed)}")


def _warn(message: str) -> None:
    typer.echo(f"warning: {message}", err=True)


@ckpt_app.command("verify")
def verify_cmd(
    run_ref: Optional[str] = typer.Option(None, "--run", help="Only this run (default: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Check every registered checkpoint: exists, size, sha256, and loads as plain data. Marks bad ones."""
    db = open_registry(home_dir(), create=False)
    report = store.verify(db, _scope(db, run_ref, files.stored_step))
    bad = [r for r in report if r["state"] != "valid"]
    if as_json:
        typer.echo(json.dumps(report, indent=2))
    else:
        for r in report:
            typer.echo(f"{r['state']:8} {r['run_id']} step {r['step']} {r['path']} {r['detail']}".rstrip())
        typer.echo(f"{len(report) - len(bad)} valid, {len(bad)} bad")
    if bad:
        raise typer.Exit(1)
