"""`gptctl runs logs|stop|rm|compare`: a run managed from any terminal (or node) of its home."""

import json
from pathlib import Path
from typing import Optional

import typer

from gptctl.cli.runs import runs_app
from gptctl.errors import UserError
from gptctl.paths import home_dir
from gptctl.registry import open_registry, queries

RUN = typer.Argument(..., metavar="RUN", help="Run id (or unique prefix) or name.")


@runs_app.command("logs")
def logs_cmd(
    run_ref: str = RUN,
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines until the run ends; "
                                "then print how it ended and exit with its exit code."),
    tail: Optional[int] = typer.Option(None, "--tail", "-n", help="Only the last N lines (default: all)."),
):
    """A run's own log: steps, loss, LR, tokens/s, evals, checkpoints, and why it stopped."""
    from gptctl import run_log
    from gptctl.registry.locks import run_is_locked

    if tail is not None and tail < 0:
        raise UserError(f"--tail: must be 0 or more lines, got {tail}")
    db = open_registry(home_dir(), create=False)
    run = queries.resolve_run(db, run_ref)
    path = run_log.log_path(run)
    lines, end = run_log.last_lines(path, tail)
    for line in lines:
        typer.echo(line)
    if not follow:
        if not path.exists():
            typer.echo(f"run {run['id']} ({run['name']}) has no log yet ({path})", err=True)
        return

    if run["status"] == "queued":
        typer.echo(f"run {run['id']} ({run['name']}) is queued: following it once its job starts it "
                   "(Ctrl-C stops following)", err=True)

    def running() -> bool:  # a queued run is followed until its job has started and ended it
        row = queries.refresh_status(db, queries.get_run(db, run["id"]))
        return row["status"] in (*queries.ACTIVE, "queued") or run_is_locked(Path(row["run_dir"]))

    try:
        for line in run_log.follow(path, end, running):
            typer.echo(line)
    except KeyboardInterrupt:
        raise typer.Exit(130)  # the run goes on: only following it stopped
    row = queries.get_run(db, run["id"])
    code = row["exit_code"] if row["exit_code"] is not None else 0 if row["status"] == "completed" else 1
    typer.echo(f"run {row['id']} ({row['name']}) {row['status']} at step {row['last_step'] or 0} "
               f"(exit code {code})", err=True)
    raise typer.Exit(code)


@runs_app.command("stop")
def stop_cmd(
    run_ref: str = RUN,
    now: bool = typer.Option(False, "--now", help="Stop without saving the step (a second `runs stop` does "
                             "the same): the run resumes from its newest checkpoint."),
    no_wait: bool = typer.Option(False, "--no-wait", help="Return once the stop is asked, not once the run stopped."),
    as_json: bool = typer.Option(False, "--json", help="Print the stopped run's summary as JSON."),
):
    """Stop a run from any terminal or node of its home, as SIGTERM would: finish the step, save, stop."""
    from gptctl.stop_request import stop_run

    db = open_registry(home_dir(), create=False)
    run = queries.resolve_run(db, run_ref)
    said = {}

    def asked(count: int) -> None:
        said["now"] = count > 1  # --now, or a second request: the workers are killed without the save
        how = " now, without saving (a second request)" if count > 1 and not now else " now, without saving" if now else ""
        if not no_wait:
            typer.echo(f"asked run {run['id']} ({run['name']}) to stop{how}; "
                       "waiting for it (Ctrl-C stops waiting, not the stop)", err=True)

    try:
        row = stop_run(db, run, now=now, wait=not no_wait, asked=asked)
    except KeyboardInterrupt:
        raise typer.Exit(130)
    if no_wait:
        typer.echo(f"asked run {run['id']} ({run['name']}) to stop{' now' if said['now'] else ''}; "
                   f"`gptctl runs logs {run['name']} --follow` shows when it has", err=True)
        return
    saved = queries.checkpoints_of(db, row["id"], states=["valid"])
    newest = saved[-1]["step"] if saved else None
    if as_json:
        typer.echo(json.dumps({"run_id": row["id"], "name": row["name"], "status": row["status"],
                               "last_step": row["last_step"], "checkpoint_step": newest}, indent=2))
        return
    if row["status"] == "completed":
        typer.echo(f"run {row['id']} ({row['name']}) completed at step {row['last_step']} before the stop took effect")
    elif newest is not None and newest == row["last_step"]:
        typer.echo(f"run {row['id']} ({row['name']}) stopped at step {newest}, checkpoint saved; "
                   f"`gptctl resume {row['name']}` continues it")
    else:
        where = f"its checkpoint of step {newest}" if newest is not None else "step 0 (it has no checkpoint)"
        typer.echo(f"run {row['id']} ({row['name']}) stopped ({row['status']}) without saving its last step; "
                   f"`gptctl resume {row['name']}` continues from {where}")


@runs_app.command("rm")
def rm_cmd(
    run_refs: list[str] = typer.Argument(..., metavar="RUN...", help="Runs to delete (ids, prefixes or names)."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Delete; without it, only list what would be deleted."),
    force: bool = typer.Option(False, "--force", help="Also delete pinned checkpoints and queued runs."),
    as_json: bool = typer.Option(False, "--json", help="Print what is (or would be) deleted as JSON."),
):
    """Delete runs: their directories, checkpoints and registry rows, each run whole or not at all."""
    from gptctl.cli.listing import format_size
    from gptctl.paths import writable_home
    from gptctl.registry import removal

    db = open_registry(home_dir(), create=False)
    runs = list({r["id"]: r for r in (queries.resolve_run(db, ref) for ref in run_refs)}.values())
    removals = removal.plan(db, runs, force)
    listed = [{"run_id": r.run["id"], "name": r.run["name"], "status": r.run["status"], "run_dir": r.run["run_dir"],
               "checkpoints": r.checkpoints, "bytes": r.bytes} for r in removals]
    if not yes:
        if as_json:
            typer.echo(json.dumps({"deleted": False, "runs": listed}, indent=2))
            return
        for r in removals:
            typer.echo(f"run {r.run['id']} ({r.run['name']}, {r.run['status']}): {r.checkpoints} checkpoint(s), "
                       f"{format_size(r.bytes)}" + (", directory already gone" if r.missing else f" in {r.run['run_dir']}"))
        typer.echo(f"would free {format_size(sum(r.bytes for r in removals))}; add --yes to delete "
                   f"{'it' if len(removals) == 1 else 'them'}", err=True)
        return
    writable_home()
    for r in removals:
        removal.remove(db, r)
        if not as_json:
            typer.echo(f"deleted run {r.run['id']} ({r.run['name']}): {format_size(r.bytes)} freed")
    if as_json:
        typer.echo(json.dumps({"deleted": True, "runs": listed}, indent=2))


@runs_app.command("compare")
def compare_cmd(
    run_refs: list[str] = typer.Argument(..., metavar="RUN...", help="Two or more runs (ids, prefixes or names)."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    plot: bool = typer.Option(False, "--plot", help="Also draw their val loss against tokens in the terminal."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write their curves against tokens to a "
                                          "PNG (pip install 'gptctl[plot]')."),
):
    """Runs side by side: the settings that differ, val loss at equal tokens, best and last val, speed."""
    from rich.console import Console
    from rich.table import Table

    from gptctl.cli.listing import format_count, format_duration
    from gptctl.cli.runs import check_png, loss_panels
    from gptctl.run_compare import compare

    check_png(output)
    db = open_registry(home_dir(), create=False)
    runs = list({r["id"]: r for r in (queries.resolve_run(db, ref) for ref in run_refs)}.values())
    if len(runs) < 2:
        raise UserError(f"RUN: name two or more different runs to compare, got {len(runs)}")
    found = compare(db, [r["id"] for r in runs])
    if as_json:
        typer.echo(json.dumps(found, indent=2))
    else:
        def num(value, spec=".4f"):
            return "-" if value is None else format(value, spec)

        table = Table(box=None, show_edge=False, pad_edge=False)
        table.add_column("", no_wrap=True)  # option names whole; long values and run names fold instead
        for r in found["runs"]:
            table.add_column(f"{r['name']}\n{r['id']}", justify="right", overflow="fold")
        equal = found["equal_tokens"]
        rows = {
            "status": [r["status"] for r in found["runs"]],
            "step": [f"{num(r['step'], 'd')}/{num(r['max_steps'], 'd')}" for r in found["runs"]],
            "tokens": [format_count(r["tokens_seen"]) for r in found["runs"]],
            f"val @ {format_count(equal)} tok" if equal is not None else "val @ equal tokens":
                [num(r["val_loss_at_equal_tokens"]) for r in found["runs"]],
            "best val": [num(r["best_val_loss"]) + (f" @{format_count(r['best_val_tokens'])}"
                                                    if r["best_val_tokens"] is not None else "") for r in found["runs"]],
            "last val": [num(r["last_val_loss"]) for r in found["runs"]],
            "tokens/s": [num(r["tokens_per_s"], ",.0f") for r in found["runs"]],
            "goodput": ["-" if r["goodput"] is None else f"{100 * r['goodput']:.0f}%" for r in found["runs"]],
            "wall": [format_duration(r["wall_s"]) for r in found["runs"]],
        }
        for label, cells in rows.items():
            table.add_row(label, *cells)
        for panel, options in found["differing_settings"].items():
            table.add_row(f"[bold]{panel}[/]", *[""] * len(found["runs"]))
            for option, values in options.items():
                table.add_row(option, *["-" if v is None else str(v) for v in values])
        if not found["differing_settings"]:
            table.add_row("[bold]settings[/]", *["all the same"] * len(found["runs"]))
        Console().print(table)
    if plot or output is not None:
        from gptctl.plot import png_plot, terminal_plot

        panels = loss_panels(db, runs, "tokens")
        if plot:
            typer.echo(terminal_plot(panels["val loss"], "val loss", "tokens"), err=as_json)
        if output is not None:
            png_plot(panels, "tokens", str(output))
            typer.echo(str(output), err=as_json)
