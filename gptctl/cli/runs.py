"""`gptctl runs list|show`."""

import json

import typer
from rich.console import Console
from rich.table import Table

from gptctl.cli import app
from gptctl.registry import open_registry, queries
from gptctl.paths import home_dir

runs_app = typer.Typer(help="The run registry.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


@runs_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """All runs, newest first."""
    db = open_registry(home_dir(), create=False)
    rows = queries.list_runs(db)
    if as_json:
        typer.echo(json.dumps([{k: v for k, v in r.items() if k != "settings"} for r in rows], indent=2))
        return
    table = Table("id", "name", "kind", "status", "step", "device", "tok/s", "created")
    for r in rows:
        table.add_row(r["id"], r["name"], r["kind"], r["status"], f"{_fmt(r['last_step'])}/{_fmt(r['max_steps'])}",
                      _fmt(r["device_name"]), _fmt(r["tokens_per_s"], ",.0f"), r["created_at"])
    Console().print(table)


@runs_app.command("show")
def show_cmd(
    run_ref: str = typer.Argument(..., metavar="RUN", help="Run id (or unique prefix) or name."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """One run: settings, status, checkpoints and metrics."""
    db = open_registry(home_dir(), create=False)
    run = queries.resolve_run(db, run_ref)
    info = {**run, "settings": json.loads(run["settings"]),
            "checkpoints": queries.checkpoints_of(db, run["id"]), "metrics": queries.metrics_of(db, run["id"])}
    if as_json:
        typer.echo(json.dumps(info, indent=2))
        return
    console = Console()
    for key in ("id", "name", "kind", "status", "run_dir", "command", "created_at", "started_at", "ended_at",
                "device_name", "dtype", "world_size", "last_step", "max_steps", "tokens_per_s", "error"):
        console.print(f"[bold]{key}[/]: {_fmt(run[key])}", highlight=False)
    vals = [m for m in info["metrics"] if m["val_loss"] is not None]
    if info["metrics"]:
        console.print(f"[bold]last loss[/]: {info['metrics'][-1]['loss']:.4f}" + (f", val loss {vals[-1]['val_loss']:.4f} at step {vals[-1]['step']}" if vals else ""))
    console.print(f"[bold]checkpoints[/]: " + (", ".join(f"{c['step']} ({c['state']})" for c in info["checkpoints"]) or "none"))
    console.print("[bold]settings[/]: " + json.dumps(info["settings"]), highlight=False)
