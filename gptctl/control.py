"""The life of a run on the control plane: create it, lock it, launch its workers, record the outcome.

training.py sequences these for a command; what is checked before (preflight.py) and what a resume
changes (resume.py) live beside it. Each takes the command's open registry (`db`)."""

import shlex
import signal
import sys
import time
from pathlib import Path
from typing import Any

from gptctl import launch, stop_request
from gptctl.atomic import write_text_atomic
from gptctl.deadline import DEADLINE_ENV, MARGIN_ENV, launch_deadline
from gptctl.detach import hand_off
from gptctl.errors import UserError
from gptctl.registry import launches, queries
from gptctl.registry.db import transaction
from gptctl.registry.locks import LOCK_NAME, TAKEOVER_WAIT_S, DirectoryLock
from gptctl.registry.runinfo import write_run_info
from gptctl.settings import LaunchSettings, TrainSettings
from gptctl.settings_files import to_toml


DIVERGED_EXIT_CODE = 3
DEADLINE_EXIT_CODE = 124  # as timeout(1): stopped, with a checkpoint, because time ran out; resume later


def create_run(db, home: Path, settings: TrainSettings, command: list[str], save_config: bool,
               parent_checkpoint: str | None = None, dataset=None, name: str | None = None, new_run: bool = False,
               parent_kind: str | None = None) -> tuple[dict, DirectoryLock]:
    """Everything has been validated before this: from here on the run exists on disk and in the registry.

    `name`: the run's name, which no run may have already unless `new_run`; None: the kind, numbered
    (pretrain-2) when taken. The name is checked and the row inserted in one transaction, so of any
    number of commands making the same name at once exactly one makes it. `parent_kind`: what the parent
    gives, 'weights' (--init-from, a finetune) or 'state' (--resume --checkpoint-path). The directory is made and
    locked first: until the row is in, a locked directory is one being made (db.unregistered_run_directories)."""
    home = home.resolve()
    while True:
        chosen = name or queries.free_name(db, settings.kind)
        run_id = queries.new_run_id(db)
        run_dir = home / f"{chosen}-{run_id}"
        run_dir.mkdir(parents=True)
        lock = DirectoryLock(run_dir)
        lock.acquire()
        stored = settings.model_copy(update={"run_name": chosen})
        try:
            with transaction(db):
                taken = queries.newest_run_named(db, chosen) if not new_run else None
                if taken is None:
                    queries.insert_run(db, {
                        "id": run_id, "name": chosen, "kind": settings.kind, "settings": stored.model_dump_json(),
                        "run_dir": str(run_dir), "command": shlex.join(command), "max_steps": settings.max_steps,
                        "parent_checkpoint": parent_checkpoint, "parent_kind": parent_kind, "last_step": 0,
                    })
        except BaseException:
            _unmake(run_dir, lock)
            raise
        if taken is None:
            break
        _unmake(run_dir, lock)
        if name is not None:
            raise UserError(f"--run-name {name}: another command made run {taken['id']} of this name meanwhile, and "
                            f"trains it; `gptctl runs show {name}` follows it")
    run = queries.get_run(db, run_id)
    _write_settings(run_dir, stored, toml=save_config)
    if dataset is not None:
        from gptctl.data import dolly

        dolly.save(dataset, run_dir)
    write_run_info(run)  # so that `gptctl registry rebuild` can re-create the row from the directory
    return run, lock


def _unmake(run_dir: Path, lock: DirectoryLock) -> None:
    """Remove a run directory this process made and that got no row (it holds only the lock file)."""
    (run_dir / LOCK_NAME).unlink(missing_ok=True)
    lock.release()
    run_dir.rmdir()


def record_settings(db, run: dict[str, Any], settings: TrainSettings, **values: Any) -> None:
    """The run's settings of record change (a resume): its directory's files first, each replaced
    atomically, then the registry; `registry rebuild` reads them, and prefers a checkpoint's."""
    run_dir = Path(run["run_dir"])
    _write_settings(run_dir, settings, toml=(run_dir / "config.toml").exists())
    queries.update_run(db, run["id"], settings=settings.model_dump_json(), max_steps=settings.max_steps, **values)


def _write_settings(run_dir: Path, settings: TrainSettings, toml: bool) -> None:
    write_text_atomic(run_dir / "config.json", settings.model_dump_json(indent=2) + "\n")
    if toml:
        write_text_atomic(run_dir / "config.toml", to_toml(settings))


def lock_existing(run: dict[str, Any]) -> DirectoryLock:
    lock = DirectoryLock(Path(run["run_dir"]))
    # A requeued job may find the lock of its own earlier job on a node that died: watched, then taken over
    if not lock.acquire(wait_s=TAKEOVER_WAIT_S, say=lambda message: print(message, file=sys.stderr)):
        holder = lock.holder()
        where = f" (pid {holder['pid']} on {holder['host']})" if holder.get("host") else ""
        raise UserError(f"run {run['id']} is being trained by another process{where}; wait for it or stop it first")
    # Asked of an earlier launch; cleared now, before the run shows as created, so that a `runs stop`
    # of this launch is never taken for an old one
    stop_request.clear(Path(run["run_dir"]))
    return lock


def _command(home: Path, run: dict[str, Any], launch_settings: LaunchSettings, init_checkpoint: str | None,
             job_script: bool = False) -> list[str]:
    cmd = launch.torchrun_command(launch_settings, home.resolve(), run["name"], run["id"], job_script=job_script)
    if init_checkpoint:
        cmd += ["--init-checkpoint", str(Path(init_checkpoint).resolve())]
    return cmd


def queue(db, home: Path, run: dict[str, Any], lock: DirectoryLock, launch_settings: LaunchSettings,
          init_checkpoint: str | None = None) -> str:
    """Leave the run for a job script to train: its status says so, and its workers take the lock."""
    queries.update_run(db, run["id"], status="queued")
    lock.release()
    return shlex.join(_command(home, run, launch_settings, init_checkpoint, job_script=True))


def worker_env(launch_settings: LaunchSettings) -> dict[str, str]:
    """What the workers learn of this launch: when it began, and the deadline they must stop before
    (the earlier of --deadline and a SLURM job's end, asked of SLURM once, here)."""
    env = {launch.LAUNCH_STARTED_ENV: repr(time.time()), MARGIN_ENV: repr(launch_settings.deadline_margin)}
    deadline = launch_deadline(launch_settings.deadline_at)
    if deadline is not None:
        env[DEADLINE_ENV] = repr(deadline)
    return env


def follow(home: Path, settings: TrainSettings, launch_settings: LaunchSettings) -> int:
    """A node other than node 0: start its workers, which get the run from node 0's; write nothing."""
    cmd = launch.torchrun_command(launch_settings, home.resolve(), settings.run_name or settings.kind,
                                  device=settings.device)
    code, stopped_by = launch.run_workers(cmd, launch_settings.stop_timeout, worker_env(launch_settings))
    return 128 + stopped_by if stopped_by else code


def execute(db, home: Path, run: dict[str, Any], lock: DirectoryLock, launch_settings: LaunchSettings,
            init_checkpoint: str | None = None) -> dict[str, Any]:
    """Launch the workers for `run` (which holds `lock`) and record how they ended: the run's row then, with
    its exit code."""
    home, run_dir = home.resolve(), Path(run["run_dir"])
    code, stopped_by = None, None
    try:
        hand_off(run, run_dir)  # --detach: from here on the run goes on without the terminal
        code, stopped_by = launch.run_workers(_command(home, run, launch_settings, init_checkpoint),
                                              launch_settings.stop_timeout, worker_env(launch_settings),
                                              log=run_dir / launch.LAUNCHER_LOG, requests=stop_request.Watch(run_dir))
    finally:
        try:  # a registry that cannot be written now (a full disk) is said by the CLI in one line
            # A start whose workers recorded no end: killed here (torchrun killed by a signal), else crashed.
            launches.close_open(db, run["id"], "kill" if stopped_by and code is not None and code < 0 else "crash")
            row = queries.get_run(db, run["id"])  # as the workers left it
            if row["status"] in queries.ACTIVE:
                # The workers died without recording an outcome (crash, kill, or torchrun refusing to start).
                ended = {"status": "interrupted" if stopped_by else "failed", "ended_at": queries.now()}
                queries.update_run(db, run["id"], **ended)
                row = {**row, **ended}
        finally:
            lock.release()
    newest = launches.newest(db, run["id"])
    if row["status"] == "interrupted" and not stopped_by and newest and newest["reason"] == "deadline":
        code = DEADLINE_EXIT_CODE
    elif row["status"] == "interrupted":
        code = 128 + (stopped_by or signal.SIGINT)  # the workers exit 0 after a clean stop
    elif row["status"] == "diverged":
        code = DIVERGED_EXIT_CODE  # the workers exit 0 so that torchrun does not restart them into it
    queries.update_run(db, run["id"], exit_code=code)
    return {**row, "exit_code": code}


def summary(db, run: dict[str, Any]) -> dict[str, Any]:
    """Where `run` (its row) stands: its last losses, speed and valid checkpoints."""
    metrics = queries.metrics_of(db, run["id"])
    last = metrics[-1] if metrics else {}
    val = [m["val_loss"] for m in metrics if m["val_loss"] is not None]
    return {
        "run_id": run["id"], "name": run["name"], "status": run["status"], "last_step": run["last_step"],
        "max_steps": run["max_steps"], "loss": last.get("loss"), "val_loss": val[-1] if val else None,
        "tokens_per_s": run["tokens_per_s"], "run_dir": run["run_dir"],
        "checkpoints": [c["path"] for c in queries.checkpoints_of(db, run["id"], states=["valid"])],
    }
