"""Entry point of every torchrun worker: `python -m gptctl.engine.worker --home H --run-id ID`.

A worker always continues its run from the newest verified checkpoint if one exists, so a
resumed run and a worker restarted by torchrun take the same path. Only global rank 0 writes
the registry and checkpoint files (it alone receives gathered full state; under c10d it may sit on any
node, which is why the home must be shared).
"""

import argparse
import os
import random
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import NamedTuple

from gptctl.engine.startup import StopFlag, pin_thread_pools
from gptctl.launch import LAUNCHED_ENV, die_with_parent

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

import numpy as np
import torch

from gptctl.engine import checkpoint as ckpt
from gptctl.engine import parallel
from gptctl.engine.distributed import autocast_for, broadcast_object, resolve_dtype, setup, share_run, teardown
from gptctl.data import dolly
from gptctl.engine.loader import BatchLoader, TokenStream
from gptctl.engine.sft import InstructionBatchLoader
from gptctl.engine.loggers import ExternalLoggers
from gptctl.engine.loop import LoopConfig, train
from gptctl.engine.model import GPT, GPTConfig
from gptctl.engine.optim import Schedule, make_optimizer
from gptctl.engine.progress import TrainingProgress
from gptctl.errors import UserError
from gptctl.registry import files, open_registry, queries
from gptctl.registry.locks import DirectoryLock
from gptctl.settings import TrainSettings

METRICS_FLUSH_SECONDS = 5.0


class RunRefused(UserError):
    """This worker may not train the run (another trainer holds it, or it is already done): change nothing."""


def rng_state() -> dict:
    # Plain containers and tensors only, so the checkpoint loads with weights_only=True.
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MetricsSink:
    """Buffers per-step metrics and writes them in one transaction every few seconds."""

    def __init__(self, db, run_id: str, enabled: bool):
        self.db, self.run_id, self.enabled = db, run_id, enabled
        self.buffer: list[dict] = []
        self.last_flush = time.monotonic()

    def __call__(self, row: dict) -> None:
        if not self.enabled:
            return
        self.buffer.append(row)
        if time.monotonic() - self.last_flush > METRICS_FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.enabled and self.buffer:
            queries.write_metrics(self.db, self.run_id, self.buffer)
            queries.update_run(self.db, self.run_id, last_step=self.buffer[-1]["step"])  # progress for `runs list`
        self.buffer = []
        self.last_flush = time.monotonic()


class Start(NamedTuple):
    path: str | None  # the file every rank loads; None: a fresh start
    state: dict | None  # the main rank's loaded copy of it (other ranks load it themselves)
    skipped: str  # newer checkpoints that were not used, and why: "step 18 is corrupt"


def choose_start(db, run_id: str, init_checkpoint: str | None, d) -> Start:
    """The main rank picks the checkpoint to start from and loads it: a registered file that fails its
    sha256 or does not load as plain data is marked corrupt, and the previous verified one is tried.
    Only then is the choice broadcast, so every rank loads the same good file, or fails alike."""
    path = error = state = None
    skipped = ""
    if d.is_main:
        def warn(message: str) -> None:
            print(f"warning: {message}", flush=True)

        # e.g. a file saved but not registered before a kill; this worker's launcher holds the run
        files.reconcile(db, queries.get_run(db, run_id), inspect=ckpt.stored_step, by_trainer=True)
        while (row := files.newest_verified_checkpoint(db, run_id, warn)) is not None:
            try:
                state = ckpt.load(Path(row["path"]))
                break
            except (ckpt.UnsafeCheckpoint, OSError) as exc:
                queries.mark_checkpoint(db, row["id"], "corrupt", only_if="valid", sha256=row["sha256"])
                warn(f"checkpoint step {row['step']} does not load ({exc}); marked corrupt, trying the previous one")
        bad = queries.checkpoints_of(db, run_id, states=["missing", "corrupt"])
        if row is None and bad:
            # Starting over from step 0 would silently throw the run's progress away.
            error = (f"all {len(bad)} checkpoint(s) of run {run_id} are missing or corrupt "
                     "(`gptctl ckpt verify --run RUN`); start a new run from a good file with --resume --checkpoint-path")
        elif row is None and init_checkpoint:
            try:
                state = ckpt.load(Path(init_checkpoint))
            except (ckpt.UnsafeCheckpoint, OSError) as exc:
                error = f"--checkpoint-path: {exc}"
        path = row["path"] if row else init_checkpoint
        skipped = "; ".join(f"step {c['step']} is {c['state']}" for c in reversed(bad) if row and c["step"] > row["step"])
    path, error, skipped = broadcast_object((path, error, skipped))  # no rank may wait in a collective for a dead one
    if error:
        raise UserError(error)
    return Start(path, state if d.is_main else None, skipped)


def make_loaders(settings: TrainSettings, run_dir: Path, accumulation: int, d):
    """Train and val batches: token shards for pretraining, masked instruction examples for finetuning."""
    common = (settings.batch_size, settings.seq_len)
    if settings.kind == "finetune":
        data = dolly.load(run_dir)
        return (InstructionBatchLoader(data.train, *common, accumulation, d.rank, d.world_size, d.device, settings.seed),
                InstructionBatchLoader(data.val, *common, settings.eval_steps, d.rank, d.world_size, d.device,
                                       settings.seed, shuffle=False))
    return (BatchLoader(TokenStream(settings.data_root, "train"), *common, accumulation, d.rank, d.world_size, d.device,
                        settings.num_workers, settings.seq_len_at),
            BatchLoader(TokenStream(settings.data_root, "val"), *common, settings.eval_steps, d.rank, d.world_size, d.device))


def pin_numerics(settings: TrainSettings) -> None:
    """The same inputs give the same bits. Always: a fixed number of threads (torch.set_num_threads also
    turns MKL's dynamic thread choice off). With --deterministic, also deterministic algorithms only;
    cuBLAS reads its workspace setting when CUDA creates its handle, so this runs before that."""
    torch.set_num_threads(torch.get_num_threads())
    if settings.deterministic:
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = ":4096:8"
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", type=Path, required=True)
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--run-id", help="The run to train (node 0).")
    target.add_argument("--settings", help="Settings JSON, on nodes other than node 0: the run comes from node 0.")
    parser.add_argument("--init-checkpoint", default=None)
    args = parser.parse_args(argv)
    die_with_parent()

    stop = STOP
    stop.install()
    db = run = None
    if args.run_id:
        db = open_registry(args.home)
        run = queries.get_run(db, args.run_id)
    settings = TrainSettings.model_validate_json(run["settings"] if run else args.settings)
    pin_numerics(settings)  # before CUDA starts (setup)
    d = setup(settings.device)
    run = share_run(d, run)  # every node trains the run node 0 created
    if run is not None and d.is_main and db is None:  # rank 0 landed on another node: the home is shared
        db = open_registry(args.home)
    if run is None:
        print("error: no node has the run; start node 0 (--node-rank 0) through gptctl, which creates it", flush=True)
        return 2
    settings = TrainSettings.model_validate_json(run["settings"])  # node 0's settings win over a follower's own
    pin_numerics(settings)  # node 0's --deterministic, before the first cuBLAS call
    write = d.is_main
    lock = None
    try:
        if write and not os.environ.get(LAUNCHED_ENV):  # a bare torchrun: nobody holds the run for us
            lock = DirectoryLock(Path(run["run_dir"]))
            if not lock.acquire():
                raise RunRefused(f"run {run['id']} is being trained by another process")
        return _train(args.home, db, run, settings, d, args.init_checkpoint, stop, write)
    except Exception as exc:
        if write and not isinstance(exc, RunRefused):  # a refusal leaves the run as it was
            queries.update_run(db, run["id"], status="failed", ended_at=queries.now(), error=f"{type(exc).__name__}: {exc}")
        if isinstance(exc, (ckpt.CheckpointWriteError, UserError)):
            print(f"error: {exc}", flush=True)  # the user's problem to fix, not a bug: no traceback
        else:
            traceback.print_exc()
        return 1
    finally:
        if lock is not None:
            lock.release()
        teardown()


def _train(home: Path, db, run, settings: TrainSettings, d, init_checkpoint, stop: StopFlag, write: bool) -> int:
    run_dir = Path(run["run_dir"])
    accumulation = settings.resolved_accumulation(d.world_size)
    dtype = resolve_dtype(settings.dtype, d.device)
    if d.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    torch.manual_seed(settings.seed)
    random.seed(settings.seed)
    np.random.seed(settings.seed)
    raw_model = GPT(GPTConfig.from_shape(settings.shape), settings.activation_checkpointing).to(d.device)
    if settings.model_parallel:
        parallel.shard(raw_model, d, settings.mesh_shape(d.world_size))
    optimizer = make_optimizer(raw_model, settings.weight_decay, settings.max_lr, d.device.type)
    scaler = torch.amp.GradScaler(d.device.type, enabled=dtype == torch.float16)

    start_step, history = 0, []
    start = choose_start(db, run["id"], init_checkpoint, d)
    if start.path is None and settings.pretrained_checkpoint:
        # A finetune's first start: the parent's weights, but a fresh optimizer, schedule and step count.
        parallel.load_full_state(raw_model, None, ckpt.load(Path(settings.pretrained_checkpoint))["model"])
    if start.path:
        state = start.state if start.state is not None else ckpt.load(Path(start.path))
        parallel.load_full_state(raw_model, optimizer, state["model"], state["optimizer"])
        if "scaler" in state:
            scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        start_step = int(state["step"])
        history = [m for m in state.get("metrics", []) if m["step"] <= start_step]
    if start_step >= settings.max_steps:
        message = f"the run is already at step {start_step}; raise --max-steps above it to continue"
        if write:  # the launcher reports a run whose workers recorded no outcome as failed: say why
            queries.update_run(db, run["id"], error=message)
        raise RunRefused(message)

    model = parallel.wrap(raw_model, d, settings.model_parallel, settings.compile)

    train_loader, val_loader = make_loaders(settings, run_dir, accumulation, d)

    device_name = torch.cuda.get_device_name(d.device) if d.device.type == "cuda" else d.device.type
    flops_per_token, peak = _flops(settings, device_name, dtype, d.world_size)
    if write:
        queries.delete_metrics_after(db, run["id"], start_step)
        queries.update_run(db, run["id"], status="running", started_at=run["started_at"] or queries.now(),
                           world_size=d.world_size, device=d.device.type, device_name=device_name,
                           dtype=str(dtype).removeprefix("torch."), pid=os.getpid(), host=socket.gethostname(),
                           max_steps=settings.max_steps, ended_at=None, error=None)
    sink = MetricsSink(db, run["id"], write)
    log_dir = settings.log_dir or run_dir
    if write:
        log_dir.mkdir(parents=True, exist_ok=True)
    progress = TrainingProgress(start_step, settings.max_steps, log_dir / "train.log", write,
                                 settings.log_level)
    progress.message(
        f"run {run['id']} ({run['name']}): {raw_model.num_params() / 1e6:.2f}M parameters on {d.world_size}×{device_name}, "
        f"{dtype}, {accumulation} micro-steps of {settings.batch_size}×{settings.seq_len} per step"
        + (f", resuming from step {start_step}" if start_step else "")
        + (f" ({start.skipped})" if start.skipped else "")

    )
    checkpoints = ckpt.CheckpointManager(lambda: open_registry(home), run["id"], run_dir / "checkpoints",
                                         settings.keep_last_n_checkpoints, set(settings.permanent_checkpoints), write,
                                         asynchronous=settings.async_checkpoint,
                                         copy_state=d.device.type != "cuda")  # from CUDA, full_state is a CPU copy

    loggers = ExternalLoggers(settings, run, run_dir, start_step, write)
    if write and loggers.wandb_id:
        queries.update_run(db, run["id"], wandb_run_id=loggers.wandb_id)

    def on_metrics(row: dict) -> None:
        history.append(row)
        sink(row)
        loggers.log(row["step"], row)

    def on_gradients(step: int, rows: list[dict]) -> None:
        if write:
            queries.write_gradient_stats(db, run["id"], step, rows)
        loggers.log(step, {r["name"]: r["grad_norm"] for r in rows}, prefix="grad_norm")
        loggers.log(step, {r["name"]: r["update_ratio"] for r in rows}, prefix="update_ratio")

    def state_fn(step: int) -> dict:
        sink.flush()  # metrics reach the registry before the checkpoint that contains them
        model_state, optimizer_state = parallel.full_state(raw_model, optimizer)  # collective with sharding
        state = {"model": model_state, "optimizer": optimizer_state, "step": step,
                 "settings": settings.model_dump(mode="json"), "rng": rng_state(), "metrics": list(history)}
        if scaler.is_enabled():
            state["scaler"] = scaler.state_dict()
        return state

    cfg = LoopConfig(
        max_steps=settings.max_steps, accumulation=accumulation, tokens_per_step=settings.tokens_per_step(d.world_size),
        schedule=Schedule(settings.lr_scheduler, settings.max_lr, settings.final_lr, settings.warmup_steps,
                          settings.max_steps, settings.lr_restarts),
        grad_clip=settings.grad_clip, eval_interval=settings.eval_interval,
        eval_steps=settings.eval_steps, checkpoint_interval=settings.checkpoint_interval,
        permanent_steps=frozenset(settings.permanent_checkpoints),
        flops_per_token=flops_per_token, peak_flops=peak, log_gradients=settings.log_gradients,
        timing=settings.log_level == "debug",
    )
    evals = {}
    if settings.hellaswag_interval:
        evals["hellaswag_acc"] = (settings.hellaswag_interval, hellaswag_eval(settings, raw_model, d, dtype))
    try:
        result = train(model, raw_model, optimizer, scaler, train_loader, val_loader, cfg, d, start_step, dtype,
                       checkpoints, state_fn, on_metrics, progress, stop, evals, on_gradients)
        checkpoints.wait()  # the last checkpoint is durable and registered before the run says it ended
    finally:
        sink.flush()
        progress.close()
        loggers.close()
    if write:
        status = "interrupted" if result.interrupted else "completed"
        queries.update_run(db, run["id"], status=status, last_step=result.last_step, ended_at=queries.now(),
                           tokens_per_s=result.tokens_per_s,
                           mfu=(flops_per_token * result.tokens_per_s / peak) if (peak and result.tokens_per_s) else None)
        print(f"stopped at step {result.last_step}, checkpoint saved" if result.interrupted
              else f"run {run['id']} completed at step {result.last_step}", flush=True)
    return stopped_exit_code(stop) if result.interrupted else 0


def stopped_exit_code(stop: StopFlag) -> int:
    """Under gptctl's launcher a clean stop is a success for torchrun, which then neither restarts the
    workers nor reports them failed; the launcher and the registry say the run was interrupted (128+signal).
    Under a bare torchrun, the signal's exit code."""
    if os.environ.get(LAUNCHED_ENV) or not stop.signum:
        return 0
    return 128 + stop.signum


def hellaswag_eval(settings: TrainSettings, raw_model, d, dtype):
    """HellaSwag accuracy of the model as it trains, items spread over the ranks."""
    from gptctl.data import hellaswag
    from gptctl.data.tokenizer import get_encoding
    from gptctl.engine.evaluate import hellaswag_accuracy

    path = settings.hellaswag_file
    if path is None:  # one download, by the main rank, into the shared cache
        path = Path(broadcast_object(str(hellaswag.fetch_val_file()) if d.is_main else None))
    items = hellaswag.encode(hellaswag.read_items(path), get_encoding())
    # A sharded model's forward passes are collective, so every rank must score the same items
    # (the counts summed over ranks then cancel out in the accuracy).
    rank, world = (0, 1) if settings.model_parallel else (d.rank, d.world_size)
    return lambda: hellaswag_accuracy(raw_model, items, d.device, autocast_for(d.device, dtype), rank, world).accuracy


def _flops(settings: TrainSettings, device_name: str, dtype: torch.dtype, world_size: int):
    """FLOPs per token and the peak FLOP/s of all processes, for MFU; (x, None) where the GPU is unknown."""
    from gptctl.estimate import flops_per_token
    from gptctl.gpus import match_gpu, peak_flops

    fpt = flops_per_token(settings.shape, settings.seq_len)
    key = match_gpu(device_name)
    if key is None:
        return fpt, None
    try:
        return fpt, peak_flops(key, str(dtype).removeprefix("torch.")) * world_size
    except UserError:  # e.g. bf16 on a GPU the table says lacks it: no MFU rather than no training
        return fpt, None


if __name__ == "__main__":
    sys.exit(main())
