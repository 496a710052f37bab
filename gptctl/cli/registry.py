"""`gptctl registry rebuild`: re-create the registry from the run directories."""

import json

import typer

from gptctl.cli import app
from gptctl.paths import home_dir, writable_home

registry_app = typer.Typer(help="The registry file itself (gptctl.db).", no_args_is_help=True)
app.add_typer(registry_app, name="registry")


@registry_app.command("rebuild")
def rebuild_cmd(as_json: bool = typer.Option(False, "--json", help="Print what was added as JSON.")):
    """Re-create runs, checkpoints and metrics from the run directories (after a lost or damaged registry).

    Runs already in the registry are left alone; a damaged registry is moved aside first. Every
    checkpoint is verified (loaded as data, its step checked) before it is registered.
    """
    from gptctl.rebuild import rebuild

    writable_home()
    report = rebuild(home_dir(), progress=lambda m: typer.echo(m, err=True))
    if report.moved_aside:
        typer.echo(f"{report.moved_why} was moved to {report.moved_aside}", err=True)
    for line in report.skipped:
        typer.echo(f"warning: {line}", err=True)
    for line in report.skipped_runs:
        typer.echo(f"error: run directory not added: {line}", err=True)
    if as_json:
        typer.echo(json.dumps({"moved_aside": str(report.moved_aside) if report.moved_aside else None,
                               "runs": report.runs, "skipped_runs": report.skipped_runs, "skipped": report.skipped},
                              indent=2))
    else:
        for run in report.runs:
            typer.echo(f"added run {run['id']} ({run['name']}): step {run['last_step']}, "
                       f"{run['checkpoints']} checkpoint(s), {run['metrics']} metric rows")
        if not report.runs and not report.skipped_runs:
            typer.echo("nothing to add: every run directory is in the registry")
    if report.skipped_runs:  # the registry still lacks them: every command refuses until they are fixed or moved
        typer.echo(f"{len(report.skipped_runs)} run director{'y' if len(report.skipped_runs) == 1 else 'ies'} "
                   "could not be added; fix or move them out of the home, then run this again", err=True)
        raise typer.Exit(1)
