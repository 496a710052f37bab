"""`gptctl runs list|show|plot` (logs, stop, rm and compare: runs_manage.py)."""

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from gptctl.cli import app
from gptctl.cli.listing import format_count, format_duration, format_size, print_listing
from gptctl.errors import UserError
from gptctl.registry import launches, open_registry, queries
from gptctl.paths import home_dir

runs_app = typer.Typer(help="The run registry.", no_args_is_help=True)
app.add_typer(runs_app, name="runs")


def _fmt(value, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s"


def _progress(r: dict) -> str:
    return f"{_fmt(r['step'])}/{_fmt(r['max_steps'])}"


def _checkpoints(r: dict) -> str:
    return f"{r['checkpoint_count']} ({format_size(r['checkpoint_bytes'])})" if r["checkpoint_count"] else "0"


# kind is in --json and `runs show`; here a finetune is told by its parent checkpoint.
_COLUMNS = ("id", "name", "status", "step", "loss", "val", "tokens", "elapsed", "checkpoints")


def _cells(r: dict) -> list[str]:
    return [r["id"], r["name"], r["status"], _progress(r), _fmt(r["loss"], ".4f"), _fmt(r["val_loss"], ".4f"),
            format_count(r["tokens_seen"]), format_duration(r["elapsed_s"]), _checkpoints(r)]


@runs_app.command("list")
def list_cmd(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """All runs, newest first: status, progress, last loss and val loss, tokens seen, elapsed time,
    valid checkpoints and their size, the parent checkpoint of a finetune, and the command line."""
    db = open_registry(home_dir(), create=False)
    rows = queries.run_overviews(db)
    if as_json:
        typer.echo(json.dumps([{k: v for k, v in r.items() if k != "settings"} for r in rows], indent=2))
        return
    headers, cells = _COLUMNS, [_cells(r) for r in rows]
    if any(r["parent_checkpoint"] for r in rows):  # finetunes: what they started from
        headers, cells = (*headers, "parent"), [row + [_fmt(r["parent_checkpoint"])] for row, r in zip(cells, rows)]
    print_listing(headers, cells, extra=("command", [_fmt(r["command"]) for r in rows]))


@runs_app.command("show")
def show_cmd(
    run_ref: str = typer.Argument(..., metavar="RUN", help="Run id (or unique prefix) or name."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """One run: status, progress, losses, checkpoints, settings, and every step's metrics (--json)."""
    db = open_registry(home_dir(), create=False)
    run = queries.run_overviews(db, queries.resolve_run(db, run_ref)["id"])[0]
    checkpoints = queries.checkpoints_of(db, run["id"])
    starts = launches.of_run(db, run["id"])
    usage = launches.goodput(starts)
    if as_json:
        info = {**run, "settings": json.loads(run["settings"]), "checkpoints": checkpoints,
                "events": queries.events_of(db, run["id"]), "launches": starts, "goodput": usage,
                "metrics": queries.metrics_of(db, run["id"])}
        typer.echo(json.dumps(info, indent=2))
        return
    val = f"{_fmt(run['val_loss'], '.4f')}" + (f" at step {run['val_step']}" if run["val_step"] is not None else "")
    stored = json.loads(run["settings"])
    recipe = (f"{stored.get('recipe', 'classic')} (--arch {stored.get('arch', 'gpt2')}, --optimizer "
              f"{stored.get('optimizer', 'adamw')}, --lr-scheduler {stored.get('lr_scheduler', 'cosine')})")
    fields = {
        "id": run["id"], "name": run["name"], "kind": run["kind"], "recipe": recipe, "status": run["status"],
        "progress": f"step {_progress(run)}", "loss": _fmt(run["loss"], ".4f"), "val loss": val,
        "tokens seen": _fmt(run["tokens_seen"], ",d"), "tokens/s": _fmt(run["tokens_per_s"], ",.0f"),
        "elapsed": f"{format_duration(run['elapsed_s'])} ({_fmt(run['started_at'])} → {run['ended_at'] or 'now'})",
        "checkpoints": f"{_checkpoints(run)} valid: "
                       + (", ".join(f"{c['step']}" + ("" if c["state"] == "valid" else f" ({c['state']})")
                                    for c in checkpoints if c["state"] != "deleted") or "none"),
        "parent checkpoint": _fmt(run["parent_checkpoint"]), "command": _fmt(run["command"]),
        "run dir": run["run_dir"], "device": f"{_fmt(run['world_size'])}× {_fmt(run['device_name'])}, {_fmt(run['dtype'])}",
        "created": run["created_at"], "error": _fmt(run["error"]), "settings": _settings_text(stored),
    }
    events = queries.events_of(db, run["id"])
    if events:  # rollbacks, spikes, skipped steps: before the settings, where a reader looks first
        fields = {**{k: v for k, v in fields.items() if k != "settings"},
                  "events": "; ".join(f"step {e['step']} {e['kind']}: {e['detail']}" for e in events[-20:])
                  + (f" (and {len(events) - 20} earlier)" if len(events) > 20 else ""),
                  "settings": fields["settings"]}
    if starts:
        fields = {**{k: v for k, v in fields.items() if k != "settings"}, **_usage(starts, usage, run),
                  "settings": fields["settings"]}
    console = Console()
    for key, value in fields.items():
        console.print(f"[bold]{key}[/]: {escape(value)}", highlight=False, soft_wrap=True)


def _settings_text(stored: dict) -> str:
    """Grouped as --help groups them, each group's non-default values first (--json has the object),
    wrapped between options so that an option and its value stay on one line."""
    from gptctl.settings import grouped_settings

    width = max(Console().width, 40)
    lines = []
    for panel, rows in grouped_settings({k: v for k, v in stored.items() if k != "kind"}).items():
        changed = [f"{o} {'-' if v is None else v}" for o, v, default in rows if not default] or ["(all defaults)"]
        kept = [f"{o} {'-' if v is None else v}" for o, v, default in rows if default]
        items = [f"{panel}: {changed[0]}", *changed[1:]] + (["defaults: " + kept[0], *kept[1:]] if kept else [])
        line = "  " + items[0]
        for item in items[1:]:
            separator = "; " if item.startswith("defaults: ") else ", "
            if len(line) + len(separator) + len(item) > width:
                lines.append(line + separator.rstrip())
                line = "      " + item
            else:
                line += separator + item
        lines.append(line)
    return "(non-defaults first; --json has them as one object)\n" + "\n".join(lines)


def _usage(starts: list[dict], usage: dict, run: dict) -> dict[str, str]:
    """The launches, one line each, and what they add up to: goodput, peak memory, a checkpoint interval."""
    lines = []
    for i, r in enumerate(starts, 1):
        took = (r["ended_at"] or r["updated_at"] or r["started_at"]) - r["started_at"]
        redone = f" ({r['redone_steps']} redone)" if r["redone_steps"] else ""
        reason = r["reason"] or ("running" if run["status"] in queries.ACTIVE else "no end recorded")
        lines.append(f"{i}. {reason} after {format_duration(took)} on {r['world_size']} "
                     f"process{'es' if r['world_size'] != 1 else ''}: steps {r['first_step']}→{r['last_step']}{redone}"
                     f", start-up {_seconds(r['startup_s'])}, saving {_seconds(r['save_s'])}")
    out = {"launches": "\n  " + "\n  ".join(lines)}
    if usage["goodput"] is not None:
        out["goodput"] = (f"{100 * usage['goodput']:.0f}% (step time of kept steps {format_duration(usage['useful_s'])} "
                          f"of {format_duration(usage['wall_s'])} held; {usage['interruptions']} interruption(s), "
                          f"{usage['redone_steps']} step(s) redone)")
    if usage["peak_memory"]:
        where = "CUDA memory allocated" if run["device"] == "cuda" else "resident memory"
        out["peak memory"] = f"{usage['peak_memory'] / 2**30:.2f} GiB ({where}, main process)"
    if usage["suggested_interval_steps"]:
        settings = json.loads(run["settings"])
        out["checkpoint interval"] = (
            f"--checkpoint-interval {usage['suggested_interval_steps']} suggested (now {settings['checkpoint_interval']}): "
            f"Young/Daly √(2 × {usage['save_s']:.2f}s per save × {format_duration(usage['mtbf_s'])} between "
            f"interruptions) = {format_duration(usage['suggested_interval_s'])}")
    return out


def check_png(output: Path | None, option: str = "--output") -> None:
    if output is not None and output.suffix.lower() != ".png":
        raise UserError(f"{option}: {output} should end in .png")
    if output is not None:
        from importlib.util import find_spec

        if find_spec("matplotlib") is None:
            raise UserError(f"{option}: matplotlib is not installed; pip install 'gptctl[plot]', or drop it for a "
                            "terminal plot")


def loss_panels(db, runs: list[dict], x_axis: str) -> dict[str, list]:
    """Train loss, val loss and LR of each run against steps or tokens, as plot.Series per panel."""
    from gptctl.plot import Series

    panels: dict[str, list[Series]] = {"train loss": [], "val loss": [], "lr": []}
    x_key = "step" if x_axis == "step" else "tokens_seen"
    for run in runs:
        metrics = queries.metrics_of(db, run["id"])
        label = f"{run['name']} ({run['id']})"
        for panel, key in (("train loss", "loss"), ("val loss", "val_loss"), ("lr", "lr")):
            points = [(m[x_key], m[key]) for m in metrics if m[key] is not None and m[x_key] is not None]
            panels[panel].append(Series(label, points))
    return panels


@runs_app.command("plot")
def plot_cmd(
    run_refs: list[str] = typer.Argument(..., metavar="RUN...", help="Runs to overlay (ids, prefixes or names)."),
    output: Optional[Path] = typer.Option(None, "-o", "--output", help="Write a PNG (pip install 'gptctl[plot]') "
                                          "instead of drawing in the terminal."),
    x_axis: str = typer.Option("step", "--x", help="step or tokens."),
):
    """Train and val loss (and the learning rate) of one or more runs, against steps or tokens."""
    from gptctl.plot import png_plot, terminal_plot

    if x_axis not in ("step", "tokens"):
        raise UserError(f"--x: expected step or tokens, got {x_axis!r}")
    check_png(output)
    db = open_registry(home_dir(), create=False)
    panels = loss_panels(db, [queries.resolve_run(db, ref) for ref in run_refs], x_axis)
    if output is None:
        for panel in ("train loss", "val loss"):
            typer.echo(terminal_plot(panels[panel], panel, x_axis) + "\n")
        return
    png_plot(panels, x_axis, str(output))
    typer.echo(str(output))

