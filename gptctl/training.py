"""One request to train, the same for `gptctl pretrain`, `finetune` and `resume`: `train(request) -> Outcome`.

The settings made from the options given (and the run they continue), checked, the run created or
resumed, its workers launched and how they ended recorded. The CLI builds a TrainRequest and prints the
Outcome; every step between is here, in order. Refusals are UserError, raised before anything is
written. What each check is lives in preflight.py, what a resume may change in resume.py, and the run's
life (create, lock, queue, launch) in control.py.
"""

import json
import os
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import ValidationError

from gptctl import control, preflight, slurm
from gptctl.detach import detached
from gptctl.errors import UserError
from gptctl.paths import home_dir, writable_home
from gptctl.registry import open_registry, queries
from gptctl.resume import OVERRIDE, resume_changes, resume_settings
from gptctl.settings import (FINETUNE_DEFAULTS, LAUNCH_FIELDS, SHAPE_OPTIONS, LaunchSettings, TrainSettings,
                             build_launch, build_settings, describe)
from gptctl.settings_files import given_settings

Mode = Literal["new", "auto-resume", "resume"]
Say = Callable[[str], None]  # a line for the terminal (stderr): what the command is doing, as it does it


@dataclass(frozen=True)
class TrainRequest:
    """What a command asks for.

    `mode`: "new" starts a run (from scratch, from `parent`'s weights, or from the training state in
    `checkpoint_path` with `resume_from_file`); "auto-resume" continues the run of its --run-name (the
    kind's by default) or starts it; "resume" continues `run_ref`, of either kind. `values`: the options
    given, training and launch settings alike (None: not given)."""

    kind: str | None  # pretrain or finetune; None for a resume (the run's)
    mode: Mode
    values: dict[str, Any]
    command: list[str]  # the command line, recorded with a new run
    config: Path | None = None
    parent: str | None = None  # --init-from (pretrain), --pretrained-checkpoint (finetune)
    run_ref: str | None = None  # mode "resume": RUN
    resume_from_file: bool = False  # --resume, from checkpoint_path
    checkpoint_path: Path | None = None
    save_config: bool = False
    override_settings: bool = False
    new_run: bool = False
    print_command: bool = False


@dataclass(frozen=True)
class Outcome:
    exit_code: int
    run: dict[str, Any] | None = None  # the run's row at the end (None: a node other than node 0)
    summary: dict[str, Any] | None = None  # where the run stands, said after training it (or finding it complete)
    command: str | None = None  # --print-command: the command that trains the run, for a job script
    command_note: str | None = None  # said after that command


def _stderr(line: str) -> None:
    print(line, file=sys.stderr)


def train(request: TrainRequest, say: Say = _stderr) -> Outcome:
    if request.mode == "resume":
        return _resume_named(request, say)
    # The parent is leased from the moment it is chosen until the run row records it (then retention
    # spares it): held for the whole command.
    with ExitStack() as reading:
        settings, launch, values, db = (_pretrain_settings if request.kind == "pretrain" else _finetune_settings)(
            request, reading)
        return _start(request, settings, launch, values, db, say)


# -- the settings of a new run (or of the run --auto-resume continues, to judge the options against) ------

def _pretrain_settings(request: TrainRequest, reading: ExitStack) -> tuple[TrainSettings, LaunchSettings, dict, Any]:
    values, defaults, fixed = request.values, slurm.launch_defaults(dict(os.environ)), {}
    if request.parent is not None:
        from gptctl.refs import checkpoint_for_reading

        shape_options = [o for o in SHAPE_OPTIONS if values.get(o) is not None]
        if shape_options:
            raise UserError(f"--{shape_options[0].replace('_', '-')}: the shape comes from --init-from; drop one of them")
        parent = reading.enter_context(checkpoint_for_reading(request.parent, "--init-from", home_dir()))
        fixed = {"pretrained_checkpoint": str(parent), **preflight.parent_model(parent, "--init-from")}
        defaults["seq_len"] = fixed["block_size"]
    values = dict(given_settings(values, request.config, "pretrain"))  # a resume compares the config file's settings too
    continued, db = _continued(values, request)
    if values.get("data_root") is None:  # the run --auto-resume continues reads the root it recorded
        recorded = continued.data_root if continued is not None else None
        defaults["data_root"] = recorded or preflight.default_data_root()
    settings, launch = build_settings(values, defaults=defaults, kind="pretrain", continues=continued, **fixed)
    # What the data is, compared by every resume: the same path may hold other data
    values["data_fingerprint"] = preflight.check_data(settings, home_dir())
    return settings.model_copy(update={"data_fingerprint": values["data_fingerprint"]}), launch, values, db


def _finetune_settings(request: TrainRequest, reading: ExitStack) -> tuple[TrainSettings, LaunchSettings, dict, Any]:
    from gptctl.refs import checkpoint_for_reading

    parent = reading.enter_context(checkpoint_for_reading(request.parent, "--pretrained-checkpoint", home_dir()))
    model = preflight.parent_model(parent, "--pretrained-checkpoint")
    defaults = {**FINETUNE_DEFAULTS, "seq_len": model["block_size"], **slurm.launch_defaults(dict(os.environ))}
    values = given_settings(request.values, request.config, "finetune")
    continued, db = _continued(values, request)
    settings, launch = build_settings(values, defaults=defaults, kind="finetune", continues=continued,
                                      pretrained_checkpoint=str(parent), **model)
    preflight.check_dataset(settings)
    return settings, launch, values, db


def _continued(values: dict[str, Any], request: TrainRequest) -> tuple[TrainSettings | None, Any]:
    """The settings of the run --auto-resume will continue (the newest of its --run-name, by default the
    kind's, if it is of this kind; `_start` finds the same run): what the options given are judged
    against; and the registry it was found in, which the rest of the command uses (None: not opened yet)."""
    if request.mode != "auto-resume":
        return None, None
    db = open_registry(home_dir(), create=False)
    run = queries.newest_run_named(db, values.get("run_name") or request.kind)
    kind = request.kind
    return (TrainSettings.model_validate_json(run["settings"]) if run is not None and run["kind"] == kind else None), db


# -- a new run, or the run of its name ---------------------------------------------------------------------

def _start(request: TrainRequest, settings: TrainSettings, launch: LaunchSettings, values: dict[str, Any], db,
           say: Say) -> Outcome:
    """What pretrain and finetune share once their settings are valid: resume or create a run, then train."""
    auto_resume, resume = request.mode == "auto-resume", request.resume_from_file
    if request.override_settings and not (auto_resume or resume):
        raise UserError(f"{OVERRIDE}: only for a resume (--auto-resume, --resume, or `gptctl resume RUN`)")
    if request.new_run and (auto_resume or settings.run_name is None):
        raise UserError("--new-run: only with a --run-name, and not with --auto-resume, which continues the run of that name")
    start_note = preflight.check_checkpoint_path(request.checkpoint_path, resume, settings, request.override_settings)
    preflight.check_world_size(settings, launch)
    preflight.check_extras(settings)
    if launch.node_rank > 0:
        if detached():
            raise UserError("--detach: only for node 0, which owns the run; start the other nodes' commands "
                            "under their own scheduler or terminal multiplexer")
        if request.print_command:
            raise UserError("--print-command: run it for node 0 (--node-rank 0); each node then runs the printed "
                            "command (with its own --node-rank unless --rdzv-endpoint is used)")
        say(f"node {launch.node_rank} of {launch.nnodes}: joining the run node 0 trains "
            f"(rendezvous at {launch.master_addr}:{launch.master_port})")
        return Outcome(control.follow(home_dir(), settings, launch))
    if request.print_command and launch.deadline:
        raise UserError("--deadline: not with --print-command, whose command runs later, under its scheduler; inside "
                        "SLURM its workers stop before the job's end by themselves (SLURM_JOB_END_TIME)")
    # One name, one run: --auto-resume continues the run of its name (with --resume too: a requeued job
    # continues the run its first start made from the file); a new run takes a name no run has (the
    # default, the kind, gets a number), unless --new-run says a second one is meant.
    name = settings.run_name or (settings.kind if auto_resume else None)
    if db is None:
        db = open_registry(home_dir(), create=False)
    if name is not None and not request.new_run:
        previous = queries.newest_run_named(db, name)
        if previous is not None and auto_resume:
            return _auto_resume(db, previous, settings, values, request, launch, say)
        if previous is not None:
            raise UserError(f"--run-name {name}: run {previous['id']} has this name ({previous['status']} at step "
                            f"{previous['last_step'] or 0}); continue it with --auto-resume (or `gptctl resume {name}`), "
                            "give another --run-name, or add --new-run for a second run of this name")
    prepared = preflight.prepare_dataset(settings)  # tokenized before the run exists: bad data writes nothing
    if prepared is not None:
        say(f"instruction data: {len(prepared.train):,} train and {len(prepared.val):,} val examples"
            + (f"; {prepared.skipped:,} skipped (empty, or the response does not fit --seq-len)" if prepared.skipped else ""))
    writable_home()  # the last check: the run is created next
    if db.memory:  # the home had no registry yet: an empty one stood in for it until the checks passed
        db = open_registry(home_dir())
    init = str(request.checkpoint_path.resolve()) if resume else None
    run, lock = control.create_run(db, home_dir(), settings, request.command, request.save_config, name=name,
                                   new_run=request.new_run, parent_checkpoint=init or settings.pretrained_checkpoint,
                                   dataset=prepared,
                                   parent_kind="state" if init else "weights" if settings.pretrained_checkpoint else None)
    preflight.remember_verified(home_dir())
    if start_note:
        queries.add_event(db, run["id"], 0, "start", start_note)
        say(start_note)
    say(f"run {run['id']} ({run['name']}) in {run['run_dir']}")
    if request.print_command:
        note = None
        if launch.nnodes > 1 and not launch.rdzv_endpoint:
            note = ("every node runs this command with its own --node-rank=R (0 as printed is node 0's); "
                    "with --rdzv-endpoint the command is the same on every node")
        return Outcome(0, run, command=control.queue(db, home_dir(), run, lock, launch, init_checkpoint=init),
                       command_note=note)
    return _launched(db, run, lock, launch, init)


def _auto_resume(db, previous: dict[str, Any], settings: TrainSettings, values: dict[str, Any],
                 request: TrainRequest, launch: LaunchSettings, say: Say) -> Outcome:
    """--auto-resume found the run of its name: continue it (a completed one to a higher --max-steps, as
    `resume RUN --max-steps N` does; with --print-command, queue it), or say it is complete."""
    if previous["kind"] != settings.kind:
        raise UserError(f"--run-name {previous['name']}: run {previous['id']} of this name is a {previous['kind']}; "
                        "give another --run-name")
    if previous["status"] == "diverged":
        raise UserError(f"--auto-resume: run {previous['id']} ({previous['name']}) diverged: {previous['error']}; "
                        f"look at `gptctl runs show {previous['id']}`, then `gptctl resume {previous['id']}` to try "
                        "again from its last good checkpoint, or give a new --run-name")
    max_steps, last = values.get("max_steps"), previous["last_step"] or 0
    if previous["status"] == "completed" and (max_steps is None or max_steps <= last):
        say(f"run {previous['id']} ({previous['name']}) is already complete at step {last}; nothing to train "
            f"(a --max-steps above {last} trains it further)")
        return Outcome(0, previous, control.summary(db, previous))
    _note_other_parent(db, previous, settings, say)
    return _resume(db, previous, *_resumed_settings(previous, values, request.override_settings), launch, say,
                   print_command=request.print_command)


def _note_other_parent(db, run: dict[str, Any], settings: TrainSettings, say: Say) -> None:
    """--init-from or --pretrained-checkpoint naming another file than the run started from (RUN names its
    newest checkpoint, which moves on): the run continues from its own checkpoints; say so."""
    if settings.pretrained_checkpoint is None or run["parent_kind"] != "weights":
        return
    if queries.stored_path(db, settings.pretrained_checkpoint) != queries.stored_path(db, run["parent_checkpoint"]):
        say(f"note: run {run['id']} started from {run['parent_checkpoint']}; it continues from its own "
            f"checkpoints, not from {settings.pretrained_checkpoint}")


# -- a run continued --------------------------------------------------------------------------------------

def _resume_named(request: TrainRequest, say: Say) -> Outcome:
    """`gptctl resume RUN`: the run's stored settings, changed by the options given where a resume may."""
    values = request.values
    launch = build_launch({k: v for k, v in values.items() if k in LAUNCH_FIELDS},
                          defaults=slurm.launch_defaults(dict(os.environ)))
    if values.get("run_name") is not None:
        raise UserError("--run-name: a resume keeps the run's name; `gptctl runs list` shows it")
    db = open_registry(home_dir(), create=False)
    run = queries.resolve_run(db, request.run_ref)
    if run["status"] == "completed" and values.get("max_steps") is None:
        raise UserError(f"run {run['id']} is completed at step {run['last_step']}; pass --max-steps to train further")
    return _resume(db, run, *_resumed_settings(run, _with_data_identity(run, values), request.override_settings),
                   launch, say)


def _resumed_settings(run: dict[str, Any], values: dict[str, Any], override: bool) -> tuple[TrainSettings, str | None]:
    """The one place every resume (`resume RUN`, --auto-resume) judges the options given against the run's
    stored settings: its settings for this launch, and what they change as one line (None: nothing)."""
    return resume_settings(run, values.get("max_steps"), resume_changes(run, values, override))


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


def _resume(db, run: dict[str, Any], settings: TrainSettings, note: str | None, launch: LaunchSettings, say: Say,
            print_command: bool = False) -> Outcome:
    preflight.check_run_dir(run)
    writable_home()
    preflight.check_world_size(settings, launch)
    lock = control.lock_existing(run)
    try:
        preflight.refuse_if_done(home_dir(), run, settings)
        control.record_settings(db, run, settings, status="created")
        preflight.remember_verified(home_dir())
        if note:  # what this resume changes: the LR schedule's extension, watched or kept settings
            queries.add_event(db, run["id"], run["last_step"], "resume", note)
            say(note)
    except BaseException:
        lock.release()  # refused, or the disk refused the new settings: the run stays as it was
        raise
    if print_command:  # a job script's submission: the run is queued for the printed command
        say(f"run {run['id']} ({run['name']}) queued to continue")
        return Outcome(0, run, command=control.queue(db, home_dir(), run, lock, launch))
    say(f"resuming run {run['id']} ({run['name']})")  # from the step its workers say: they verify
    return _launched(db, run, lock, launch)


def _launched(db, run: dict[str, Any], lock, launch: LaunchSettings, init_checkpoint: str | None = None) -> Outcome:
    """The run's workers launched (it holds `lock`), and where the run stands once they ended."""
    row = control.execute(db, home_dir(), run, lock, launch, init_checkpoint=init_checkpoint)
    return Outcome(row["exit_code"], row, control.summary(db, row))
