"""Entry point of every torchrun worker: `python -m gptctl.engine.worker --home H --run-id ID`.

A worker always continues its run from the newest verified checkpoint if one exists, so a
resumed run and a worker restarted by torchrun take the same path. Only global rank 0 writes
the registry and checkpoint files (it alone receives gathered full state; under c10d it may sit on any
node, which is why the home must be shared).
"""

import time

STARTED = time.time()  # this process's start, before the slow imports: start-up time counts them

import argparse
import os
import socket
import sqlite3
import sys
import traceback
from pathlib import Path
from typing import Callable, NamedTuple

from gptctl.deadline import worker_deadline
from gptctl.engine.startup import StopFlag, pin_thread_pools
from gptctl.launch import LAUNCH_STARTED_ENV, LAUNCHED_ENV, die_with_parent

STOP = StopFlag()

if __name__ == "__main__":
    # Before the slow imports below: a stop signal that arrives while they run is kept, not fatal;
    # the thread pools are fixed before torch loads them; and a launcher killed meanwhile must not
    # leave this process behind.
    STOP.install()
    pin_thread_pools()
    die_with_parent()
    if os.environ.get(LAUNCHED_ENV) and os.getppid() == 1:  # gptctl's torchrun is already gone (a bare
        sys.exit(1)  # torchrun may itself be PID 1, in a container)

import torch

from gptctl import stop_request
from gptctl.checkpoints import files, store
from gptctl.engine import checkpoint as ckpt
from gptctl.engine.distributed import broadcast_object, setup, share_run, teardown
from gptctl.engine.loggers import ExternalLoggers
from gptctl.engine.optim import muon_lr_scale
from gptctl.engine.progress import TrainingProgress
from gptctl.engine.trainer import LaunchClock, Metrics, Trainer, peak_memory
from gptctl.errors import UserError
from gptctl.paths import registry_path
from gptctl.registry import launches, open_registry, queries
from gptctl.registry.storage import BUSY_TIMEOUT_MS
from gptctl.registry.locks import TAKEOVER_WAIT_S, DirectoryLock
from gptctl.run_log import LOG_NAME
from gptctl.settings import TrainSettings

METRICS_FLUSH_SECONDS = 5.0


class RunRefused(UserError):
    """This worker may not train the run (another trainer holds it, or it is already done): change nothing."""


class LaunchLog:
    """This start of the workers as a registry row (registry/launches.py), kept by the main rank: steps,
    time per phase and peak memory at every metrics flush, the reason it ended at the end. A rollback
    closes it and opens the next, which starts from the checkpoint rolled back to. Built before the
    Trainer, from the clock and the memory gauge it will share; the step reached is the last one the
    metrics saw (`reached`), or given when the row closes."""

    def __init__(self, db, run_id: str, clock: LaunchClock, world_size: int, memory: Callable[[], int], enabled: bool):
        self.db, self.run_id, self.clock, self.world_size, self.memory = db, run_id, clock, world_size, memory
        self.enabled = enabled
        self.id: int | None = None
        self.reached = 0  # the last step the loop finished (or started from)
        self.base = clock.totals()  # the clock at this row's start: rows record their own share
        self.startup = True  # the first row's start-up is the launch's; a rollback's is part of its wall time

    def open(self, first_step: int, stale_reason: str, started: float) -> None:
        self.reached = first_step
        if self.enabled:
            self.id = launches.start(self.db, self.run_id, first_step, self.world_size, started, stale_reason)

    def values(self) -> dict:
        values = {k: v - self.base[k] for k, v in self.clock.totals().items()}
        values.update(last_step=self.reached, peak_memory=self.memory())
        if self.startup:
            values["startup_s"] = self.clock.startup_s
        return values

    def update(self) -> None:
        if self.id is not None:
            launches.update(self.db, self.id, **self.values())

    def close(self, reason: str, **values) -> None:
        if self.id is not None:
            launches.close(self.db, self.id, reason, **{**self.values(), **values})
            self.id = None

    def restart(self, step: int, reached: int) -> None:
        """A rollback from step `reached` to `step`."""
        self.close("rollback", last_step=reached)
        self.base, self.startup = self.clock.totals(), False
        self.open(step, "rollback", time.time())


class RegistryMetrics(Metrics):
    """Rank 0's metrics: buffered and written to the registry in one transaction every few seconds,
    and mirrored to W&B and TensorBoard; each flush also updates this launch's row. Other ranks keep nothing."""

    def __init__(self, db, run_id: str, enabled: bool, mirrors: ExternalLoggers, launch: LaunchLog):
        self.db, self.run_id, self.enabled, self.mirrors, self.launch = db, run_id, enabled, mirrors, launch
        self.buffer: list[dict] = []
        self.last_flush = time.monotonic()

    def log(self, row: dict) -> None:
        self.launch.reached = row["step"]
        if not self.enabled:
            return
        self.buffer.append(row)
        self.mirrors.log(row["step"], row)
        if time.monotonic() - self.last_flush > METRICS_FLUSH_SECONDS:
            self.flush()

    def gradients(self, step: int, rows: list[dict]) -> None:
        if not self.enabled:
            return
        queries.write_gradient_stats(self.db, self.run_id, step, rows)
        self.mirrors.log(step, {r["name"]: r["grad_norm"] for r in rows}, prefix="grad_norm")
        self.mirrors.log(step, {r["name"]: r["update_ratio"] for r in rows}, prefix="update_ratio")

    def event(self, step: int, kind: str, detail: str) -> None:
        if self.enabled:
            queries.add_event(self.db, self.run_id, step, kind, detail)

    def rewind(self, step: int, reached: int) -> None:
        if self.enabled:
            self.flush()
            queries.delete_metrics_after(self.db, self.run_id, step)  # the launches rows keep the lost work
            self.launch.restart(step, reached)

    def flush(self) -> None:
        try:
            if self.enabled and self.buffer:
                queries.write_metrics(self.db, self.run_id, self.buffer)
                queries.update_run(self.db, self.run_id, last_step=self.buffer[-1]["step"])  # progress for `runs show`
            self.launch.update()
        except sqlite3.OperationalError as exc:
            if getattr(exc, "sqlite_errorname", "") not in ("SQLITE_BUSY", "SQLITE_LOCKED"):
                raise
            # another process held the registry past the busy timeout (a long prune?): the rows stay
            # buffered for the next flush rather than the run failing; its checkpoints carry them too
            print(f"warning: the registry was busy for {BUSY_TIMEOUT_MS // 1000} s; metrics kept for the next write",
                  flush=True)
            self.last_flush = time.monotonic()
            return
        self.buffer = []
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.flush()
        self.mirrors.close()


class Start(NamedTuple):
    path: str | None  # the file every rank loads; None: a fresh start
    state: dict | None  # the main rank's loaded copy of it (other ranks load it themselves)
    skipped: str  # newer checkpoints that were not used, and why: "step 18 is corrupt"


def data_problem(settings: TrainSettings) -> str | None:
    """Why a pretraining run's data root no longer holds the data it trained on, or None. Checked by the
    main rank at every start, also one the CLI did not check first (a job script's torchrun, a torchrun
    restart): shard sizes and the fingerprint, a stat each (`gptctl resume` checks content hashes too)."""
    from gptctl.data.shards import fingerprint, shard_problem

    if settings.kind != "pretrain" or settings.data_fingerprint is None:
        return None
    try:
        problem = shard_problem(settings.data_root)
        if problem is None and fingerprint(settings.data_root) != settings.data_fingerprint:
            problem = "it holds other data (prepared again?)"
    except (UserError, OSError) as exc:
        problem = str(exc)
    return problem and (f"--data-root: {settings.data_root} no longer holds the data this run trained on: {problem}; "
                        "`gptctl resume RUN` says what to do")


def choose_start(db, run_id: str, init_checkpoint: str | None, d, settings: TrainSettings | None = None) -> Start:
    """The main rank picks the checkpoint to start from and loads it: a registered file that fails its
    sha256 or does not load as plain data is marked corrupt, and the previous verified one is tried.
    Only then is the choice broadcast, so every rank loads the same good file, or fails alike."""
    path = error = state = None
    skipped = ""
    if d.is_main and settings is not None:
        error = data_problem(settings)  # before anything is read; every rank fails alike below
    if d.is_main and error is None:
        def warn(message: str) -> None:
            print(f"warning: {message}", flush=True)

        # e.g. a file saved but not registered before a kill; this worker's launcher holds the run
        store.reconcile(db, queries.get_run(db, run_id), inspect=files.stored_step, by_trainer=True)
        # an unhealthy checkpoint only when no healthy one is left
        row = (store.newest_good(db, run_id, warn, healthy=True, loads=True)
               or store.newest_good(db, run_id, warn, loads=True))
        try:
            state = row and files.load(Path(row["path"]))
        except (files.UnsafeCheckpoint, OSError) as exc:  # changed since it was checked just now
            error = f"checkpoint step {row['step']}: {exc}"
        bad = queries.checkpoints_of(db, run_id, states=["missing", "corrupt"])
        if row is None and bad:
            # Starting over from step 0 would silently throw the run's progress away.
            error = (f"all {len(bad)} checkpoint(s) of run {run_id} are missing or corrupt "
                     "(`gptctl ckpt verify --run RUN`); start a new run from a good file with --resume --checkpoint-path")
        elif row is None and init_checkpoint:
            try:
                state = files.load(Path(init_checkpoint))
            except (files.UnsafeCheckpoint, OSError) as exc:
                error = f"--checkpoint-path: {exc}"
        path = row["path"] if row else init_checkpoint
        skipped = "; ".join(f"step {c['step']} is {c['state']}" for c in reversed(bad) if row and c["step"] > row["step"])
    path, error, skipped = broadcast_object((path, error, skipped))  # no rank may wait in a collective for a dead one
    if error:
        raise UserError(error)
    return Start(path, state if d.is_main else None, skipped)


def pin_numerics(deterministic: bool) -> None:
    """The same inputs give the same bits. Always: a fixed number of threads (torch.set_num_threads also
    turns MKL's dynamic thread choice off) and MKL's CNR mode (`startup.REPRODUCIBLE_MKL`: the worker set
    it before torch loaded; set again here for a Trainer in a process that did not, which it reaches
    when MKL has made no BLAS call yet). With --deterministic, also deterministic algorithms only;
    cuBLAS reads its workspace setting when CUDA creates its handle, so this runs before that."""
    pin_thread_pools()
    torch.set_num_threads(torch.get_num_threads())
    if deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", type=Path, required=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--run-id", help="The run to train (node 0).")
    target.add_argument("--device", help="On nodes other than node 0, the device to set up: the run and its "
                        "settings come from node 0 once the process group is up.")
    parser.add_argument("--init-checkpoint", default=None)
    args = parser.parse_args(argv)
    die_with_parent()

    stop = STOP
    stop.install()
    db = run = None
    if args.run_id:
        if not registry_path(args.home).is_file():  # never a new registry where the home was
            print(f"error: the registry {registry_path(args.home)} does not exist (was the home moved?); print the "
                  "command again where the home is now (--print-command --auto-resume)", flush=True)
            return 2
        db = open_registry(args.home, create=False, check_home=False)
        run = queries.get_run(db, args.run_id)
    settings = TrainSettings.model_validate_json(run["settings"]) if run else None
    pin_numerics(settings.deterministic if settings else False)  # before CUDA starts (setup)
    d = setup(settings.device if settings else args.device)
    run = share_run(d, run)  # every node trains the run node 0 created
    if run is not None and d.is_main and db is None:  # rank 0 landed on another node: the home is shared
        db = open_registry(args.home, create=False, check_home=False)
    if run is None:
        print("error: no node has the run; start node 0 (--node-rank 0) through gptctl, which creates it", flush=True)
        return 2
    settings = TrainSettings.model_validate_json(run["settings"])  # node 0's, on every node
    pin_numerics(settings.deterministic)  # node 0's --deterministic, before the first cuBLAS call
    write = d.is_main
    lock = None
    try:
        if write and not os.environ.get(LAUNCHED_ENV):  # a bare torchrun: nobody holds the run for us
            lock = DirectoryLock(Path(run["run_dir"]))
            if not lock.acquire(wait_s=TAKEOVER_WAIT_S, say=lambda message: print(message, flush=True)):
                raise RunRefused(f"run {run['id']} is being trained by another process")
            if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) == 0:  # not a restart of this launch
                stop_request.clear(lock.path.parent)  # asked of an earlier launch
            stop.requests = stop_request.Watch(lock.path.parent)  # no launcher passes `runs stop` on: look here
        return _train(args.home, db, run, settings, d, args.init_checkpoint, stop, write)
    except Exception as exc:
        message = user_message(exc, args.home)  # None: a bug, shown with its traceback
        if write and not isinstance(exc, RunRefused):  # a refusal leaves the run as it was
            try:
                queries.update_run(db, run["id"], status="failed", ended_at=queries.now(),
                                   error=message or f"{type(exc).__name__}: {exc}")
            except sqlite3.Error:
                pass  # the registry is what failed (a full disk): the launcher records the end when it can
        if message:
            print(f"error: {message}", flush=True)  # the user's problem to fix, not a bug: no traceback
        else:
            traceback.print_exc()
        return 1
    finally:
        if lock is not None:
            lock.release()
        teardown()


def user_message(exc: BaseException, home: Path) -> str | None:
    """One line for a failure the user fixes (a full disk, a read-only file, a refused start, a registry
    that cannot be written), in gptctl's words; None for anything else (a bug: its traceback helps)."""
    from gptctl.paths import registry_path
    from gptctl.registry import diagnose

    if isinstance(exc, (ckpt.CheckpointWriteError, UserError)):
        return str(exc)
    if isinstance(exc, sqlite3.Error):
        return diagnose.explain(exc, registry_path(home))
    if isinstance(exc, OSError) and exc.errno in diagnose.FIXABLE_ERRNOS:
        return diagnose.explain_file_error(exc, registry_path(home))
    return None


def _train(home: Path, db, run, settings: TrainSettings, d, init_checkpoint, stop: StopFlag, write: bool) -> int:
    """The run's start chosen (its newest good checkpoint), the components that write the run's registry
    rows and files built, the Trainer built from them, trained; the run's outcome recorded after."""
    run_dir = Path(run["run_dir"])
    if init_checkpoint is None and run.get("parent_kind") == "state":
        init_checkpoint = run["parent_checkpoint"]  # a --resume start, again, until the run saved its own
    start = choose_start(db, run["id"], init_checkpoint, d, settings)
    state = (start.state if start.state is not None else files.load(Path(start.path))) if start.path else None
    start_step = int(state["step"]) if state is not None else 0
    if start_step >= settings.max_steps:
        message = f"the run is already at step {start_step}; raise --max-steps above it to continue"
        if write:  # the launcher reports a run whose workers recorded no outcome as failed: say why
            queries.update_run(db, run["id"], error=message)
        raise RunRefused(message)

    # A first start counts from the launcher's start; a start by torchrun after a failure from its own.
    restarted = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) > 0
    clock = LaunchClock(started=STARTED if restarted else float(os.environ.get(LAUNCH_STARTED_ENV) or STARTED))
    deadline, deadline_margin = worker_deadline()
    memory = lambda: peak_memory(d.device)  # noqa: E731
    launch = LaunchLog(db, run["id"], clock, d.world_size, memory, write)
    metrics = RegistryMetrics(db, run["id"], write, ExternalLoggers(settings, run, run_dir, start_step, write), launch)
    log_dir = settings.log_dir or run_dir
    if write:
        log_dir.mkdir(parents=True, exist_ok=True)
    progress = TrainingProgress(start_step, settings.max_steps, log_dir / LOG_NAME, write, settings.log_level,
                                memory=memory, muon_lr_scale=muon_lr_scale(settings) if settings.optimizer == "muon" else None)
    trainer = None
    try:
        checkpointer = ckpt.CheckpointManager(
            lambda: open_registry(home, check_home=False), run["id"], run_dir / "checkpoints", settings, write,
            copy_state=d.device.type != "cuda", note=progress.note)  # from CUDA, full_state is a CPU copy
        trainer = Trainer(settings, d, stop=stop, run_dir=run_dir, checkpointer=checkpointer, metrics=metrics,
                          progress=progress, clock=clock, deadline=deadline, deadline_margin=deadline_margin)
        if state is not None:
            trainer.load_state_dict(state)
        elif settings.pretrained_checkpoint:  # a finetune's first start: the parent's weights only, the file
            # the registry records in this home (a copied home reads its own copy, not the original's)
            parent = run["parent_checkpoint"] if run.get("parent_kind") == "weights" else settings.pretrained_checkpoint
            trainer.load_weights(files.load(Path(parent), mmap=True)["model"])
        if write:
            queries.delete_metrics_after(db, run["id"], start_step)
            queries.update_run(db, run["id"], status="running", started_at=run["started_at"] or queries.now(),
                               world_size=d.world_size, device=d.device.type, device_name=trainer.device_name,
                               dtype=str(trainer.dtype).removeprefix("torch."), pid=os.getpid(),
                               host=socket.gethostname(), max_steps=settings.max_steps, ended_at=None, error=None)
            if metrics.mirrors.wandb_id:
                queries.update_run(db, run["id"], wandb_run_id=metrics.mirrors.wandb_id)
        launch.open(start_step, "crash" if restarted else "kill", clock.started)  # rows open: starts that died
        progress.message(
            f"run {run['id']} ({run['name']}): {trainer.raw_model.num_params() / 1e6:.2f}M parameters on "
            f"{d.world_size}×{trainer.device_name}, {trainer.dtype}, {trainer.accumulation} micro-steps of "
            f"{settings.batch_size}×{settings.seq_len} per step"
            + (f", resuming from step {start_step}" if start_step else "")
            + (f" ({start.skipped})" if start.skipped else "")
        )
        try:
            result = trainer.train()
        finally:  # also when an eval fails: the last checkpoint is durable and registered before the run ends
            checkpointer.wait()
    except BaseException:
        launch.close("crash", **({"last_step": trainer.state.step} if trainer is not None else {}))
        raise
    finally:
        metrics.close()
        progress.close()
    launch.close("diverged" if result.diverged else result.stopped_by or "completed", last_step=result.step)
    if write:
        tokens_per_s, peak = result.tokens_per_s, trainer.peak_flops
        status = "diverged" if result.diverged else "interrupted" if result.interrupted else "completed"
        divergence = _divergence_line(db, run["id"], result.diverged)
        queries.update_run(db, run["id"], status=status, last_step=result.step, ended_at=queries.now(),
                           tokens_per_s=tokens_per_s, error=divergence,
                           mfu=(trainer.flops_per_token * tokens_per_s / peak) if (peak and tokens_per_s) else None)
        outcome = (f"stopped at step {result.step} before the deadline, checkpoint saved" if result.stopped_by == "deadline"
                   else f"stopped at step {result.step}, checkpoint saved" if result.interrupted
                   else f"error: {divergence}" if result.diverged
                   else f"run {run['id']} completed at step {result.step}")
        print(outcome, flush=True)
        try:  # the log's last line says how the launch ended (`gptctl runs logs`)
            with open(log_dir / LOG_NAME, "a") as log:
                log.write(outcome + "\n")
        except OSError:
            pass
    # A diverged run exits 0 for torchrun, which would otherwise restart it into the same divergence;
    # the launcher reads the status from the registry.
    return stopped_exit_code(stop) if result.interrupted else 0


def _divergence_line(db, run_id: str, why: str | None) -> str | None:
    """One line: what happened and which checkpoint is the last good one."""
    if why is None:
        return None
    good = store.newest_good(db, run_id, lambda message: None, healthy=True)
    last = f"; the last good checkpoint is step {good['step']} ({good['path']})" if good else ""
    return f"the run diverged: {why}{last}"


def stopped_exit_code(stop: StopFlag) -> int:
    """Under gptctl's launcher a clean stop is a success for torchrun, which then neither restarts the
    workers nor reports them failed; the launcher and the registry say the run was interrupted (128+signal).
    Under a bare torchrun, the signal's exit code; but 0 for a `runs stop` request, which torchrun
    does not know of: a failure exit would make it restart the workers (--max-restarts) into the run."""
    if os.environ.get(LAUNCHED_ENV) or not stop.signum or stop.by_request:
        return 0
    return 128 + stop.signum


if __name__ == "__main__":
    sys.exit(main())
