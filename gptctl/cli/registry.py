"""`gptctl registry rebuild`: re-create the registry from the run directories."""

import json

import typer

from gptctl.cli import app
from gptctl.paths import home_dir

registry_app = typer.Typer(help="The registry file itself (gptctl.db).", no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("rebuild")
def rebuild_cmd(as_json: bool = typer.Option(False, "--json", help="Print what was added as JSON.")):
    """Re-create runs, checkpoints and metrics from the run directories (after a lost or damaged registry).

    Runs already in the registry are left alone; a damaged registry is moved aside first. Every
    checkpoint is verified (loaded as data, its step checked) before it is registered.
    """
    from gptctl.registry.rebuild import rebuild

    report = rebuild(home_dir(), progress=lambda m: typer.echo(m, err=True))
    if report.moved_aside:
        typer.echo(f"the damaged registry was moved to {report.moved_aside}", err=True)
    for line in report.skipped:
        typer.echo(f"warning: not registered: {line}", err=True)
    if as_json:
        typer.echo(json.dumps({"moved_aside": str(report.moved_aside) if report.moved_aside else None,
                               "runs": report.runs, "skipped": report.skipped}, indent=2))
        return
    for run in report.runs:
        typer.echo(f"added run {run['id']} ({run['name']}): step {run['last_step']}, "
                   f"{run['checkpoints']} checkpoint(s), {run['metrics']} metric rows")
    if not report.runs:
        typer.echo("nothing to add: every run directory is in the registry")
