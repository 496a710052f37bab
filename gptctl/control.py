"""The life of a run on the control plane: create it, lock it, launch its workers, record the outcome."""

import json
import shlex
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptctl import launch
from gptctl.atomic import write_text_atomic
from gptctl.deadline import DEADLINE_ENV, MARGIN_ENV, launch_deadline
from gptctl.errors import UserError
from gptctl.registry import launches, open_registry, queries
from gptctl.paths import home_dir
from gptctl.registry.locks import DirectoryLock
from gptctl.registry.rebuild import write_run_info
from pydantic import ValidationError

from gptctl.settings import LaunchSettings, TrainSettings, describe, option_name, to_toml


DIVERGED_EXIT_CODE = 3
DEADLINE_EXIT_CODE = 124  # as timeout(1): stopped, with a checkpoint, because time ran out; resume later


@dataclass
class Outcome:
    run: dict[str, Any]
    exit_code: int


def check_data(settings: TrainSettings) -> None:
    from gptctl.data.shards import check_split_size

    if settings.data_root is None:
        raise UserError("--data-root is required: a directory prepared by `gptctl data prepare`")
    for split in ("train", "val"):
        check_split_size(settings.data_root, split, settings.batch_size, settings.seq_len)


def check_dataset(settings: TrainSettings) -> None:
    path = settings.dataset_path
    if path is not None and not path.is_file():
        raise UserError(f"--dataset-path: {path} does not exist; give a JSONL file in Dolly's schema "
                        "(instruction, context, response, category)")


def check_extras(settings: TrainSettings) -> None:
    """Optional packages and files the workers will need, checked before anything is written."""
    from importlib.util import find_spec

    for wanted, option, package in ((settings.wandb_log, "--wandb-log", "wandb"), (settings.tensorboard, "--tensorboard", "tensorboard")):
        if wanted and find_spec(package) is None:
            raise UserError(f"{option}: the {package} package is not installed; pip install 'gptctl[{package}]'")
    if settings.hellaswag_file is not None and not settings.hellaswag_file.is_file():
        raise UserError(f"--hellaswag-file: {settings.hellaswag_file} does not exist")
    if settings.log_dir is not None and settings.log_dir.exists() and not settings.log_dir.is_dir():
        raise UserError(f"--log-dir: {settings.log_dir} is not a directory")


def prepare_dataset(settings: TrainSettings):
    """A finetune's tokenized instruction set (None for pretraining, which reads shards in place)."""
    if settings.kind != "finetune":
        return None
    from gptctl.data import dolly

    return dolly.build(settings.dataset_path, settings.seq_len, settings.val_fraction, settings.seed)


def check_world_size(settings: TrainSettings, launch_settings: LaunchSettings) -> None:
    """The run's batch and sharding split over this launch's processes (with --nproc-per-node gpu they are
    counted here); checked for every launch, since a resume may run on another number of processes."""
    try:
        settings.check_world(launch.world_size(launch_settings))
    except ValueError as exc:
        raise UserError(str(exc)) from None


# What the workers read from a checkpoint they resume from (engine/worker.py), besides its settings.
TRAINING_STATE = ("model", "optimizer", "step", "rng")


def check_checkpoint_path(path: Path | None, resume: bool, settings: TrainSettings) -> None:
    """--resume --checkpoint-path: a gptctl training state of this model, short of --max-steps, read now,
    before the run exists (the workers would otherwise fail on it after a run was created)."""
    if resume and path is None:
        raise UserError("--resume needs --checkpoint-path PATH (or use --auto-resume, or `gptctl resume RUN`)")
    if path is None:
        return
    if not resume:
        raise UserError("--checkpoint-path: only used with --resume; add --resume (or start from its weights alone "
                        "with --init-from)")
    if not path.is_file():
        raise UserError(f"--checkpoint-path: {path} does not exist")
    state, stored = read_checkpoint(path, "--checkpoint-path")
    missing = [key for key in TRAINING_STATE if key not in state]
    if missing:
        raise UserError(f"--checkpoint-path: {path} holds no training state ({', '.join(missing)} missing), so a run "
                        "cannot resume from it; start from its weights with --init-from")
    differs = [f"{k} {getattr(stored.shape, k)} vs {getattr(settings.shape, k)}"
               for k in ("n_layer", "n_head", "n_embd", "block_size") if getattr(stored.shape, k) != getattr(settings.shape, k)]
    if differs:
        raise UserError(f"--checkpoint-path: {path} holds another model than these settings make ({', '.join(differs)});"
                        f" give the checkpoint's own --model/--n-*/--seq-len")
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise UserError(f"--checkpoint-path: {path} has no valid step number ({step!r}); is it a gptctl checkpoint?")
    if step >= settings.max_steps:
        raise UserError(f"--checkpoint-path: {path} is at step {step}; --max-steps ({settings.max_steps}) must be "
                        "above it to train further")


def check_run_dir(run: dict[str, Any]) -> None:
    """A run is continued in its directory: one that was deleted cannot be resumed (nor silently re-created)."""
    if not Path(run["run_dir"]).is_dir():
        raise UserError(f"run {run['id']} ({run['name']}): its run directory {run['run_dir']} is gone, with its "
                        "checkpoints; start a new run (--resume --checkpoint-path FILE continues from a copy)")


def read_checkpoint(path: Path, option: str) -> tuple[dict[str, Any], TrainSettings]:
    """(state, its settings) of a checkpoint a run would start from, loaded as plain data only, and checked to
    be gptctl's own: a dict with model weights and the settings that made it. UserError naming `option` otherwise."""
    from gptctl.engine.checkpoint import UnsafeCheckpoint, load

    try:
        state = load(path, mmap=True)  # the settings and keys; the tensors are not read
    except UnsafeCheckpoint as exc:
        raise UserError(f"{option}: {exc}") from None
    stored = state.get("settings") if isinstance(state, dict) else None
    if not isinstance(stored, dict) or not isinstance(state.get("model"), dict):
        found = "no settings" if isinstance(state, dict) else f"a {type(state).__name__}, not a dict of state"
        raise UserError(f"{option}: {path} is not a gptctl checkpoint ({found}); gptctl starts only from its own "
                        "checkpoints, or from Hugging Face weights with hf:DIR_OR_NAME")
    try:
        return state, TrainSettings.model_validate(stored)
    except ValidationError as exc:
        raise UserError(f"{option}: {path} holds settings gptctl cannot use ({describe(exc)})") from None


def parent_model(path: Path, option: str) -> dict[str, Any]:
    """The model settings of the checkpoint a run starts from (loaded as plain data only)."""
    parent = read_checkpoint(path, option)[1]
    shape = parent.shape
    return {"model": parent.model, "n_layer": shape.n_layer, "n_head": shape.n_head, "n_embd": shape.n_embd,
            "block_size": shape.block_size}


def create_run(settings: TrainSettings, command: list[str], save_config: bool, parent_checkpoint: str | None = None,
               dataset=None) -> tuple[dict, DirectoryLock]:
    """Everything has been validated before this: from here on the run exists on disk and in the registry."""
    home = home_dir()
    db = open_registry(home)
    run_id = queries.new_run_id(db)
    name = settings.run_name or settings.kind
    run_dir = (home / f"{name}-{run_id}").resolve()
    run_dir.mkdir(parents=True)
    lock = DirectoryLock(run_dir)
    lock.acquire()
    stored = settings.model_copy(update={"run_name": name})
    write_text_atomic(run_dir / "config.json", stored.model_dump_json(indent=2) + "\n")
    if save_config:
        write_text_atomic(run_dir / "config.toml", to_toml(stored))
    if dataset is not None:
        from gptctl.data import dolly

        dolly.save(dataset, run_dir)
    queries.insert_run(db, {
        "id": run_id, "name": name, "kind": settings.kind, "settings": stored.model_dump_json(),
        "run_dir": str(run_dir), "command": shlex.join(command), "max_steps": settings.max_steps,
        "parent_checkpoint": parent_checkpoint, "last_step": 0,
    })
    run = queries.get_run(db, run_id)
    write_run_info(run)  # so that `gptctl registry rebuild` can re-create the row from the directory
    return run, lock


def lock_existing(run: dict[str, Any]) -> DirectoryLock:
    lock = DirectoryLock(Path(run["run_dir"]))
    if not lock.acquire():
        raise UserError(f"run {run['id']} is being trained by another process; wait for it or stop it first")
    return lock


def refuse_if_done(run: dict[str, Any], settings: TrainSettings) -> None:
    """A resume of `run` (locked by the caller) that could train nothing is refused before its status
    changes. Its start is found by the workers' rules: the newest checkpoint that verifies and, when
    it would end the run, loads as plain data (a file that does not is marked corrupt)."""
    from gptctl.registry import files

    db = open_registry(home_dir())
    files.reconcile(db, run, inspect=files.load_check, by_trainer=True)  # the caller holds the run for its workers
    warn = lambda message: print(f"warning: {message}", file=sys.stderr)  # noqa: E731
    while (row := files.newest_verified_checkpoint(db, run["id"], warn)) and row["step"] >= settings.max_steps:
        if files.load_check(Path(row["path"])) == row["step"]:
            raise UserError(f"run {run['id']} is already at step {row['step']}; raise --max-steps above it to continue")
        queries.mark_checkpoint(db, row["id"], "corrupt", only_if="valid", sha256=row["sha256"])
        warn(f"checkpoint step {row['step']} ({row['path']}) does not load as a gptctl checkpoint; marked corrupt")


def _command(run: dict[str, Any], launch_settings: LaunchSettings, init_checkpoint: str | None,
             job_script: bool = False) -> list[str]:
    cmd = launch.torchrun_command(launch_settings, home_dir().resolve(), run["name"], run["id"], job_script=job_script)
    if init_checkpoint:
        cmd += ["--init-checkpoint", str(Path(init_checkpoint).resolve())]
    return cmd


def queue(run: dict[str, Any], lock: DirectoryLock, launch_settings: LaunchSettings,
          init_checkpoint: str | None = None) -> str:
    """Leave the run for a job script to train: its status says so, and its workers take the lock."""
    queries.update_run(open_registry(home_dir()), run["id"], status="queued")
    lock.release()
    return shlex.join(_command(run, launch_settings, init_checkpoint, job_script=True))


def worker_env(launch_settings: LaunchSettings) -> dict[str, str]:
    """What the workers learn of this launch: when it began, and the deadline they must stop before
    (the earlier of --deadline and a SLURM job's end, asked of SLURM once, here)."""
    env = {launch.LAUNCH_STARTED_ENV: repr(time.time()), MARGIN_ENV: repr(launch_settings.deadline_margin)}
    deadline = launch_deadline(launch_settings.deadline_at)
    if deadline is not None:
        env[DEADLINE_ENV] = repr(deadline)
    return env


def follow(settings: TrainSettings, launch_settings: LaunchSettings) -> int:
    """A node other than node 0: start its workers, which get the run from node 0's; write nothing."""
    cmd = launch.torchrun_command(launch_settings, home_dir().resolve(), settings.run_name or settings.kind,
                                  device=settings.device)
    code, stopped_by = launch.run_workers(cmd, launch_settings.stop_timeout, worker_env(launch_settings))
    return 128 + stopped_by if stopped_by else code


def execute(run: dict[str, Any], lock: DirectoryLock, launch_settings: LaunchSettings,
            init_checkpoint: str | None = None) -> Outcome:
    """Launch the workers for `run` (which holds `lock`) and record how they ended."""
    home = home_dir().resolve()
    code, stopped_by = None, None
    try:
        code, stopped_by = launch.run_workers(_command(run, launch_settings, init_checkpoint),
                                              launch_settings.stop_timeout, worker_env(launch_settings))
    finally:
        db = open_registry(home)
        # A start whose workers recorded no end: killed here (torchrun killed by a signal), else crashed.
        launches.close_open(db, run["id"], "kill" if stopped_by and code is not None and code < 0 else "crash")
        row = queries.get_run(db, run["id"])
        if row["status"] in queries.ACTIVE:
            # The workers died without recording an outcome (crash, kill, or torchrun refusing to start).
            status = "interrupted" if stopped_by else "failed"
            queries.update_run(db, run["id"], status=status, ended_at=queries.now())
        lock.release()
    db = open_registry(home)
    status = queries.get_run(db, run["id"])["status"]
    newest = launches.newest(db, run["id"])
    if status == "interrupted" and not stopped_by and newest and newest["reason"] == "deadline":
        code = DEADLINE_EXIT_CODE
    elif status == "interrupted":
        code = 128 + (stopped_by or signal.SIGINT)  # the workers exit 0 after a clean stop
    elif status == "diverged":
        code = DIVERGED_EXIT_CODE  # the workers exit 0 so that torchrun does not restart them into it
    queries.update_run(db, run["id"], exit_code=code)
    return Outcome(queries.get_run(db, run["id"]), code)


# Settings a resume may change: how the run is watched, evaluated, checkpointed and kept, and how its
# steps are computed, not what they compute. Any other, changed, would silently make another run (data,
# batch, optimizer, schedule, seed, dtype): only with --override-settings. The model's shape never.
CHANGEABLE_ON_RESUME = frozenset({
    "eval_interval", "eval_steps", "checkpoint_interval", "async_checkpoint", "keep_last_n_checkpoints",
    "permanent_checkpoints", "num_workers", "compile", "log_dir", "log_level", "log_gradients", "wandb_log",
    "wandb_project", "wandb_run_name", "tensorboard", "hellaswag_interval", "hellaswag_file", "on_divergence",
    "spike_factor", "nonfinite_streak", "max_rollbacks", "activation_checkpointing", "model_parallel",
    "model_parallel_size", "device", "deterministic",
})
SHAPE_OPTIONS = ("model", "n_layer", "n_head", "n_embd", "seq_len")
OVERRIDE = "--override-settings"


def resume_changes(run: dict[str, Any], given: dict[str, Any], override: bool = False) -> dict[str, Any]:
    """The options given for a resume of `run` that differ from its stored settings (values as the run's
    settings hold them). Those in CHANGEABLE_ON_RESUME, any other only with `override`; UserError naming
    the first that may not change, or that would give the checkpoint's weights another shape."""
    stored = TrainSettings.model_validate_json(run["settings"])
    given = {k: v for k, v in given.items()
             if v is not None and k in TrainSettings.model_fields and k not in ("max_steps", "run_name")}
    try:
        wanted = TrainSettings(**{**stored.model_dump(), **given})
    except ValidationError as exc:
        raise UserError(describe(exc)) from None
    changes = {name: getattr(wanted, name) for name in sorted(given) if getattr(wanted, name) != getattr(stored, name)}
    was = f"run {run['id']} ({run['name']}) was started with"
    if wanted.shape != stored.shape:
        name = next(n for n in SHAPE_OPTIONS if n in changes)
        value = getattr(stored.shape, name, None) or getattr(stored, name)  # n_layer None: the preset's
        raise UserError(f"{option_name(name)}: {was} {value!r}, and its checkpoints hold weights of that shape; "
                        "drop the option, or start a new run (--init-from RUN takes its weights)")
    refused = [name for name in changes if name not in CHANGEABLE_ON_RESUME]
    if refused and not override:
        name = refused[0]
        raise UserError(f"{option_name(name)}: {was} {getattr(stored, name)!r}; resuming cannot change it without "
                        f"making another run. Drop the option, add {OVERRIDE} to change it all the same (recorded "
                        "with the step), or start a new run with another --run-name")
    return changes


def resume_settings(run: dict[str, Any], max_steps: int | None,
                    changes: dict[str, Any] | None = None) -> tuple[TrainSettings, str | None]:
    """The run's settings for a resume, and what the resume changes, as one line for the run's events
    (None: nothing).

    The LR never jumps: the schedule keeps ending where it did (--lr-decay-steps), so the added steps
    train at the final LR; only a wsd run that has not started decaying moves its decay to the new end."""
    stored = TrainSettings.model_validate_json(run["settings"])
    settings = TrainSettings(**{**stored.model_dump(), **changes}) if changes else stored
    changed = _describe_changes(changes, stored, run)
    if max_steps is None or max_steps == settings.max_steps:
        return settings, changed
    last = run["last_step"] or 0
    if max_steps <= last:
        raise UserError(f"--max-steps ({max_steps}) must be above the run's last step ({last})")
    update: dict[str, Any] = {"max_steps": max_steps}
    horizon = settings.schedule_steps
    wsd_stable = settings.lr_scheduler == "wsd" and settings.lr_decay_steps is None and last < settings.schedule().decay_start()
    if wsd_stable:
        note = f"--max-steps {settings.max_steps} -> {max_steps} at step {last}: the wsd decay moves to the new end"
    elif settings.lr_scheduler != "constant" and settings.lr_decay_steps is None and max_steps < horizon:
        before, after = settings.schedule().at(last + 1), settings.schedule(max_steps).at(last + 1)
        note = (f"--max-steps {settings.max_steps} -> {max_steps} at step {last}: the LR schedule now ends at step "
                f"{max_steps}; the LR at step {last + 1} goes from {before:.3g} to {after:.3g}")
    elif settings.lr_scheduler == "constant" or horizon >= max_steps:
        note = None
    else:
        update["lr_decay_steps"] = horizon
        note = (f"--max-steps {settings.max_steps} -> {max_steps} at step {last}: the LR schedule still ends at "
                f"step {horizon}; the added steps train at the final LR ({settings.final_lr:.3g})")
    try:
        settings = TrainSettings(**{**settings.model_dump(), **update})
    except ValidationError as exc:  # e.g. warmup >= max_steps
        raise UserError(describe(exc)) from None
    return settings, "; ".join(n for n in (note, changed) if n) or None


def _describe_changes(changes: dict[str, Any] | None, stored: TrainSettings, run: dict[str, Any]) -> str | None:
    if not changes:
        return None
    return f"changed at step {run['last_step'] or 0}: " + ", ".join(
        f"{option_name(k)} {v} (was {getattr(stored, k)})"
        + ("" if k in CHANGEABLE_ON_RESUME else f", by {OVERRIDE}") for k, v in changes.items())


def summary(run: dict[str, Any]) -> dict[str, Any]:
    db = open_registry(home_dir())
    metrics = queries.metrics_of(db, run["id"])
    last = metrics[-1] if metrics else {}
    val = [m["val_loss"] for m in metrics if m["val_loss"] is not None]
    return {
        "run_id": run["id"], "name": run["name"], "status": run["status"], "last_step": run["last_step"],
        "max_steps": run["max_steps"], "loss": last.get("loss"), "val_loss": val[-1] if val else None,
        "tokens_per_s": run["tokens_per_s"], "run_dir": run["run_dir"],
        "checkpoints": [c["path"] for c in queries.checkpoints_of(db, run["id"], states=["valid"])],
    }


def command_line() -> list[str]:
    return ["gptctl", *sys.argv[1:]]


def dump(obj: Any) -> str:
    return json.dumps(obj, indent=2, default=str)
