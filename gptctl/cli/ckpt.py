"""`gptctl ckpt list`."""

import json
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from gptctl.cli import app
from gptctl.registry import files, open_registry, queries
from gptctl.paths import home_dir

ckpt_app = typer.Typer(help="Checkpoints and their retention.", no_args_is_help=True)
app.add_typer(ckpt_app, name="ckpt")


@ckpt_app.command("list")
def list_cmd(
    run_ref: Optional[str] = typer.Option(None, "--run", help="Only this run (id, prefix or name)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Registered checkpoints (files that vanished are marked missing)."""
    db = open_registry(home_dir(), create=False)
    run_id = queries.resolve_run(db, run_ref)["id"] if run_ref else None
    files.mark_vanished(db, run_id)
    rows = [r for r in queries.checkpoints_of(db, run_id) if r["state"] != "deleted"]
    if as_json:
        typer.echo(json.dumps([{**r, "pinned": bool(r["pinned"])} for r in rows], indent=2))
        return
    table = Table("run", "step", "size", "pinned", "state", "created", "path")
    for r in rows:
        table.add_row(r["run_id"], str(r["step"]), f"{r['bytes'] / 1e6:,.1f} MB", "yes" if r["pinned"] else "",
                      r["state"], r["created_at"], r["path"])
    Console().print(table)
    typer.echo(f"{len(rows)} checkpoint(s), {sum(r['bytes'] or 0 for r in rows) / 1e6:,.1f} MB")
