"""`gptctl pretrain`, `gptctl finetune` and `gptctl resume`."""

import json
import os
import shlex
import sys
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Optional

import typer
from pydantic import ValidationError

from gptctl import control, preflight, slurm
from gptctl.detach import detached, start_detached
from gptctl.cli import app
from gptctl.cli.settings_options import with_settings_options
from gptctl.errors import UserError
from gptctl.paths import home_dir, writable_home
from gptctl.registry import open_registry, queries
from gptctl.resume import OVERRIDE, resume_changes, resume_settings
from gptctl.settings import (FINETUNE_DEFAULTS, FINETUNE_FROM_PARENT, LAUNCH_FIELDS, SHAPE_OPTIONS, LaunchSettings,
                             TrainSettings, build_launch, build_settings, describe)
from gptctl.settings_files import given_settings

CONFIG = typer.Option(None, "--config", help="TOML file of settings; command-line options override it.")
SAVE_CONFIG = typer.Option(False, "--save-config", help="Also write the resolved settings as config.toml in the run directory.")
AUTO_RESUME = typer.Option(False, "--auto-resume", help="Continue the run with this --run-name (a completed one only "
                           "to a higher --max-steps), or start it.")
NEW_RUN = typer.Option(False, "--new-run", help="Start a second run under a --run-name that a run already has "
                       "(RUN then means the newest of them).")
RESUME = typer.Option(False, "--resume", help="Start from the checkpoint given by --checkpoint-path.")
CHECKPOINT_PATH = typer.Option(None, "--checkpoint-path", help="Checkpoint file for --resume (its weights, optimizer and step).")
JSON = typer.Option(False, "--json", help="Print a machine-readable summary at the end.")
OVERRIDE_SETTINGS = typer.Option(False, OVERRIDE, help="When resuming, let the options given change "
                                 "settings that make the run (data, batch, optimizer settings, schedule, seed, "
                                 "dtype); each change is recorded with its step. The model's shape and --optimizer "
                                 "never change: the checkpoints hold them.")
DETACH = typer.Option(False, "--detach", help="Train in the background, free of this terminal: return once the "
                      "workers start (checks and refusals print here first); `gptctl runs logs RUN --follow` "
                      "follows it, `gptctl runs stop RUN` stops it.")
PRINT_COMMAND = typer.Option(False, "--print-command", help="Create the run (status queued) and print the torchrun "
                             "command that trains it, for a job script; train nothing now.")


@app.command()
@with_settings_options("pretrain")
def pretrain(
    values: dict[str, Any],
    config: Optional[Path] = CONFIG,
    save_config: bool = SAVE_CONFIG,
    auto_resume: bool = AUTO_RESUME,
    resume: bool = RESUME,
    checkpoint_path: Optional[Path] = CHECKPOINT_PATH,
    init_from: Optional[str] = typer.Option(
        None, "--init-from", help="Start from these weights (a file, RUN, RUN:STEP or hf:DIR_OR_NAME) with a fresh "
        "optimizer at step 0; the model shape comes from them."),
    print_command: bool = PRINT_COMMAND,
    override_settings: bool = OVERRIDE_SETTINGS,
    new_run: bool = NEW_RUN,
    detach: bool = DETACH,
    as_json: bool = JSON,
):
    """Train GPT-2 on prepared token shards, from scratch or --init-from weights (torchrun workers; DDP or FSDP)."""
    _maybe_detach(detach, print_command, as_json)
    defaults, fixed = slurm.launch_defaults(dict(os.environ)), {}
    with ExitStack() as reading:  # the parent is leased until the run row records it (then retention spares it)
        if init_from is not None:
            from gptctl.refs import checkpoint_for_reading

            shape_options = [o for o in SHAPE_OPTIONS if values.get(o) is not None]
            if shape_options:
                raise UserError(f"--{shape_options[0].replace('_', '-')}: the shape comes from --init-from; drop one of them")
            parent = reading.enter_context(checkpoint_for_reading(init_from, "--init-from", home_dir()))
            fixed = {"pretrained_checkpoint": str(parent), **preflight.parent_model(parent, "--init-from")}
            defaults["seq_len"] = fixed["block_size"]
        values = given_settings(values, config, "pretrain")  # a resume compares the config file's settings too
        continued = _continued(values, "pretrain", auto_resume)
        if values.get("data_root") is None:  # the run --auto-resume continues reads the root it recorded
            recorded = continued.data_root if continued is not None else None
            defaults["data_root"] = recorded or preflight.default_data_root()
        settings, launch = build_settings(values, defaults=defaults, kind="pretrain", continues=continued, **fixed)
        # What the data is, compared by every resume: the same path may hold other data
        values["data_fingerprint"] = preflight.check_data(settings, home_dir())
        settings = settings.model_copy(update={"data_fingerprint": values["data_fingerprint"]})
        _start(settings, launch, values, save_config, auto_resume, resume, checkpoint_path, print_command,
               override_settings, new_run, as_json)


@app.command()
@with_settings_options("finetune", defaults={**FINETUNE_DEFAULTS, "total_batch_size": "batch-size × seq-len × processes × grad-accumulation-steps",
                                            "seq_len": "the pretrained model's"}, refused=FINETUNE_FROM_PARENT)
def finetune(
    values: dict[str, Any],
    pretrained_checkpoint: str = typer.Option(
        ..., "--pretrained-checkpoint", help="Checkpoint to start from: a file, RUN (its newest valid checkpoint), "
        "RUN:STEP, or hf:DIR_OR_NAME for Hugging Face GPT-2 weights (a local directory or the local HF cache)."),
    config: Optional[Path] = CONFIG,
    save_config: bool = SAVE_CONFIG,
    auto_resume: bool = AUTO_RESUME,
    resume: bool = RESUME,
    checkpoint_path: Optional[Path] = CHECKPOINT_PATH,
    print_command: bool = PRINT_COMMAND,
    override_settings: bool = OVERRIDE_SETTINGS,
    new_run: bool = NEW_RUN,
    detach: bool = DETACH,
    as_json: bool = JSON,
):
    """Instruction-tune a pretrained model on databricks-dolly-15k (or a local file in its schema).

    The loss counts only response tokens; the model's shape comes from the checkpoint.
    """
    from gptctl.refs import checkpoint_for_reading

    _maybe_detach(detach, print_command, as_json)
    # The parent is leased from the moment it is chosen until the run row records it (then retention spares it).
    with checkpoint_for_reading(pretrained_checkpoint, "--pretrained-checkpoint", home_dir()) as parent:
        model = preflight.parent_model(parent, "--pretrained-checkpoint")
        defaults = {**FINETUNE_DEFAULTS, "seq_len": model["block_size"], **slurm.launch_defaults(dict(os.environ))}
        values = given_settings(values, config, "finetune")
        settings, launch = build_settings(values, defaults=defaults, kind="finetune",
                                          continues=_continued(values, "finetune", auto_resume),
                                          pretrained_checkpoint=str(parent), **model)
        preflight.check_dataset(settings)
        _start(settings, launch, values, save_config, auto_resume, resume, checkpoint_path, print_command,
               override_settings, new_run, as_json)


def _continued(values: dict[str, Any], kind: str, auto_resume: bool) -> TrainSettings | None:
    """The settings of the run --auto-resume will continue (the newest of its --run-name, by default the
    kind's, if it is of this kind; `_start` finds the same run): what the options given are judged against."""
    if not auto_resume:
        return None
    run = queries.newest_run_named(open_registry(home_dir(), create=False), values.get("run_name") or kind)
    return TrainSettings.model_validate_json(run["settings"]) if run is not None and run["kind"] == kind else None


def _start(settings: TrainSettings, launch: LaunchSettings, values: dict[str, Any], save_config: bool,
           auto_resume: bool, resume: bool, checkpoint_path: Path | None, print_command: bool, override: bool,
           new_run: bool, as_json: bool) -> None:
    """What pretrain and finetune share once their settings are valid: resume or create a run, then train."""
    if override and not (auto_resume or resume):
        raise UserError(f"{OVERRIDE}: only for a resume (--auto-resume, --resume, or `gptctl resume RUN`)")
    if new_run and (auto_resume or settings.run_name is None):
        raise UserError("--new-run: only with a --run-name, and not with --auto-resume, which continues the run of that name")
    start_note = preflight.check_checkpoint_path(checkpoint_path, resume, settings, override)
    preflight.check_world_size(settings, launch)
    preflight.check_extras(settings)
    if launch.node_rank > 0:
        if detached():
            raise UserError("--detach: only for node 0, which owns the run; start the other nodes' commands "
                            "under their own scheduler or terminal multiplexer")
        if print_command:
            raise UserError("--print-command: run it for node 0 (--node-rank 0); each node then runs the printed "
                            "command (with its own --node-rank unless --rdzv-endpoint is used)")
        typer.echo(f"node {launch.node_rank} of {launch.nnodes}: joining the run node 0 trains "
                   f"(rendezvous at {launch.master_addr}:{launch.master_port})", err=True)
        raise typer.Exit(control.follow(home_dir(), settings, launch))
    if print_command and launch.deadline:
        raise UserError("--deadline: not with --print-command, whose command runs later, under its scheduler; inside "
                        "SLURM its workers stop before the job's end by themselves (SLURM_JOB_END_TIME)")
    # One name, one run: --auto-resume continues the run of its name (with --resume too: a requeued job
    # continues the run its first start made from the file); a new run takes a name no run has (the
    # default, the kind, gets a number), unless --new-run says a second one is meant.
    name = settings.run_name or (settings.kind if auto_resume else None)
    if name is not None and not new_run:
        db = open_registry(home_dir(), create=False)
        previous = queries.newest_run_named(db, name)
        if previous is not None and auto_resume:
            _auto_resume(previous, settings, values, override, launch, print_command, as_json)
        if previous is not None:
            raise UserError(f"--run-name {name}: run {previous['id']} has this name ({previous['status']} at step "
                            f"{previous['last_step'] or 0}); continue it with --auto-resume (or `gptctl resume {name}`), "
                            "give another --run-name, or add --new-run for a second run of this name")
    prepared = preflight.prepare_dataset(settings)  # tokenized before the run exists: bad data writes nothing
    if prepared is not None:
        typer.echo(f"instruction data: {len(prepared.train):,} train and {len(prepared.val):,} val examples"
                   + (f"; {prepared.skipped:,} skipped (empty, or the response does not fit --seq-len)" if prepared.skipped else ""),
                   err=True)
    writable_home()  # the last check: the run is created next
    init = str(checkpoint_path.resolve()) if resume else None
    run, lock = control.create_run(home_dir(), settings, command_line(), save_config, name=name, new_run=new_run,
                                   parent_checkpoint=init or settings.pretrained_checkpoint, dataset=prepared,
                                   parent_kind="state" if init else "weights" if settings.pretrained_checkpoint else None)
    preflight.remember_verified(home_dir())
    if start_note:
        queries.add_event(open_registry(home_dir(), check_home=False), run["id"], 0, "start", start_note)
        typer.echo(start_note, err=True)
    typer.echo(f"run {run['id']} ({run['name']}) in {run['run_dir']}", err=True)
    if print_command:
        typer.echo(control.queue(home_dir(), run, lock, launch, init_checkpoint=init))
        if launch.nnodes > 1 and not launch.rdzv_endpoint:
            typer.echo("every node runs this command with its own --node-rank=R (0 as printed is node 0's); "
                       "with --rdzv-endpoint the command is the same on every node", err=True)
        return
    _finish(control.execute(home_dir(), run, lock, launch, init_checkpoint=init), as_json)


def _auto_resume(previous: dict[str, Any], settings: TrainSettings, values: dict[str, Any], override: bool,
                 launch: LaunchSettings, print_command: bool, as_json: bool) -> None:
    """--auto-resume found the run of its name: continue it (a completed one to a higher --max-steps, as
    `resume RUN --max-steps N` does; with --print-command, queue it), or say it is complete. Never returns."""
    if previous["kind"] != settings.kind:
        raise UserError(f"--run-name {previous['name']}: run {previous['id']} of this name is a {previous['kind']}; "
                        "give another --run-name")
    if previous["status"] == "diverged":
        raise UserError(f"--auto-resume: run {previous['id']} ({previous['name']}) diverged: {previous['error']}; "
                        f"look at `gptctl runs show {previous['id']}`, then `gptctl resume {previous['id']}` to try "
                        "again from its last good checkpoint, or give a new --run-name")
    max_steps, last = values.get("max_steps"), previous["last_step"] or 0
    if previous["status"] == "completed" and (max_steps is None or max_steps <= last):
        typer.echo(f"run {previous['id']} ({previous['name']}) is already complete at step {last}; nothing to train "
                   f"(a --max-steps above {last} trains it further)", err=True)
        _finish(control.Outcome(previous, 0), as_json)
    _note_other_parent(previous, settings)
    changes = resume_changes(previous, values, override)
    _resume(previous, *resume_settings(previous, max_steps, changes), launch, as_json, print_command)


def _note_other_parent(run: dict[str, Any], settings: TrainSettings) -> None:
    """--init-from or --pretrained-checkpoint naming another file than the run started from (RUN names its
    newest checkpoint, which moves on): the run continues from its own checkpoints; say so."""
    if settings.pretrained_checkpoint is None or run["parent_kind"] != "weights":
        return
    db = open_registry(home_dir(), check_home=False)
    if queries.stored_path(db, settings.pretrained_checkpoint) != queries.stored_path(db, run["parent_checkpoint"]):
        typer.echo(f"note: run {run['id']} started from {run['parent_checkpoint']}; it continues from its own "
                   f"checkpoints, not from {settings.pretrained_checkpoint}", err=True)


def _resume(run: dict[str, Any], settings: TrainSettings, note: str | None, launch: LaunchSettings,
            as_json: bool, print_command: bool = False) -> None:
    preflight.check_run_dir(run)
    writable_home()
    preflight.check_world_size(settings, launch)
    lock = control.lock_existing(run)
    try:
        preflight.refuse_if_done(home_dir(), run, settings)
        db = open_registry(home_dir())
        control.record_settings(db, run, settings, status="created")
        preflight.remember_verified(home_dir())
        if note:  # what this resume changes: the LR schedule's extension, watched or kept settings
            queries.add_event(db, run["id"], run["last_step"], "resume", note)
            typer.echo(note, err=True)
    except BaseException:
        lock.release()  # refused, or the disk refused the new settings: the run stays as it was
        raise
    if print_command:  # a job script's submission: the run is queued for the printed command
        typer.echo(f"run {run['id']} ({run['name']}) queued to continue", err=True)
        typer.echo(control.queue(home_dir(), run, lock, launch))
        raise typer.Exit(0)
    typer.echo(f"resuming run {run['id']} ({run['name']})", err=True)  # from the step its workers say: they verify
    _finish(control.execute(home_dir(), queries.get_run(db, run["id"]), lock, launch), as_json)


def _finish(outcome: control.Outcome, as_json: bool) -> None:
    info = control.summary(home_dir(), outcome.run)
    if as_json:
        typer.echo(json.dumps(info, indent=2, default=str))
    else:
        loss = f"{info['loss']:.4f}" if info["loss"] is not None else "-"
        val = f"{info['val_loss']:.4f}" if info["val_loss"] is not None else "-"
        typer.echo(f"run {info['run_id']} {info['status']} at step {info['last_step']}/{info['max_steps']}: "
                   f"loss {loss}, val loss {val}; {len(info['checkpoints'])} checkpoint(s) in {info['run_dir']}", err=True)
        # why it failed or diverged: the workers' own "error:" line, just above (runs show keeps it)
    raise typer.Exit(outcome.exit_code)


@app.command("resume")
@with_settings_options("resume", defaults={name: "the run's" for name in TrainSettings.model_fields})
def resume_cmd(
    values: dict[str, Any],
    run_ref: str = typer.Argument(..., metavar="RUN", help="Run id (or unique prefix) or name."),
    override_settings: bool = OVERRIDE_SETTINGS,
    detach: bool = DETACH,
    as_json: bool = JSON,
):
    """Continue a run from its newest valid checkpoint with its stored settings.

    Training settings given here apply from the step it resumes at, and are recorded in its events.

    --max-steps raises the budget (the LR schedule still ends where it did); evaluation, checkpoint, watching and compute settings may change; those that would make another run need --override-settings.

    Launch settings are this launch's own: more processes or other nodes (a SLURM job requeued elsewhere).
    """
    _maybe_detach(detach, False, as_json)
    launch = build_launch({k: v for k, v in values.items() if k in LAUNCH_FIELDS},
                          defaults=slurm.launch_defaults(dict(os.environ)))
    if values.get("run_name") is not None:
        raise UserError("--run-name: a resume keeps the run's name; `gptctl runs list` shows it")
    db = open_registry(home_dir(), create=False)
    run = queries.resolve_run(db, run_ref)
    max_steps = values.get("max_steps")
    if run["status"] == "completed" and max_steps is None:
        raise UserError(f"run {run['id']} is completed at step {run['last_step']}; pass --max-steps to train further")
    changes = resume_changes(run, _with_data_identity(run, values), override_settings)
    _resume(run, *resume_settings(run, max_steps, changes), launch, as_json)


def _with_data_identity(run: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A pretraining run's resume also gives what its data root holds now, to be compared with the run's."""
    stored = TrainSettings.model_validate_json(run["settings"])
    if stored.kind != "pretrain":
        return values  # a finetune trains on the tokenized copy in its run directory
    if values.get("data_root") is None:
        recorded = json.loads(run["settings"]).get("data_root")
        if recorded and not Path(recorded).is_absolute():
            raise UserError(f"--data-root: run {run['id']} recorded its data root as {recorded!r}, relative to a "
                            "directory an older gptctl did not record; give --data-root with the directory it trained on")
        if stored.data_root is not None and not stored.data_root.exists():
            raise UserError(f"--data-root: {stored.data_root}, where run {run['id']}'s data was, is gone; give where it "
                            f"is now: `gptctl resume {run['name']} --data-root DIR` (the same data is recognised by "
                            "its fingerprint)")
    given = {k: values[k] for k in ("data_root", "batch_size", "seq_len") if values.get(k) is not None}
    try:
        probe = TrainSettings(**{**stored.model_dump(), **given})  # validated: the data root made absolute
    except ValidationError as exc:
        raise UserError(describe(exc)) from None
    return {**values, "data_fingerprint": preflight.check_data(probe, home_dir())}


def _maybe_detach(wanted: bool, print_command: bool, as_json: bool) -> None:
    """--detach: run this command again in the background and return once its workers start."""
    if not wanted or detached():
        return
    if print_command:
        raise UserError("--detach: not with --print-command, which trains nothing now; the printed command runs "
                        "under your scheduler")
    code, run = start_detached(command_line()[1:], waiting=lambda run: typer.echo(
        "waiting for its workers to start (Ctrl-C stops waiting; the run goes on)", err=True))
    if run is None:
        raise typer.Exit(code)  # it said why, on this terminal, before it would have detached
    if code != 0:
        from gptctl.run_log import last_lines

        lines, _ = last_lines(Path(run["console_log"]), 5)
        typer.echo(f"Error: run {run['run_id']} ({run['name']}) failed to start (exit code {code}); the end of "
                   f"{run['console_log']}:\n" + "\n".join(lines), err=True)
        raise typer.Exit(code)
    # Commands that find the run from any directory: with the home they were given, should it be --home
    given_home = any(a == "--home" or a.startswith("--home=") for a in command_line())
    gptctl = f"gptctl --home {shlex.quote(str(home_dir().resolve()))}" if given_home else "gptctl"
    run = {**run, "follow": f"{gptctl} runs logs {shlex.quote(run['name'])} --follow",
           "stop": f"{gptctl} runs stop {shlex.quote(run['name'])}"}
    if as_json:
        typer.echo(json.dumps(run, indent=2))
    else:
        typer.echo(f"run {run['run_id']} ({run['name']}) trains in the background "
                   f"(pid {run['pid']}, console in {run['console_log']})\n"
                   f"  follow it: {run['follow']}\n  stop it:   {run['stop']}")
    raise typer.Exit(0)


def command_line() -> list[str]:
    return ["gptctl", *sys.argv[1:]]
