"""The life of a run on the control plane: create it, lock it, launch its workers, record the outcome."""

import json
import shlex
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptctl import launch
from gptctl.atomic import write_text_atomic
from gptctl.errors import UserError
from gptctl.registry import open_registry, queries
from gptctl.paths import home_dir
from gptctl.registry.locks import RunLock
from gptctl.registry.rebuild import write_run_info
from pydantic import ValidationError

from gptctl.settings import TrainSettings, describe, to_toml


@dataclass
class Outcome:
    run: dict[str, Any]
    exit_code: int


def check_data(settings: TrainSettings) -> None:
    from gptctl.data.shards import find_shards

    if settings.data_root is None:
        raise UserError("--data-root is required: a directory prepared by `gptctl data prepare`")
    for split in ("train", "val"):
        find_shards(settings.data_root, split)


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


def prepare_dataset(settings: TrainSettings):
    """A finetune's tokenized instruction set (None for pretraining, which reads shards in place)."""
    if settings.kind != "finetune":
        return None
    from gptctl.data import dolly

    return dolly.build(settings.dataset_path, settings.seq_len, settings.val_fraction, settings.seed)


def check_world_size(settings: TrainSettings) -> None:
    """With --nproc-per-node gpu the process count is known only here, so is the batch check."""
    try:
        settings.check_world(launch.world_size(settings))
    except ValueError as exc:
        raise UserError(str(exc)) from None


def check_checkpoint_path(path: Path | None, resume: bool) -> None:
    if resume and path is None:
        raise UserError("--resume needs --checkpoint-path PATH (or use --auto-resume, or `gptctl resume RUN`)")
    if path is not None and not path.is_file():
        raise UserError(f"--checkpoint-path: {path} does not exist")


def parent_model(path: Path, option: str) -> dict[str, Any]:
    """The model settings of the checkpoint a run starts from (loaded as plain data only)."""
    from gptctl.engine.checkpoint import UnsafeCheckpoint, load

    try:
        stored = load(path).get("settings")
    except UnsafeCheckpoint as exc:
        raise UserError(f"{option}: {exc}") from None
    try:
        parent = TrainSettings.model_validate(stored)
    except ValidationError:
        raise UserError(f"{option}: {path} has no gptctl model settings; is it a gptctl checkpoint?") from None
    shape = parent.shape
    return {"model": parent.model, "n_layer": shape.n_layer, "n_head": shape.n_head, "n_embd": shape.n_embd,
            "block_size": shape.block_size}


def create_run(settings: TrainSettings, command: list[str], save_config: bool, parent_checkpoint: str | None = None,
               dataset=None) -> tuple[dict, RunLock]:
    """Everything has been validated before this: from here on the run exists on disk and in the registry."""
    home = home_dir()
    db = open_registry(home)
    run_id = queries.new_run_id(db)
    name = settings.run_name or settings.kind
    run_dir = (home / f"{name}-{run_id}").resolve()
    run_dir.mkdir(parents=True)
    lock = RunLock(run_dir)
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


def lock_existing(run: dict[str, Any]) -> RunLock:
    lock = RunLock(Path(run["run_dir"]))
    if not lock.acquire():
        raise UserError(f"run {run['id']} is being trained by another process; wait for it or stop it first")
    return lock


def _command(run: dict[str, Any], init_checkpoint: str | None, job_script: bool = False) -> list[str]:
    settings = TrainSettings.model_validate_json(run["settings"])
    cmd = launch.torchrun_command(settings, home_dir().resolve(), run["id"], job_script)
    if init_checkpoint:
        cmd += ["--init-checkpoint", str(Path(init_checkpoint).resolve())]
    return cmd


def queue(run: dict[str, Any], lock: RunLock, init_checkpoint: str | None = None) -> str:
    """Leave the run for a job script to train: its status says so, and its workers take the lock."""
    queries.update_run(open_registry(home_dir()), run["id"], status="queued")
    lock.release()
    return shlex.join(_command(run, init_checkpoint, job_script=True))


def follow(settings: TrainSettings) -> int:
    """A node other than node 0: start its workers, which get the run from node 0's; write nothing."""
    code, forwarded = launch.run_workers(launch.torchrun_command(settings, home_dir().resolve(), None))
    return 128 + forwarded if forwarded else code


def execute(run: dict[str, Any], lock: RunLock, init_checkpoint: str | None = None) -> Outcome:
    """Launch the workers for `run` (which holds `lock`) and record how they ended."""
    home = home_dir().resolve()
    cmd = _command(run, init_checkpoint)
    try:
        code, forwarded = launch.run_workers(cmd)
    finally:
        db = open_registry(home)
        row = queries.get_run(db, run["id"])
        if row["status"] in queries.ACTIVE:
            # The workers died without recording an outcome (crash, kill, or torchrun refusing to start).
            status = "interrupted" if forwarded else "failed"
            queries.update_run(db, run["id"], status=status, ended_at=queries.now())
        lock.release()
    db = open_registry(home)
    queries.update_run(db, run["id"], exit_code=code)
    row = queries.get_run(db, run["id"])
    if row["status"] == "interrupted":
        code = 128 + (forwarded or signal.SIGINT)
    return Outcome(row, code)


def resume_settings(run: dict[str, Any], max_steps: int | None) -> TrainSettings:
    settings = TrainSettings.model_validate_json(run["settings"])
    if max_steps is not None:
        if max_steps <= (run["last_step"] or 0):
            raise UserError(f"--max-steps ({max_steps}) must be above the run's last step ({run['last_step']})")
        try:
            settings = TrainSettings(**{**settings.model_dump(), "max_steps": max_steps})
        except ValidationError as exc:  # e.g. warmup >= max_steps
            raise UserError(describe(exc)) from None
    return settings


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
