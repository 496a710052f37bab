"""The Trainer: a run's model, optimizer, data, checkpointer, metrics and evals as attributes, and the loop.

Built from settings and the components passed to it (torchtitan's Trainer), so tests drive it in-process
on a tiny model; the worker passes the components that write the registry and the run directory. What the loop carries
from one step to the next is one explicit block, `LoopState` (nanochat). The loop never knows where a
checkpoint lives or where metrics go: it calls `checkpointer.save(step, self.state_dict)` and
`metrics.log(row)`.
"""

import math
import os
import random
import resource
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from gptctl.deadline import DEFAULT_MARGIN
from gptctl.engine import parallel
from gptctl.engine.distributed import Dist, all_reduce_sum, autocast_for, resolve_dtype
from gptctl.engine.evaluate import mean_loss
from gptctl.engine.health import Health
from gptctl.engine.model import GPT
from gptctl.engine.optim import lr_scale, make_optimizers
from gptctl.engine.progress import TrainingProgress
from gptctl.engine.startup import StopFlag
from gptctl.errors import UserError
from gptctl.settings import TrainSettings


@dataclass
class LoopState:
    """Everything the loop carries from step to step; a checkpoint restores it."""

    step: int = 0  # the last finished optimizer step
    history: list[dict] = field(default_factory=list)  # every metrics row up to `step`; checkpoints carry it
    data_offset: int = 0  # step N reads the batches of position N + data_offset: rollbacks skip data this way
    rollbacks: int = 0  # rollbacks made so far (checkpoints carry it: --max-rollbacks bounds the run, not a launch)
    speeds: list[float] = field(default_factory=list)  # tokens/s of this launch's steps after its first
    interrupted: bool = False  # a stop request ended the loop (after saving the step it finished)
    stopped_by: str | None = None  # why: "signal" or "deadline"
    diverged: str | None = None  # why the run stopped diverged (no rollback left): a sentence
    rolled_back_to: int | None = None  # the step this launch last rolled back to

    @property
    def tokens_per_s(self) -> float | None:
        return sum(self.speeds) / len(self.speeds) if self.speeds else None


@dataclass
class LaunchClock:
    """Where this start of the workers spends its time. Not in checkpoints: it belongs to one launch (the
    registry's launches rows: goodput), and it tells the loop how close to a deadline it may go."""

    started: float = field(default_factory=time.time)  # when the launch began (wall clock)
    first_step_at: float | None = None  # when its first step began: start-up is the time before
    steps: int = 0  # steps trained, including ones a rollback later trains again
    step_s: float = 0.0  # forward, backward and update
    eval_s: float = 0.0
    save_s: float = 0.0  # the loop's wait for saves (with asynchronous saves, the copy to CPU memory)
    saves: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=20))  # seconds of the last steps with their evals

    @property
    def startup_s(self) -> float | None:
        return None if self.first_step_at is None else max(self.first_step_at - self.started, 0.0)

    def totals(self) -> dict:
        return {"steps": self.steps, "step_s": self.step_s, "eval_s": self.eval_s, "save_s": self.save_s,
                "saves": self.saves}


# Until a save has been timed, one is assumed to write its state at this rate (bytes/s): slow for a
# local NVMe disk, about right for a busy network filesystem.
ASSUMED_SAVE_RATE = 100e6


class Metrics:
    """Where metrics rows go. This one keeps nothing (the loop's own history is in LoopState); the
    worker's RegistryMetrics writes the registry and mirrors to W&B and TensorBoard."""

    def log(self, row: dict) -> None:
        pass

    def gradients(self, step: int, rows: list[dict]) -> None:
        pass

    def event(self, step: int, kind: str, detail: str) -> None:
        """skipped (a non-finite step), spike, rollback, diverged."""

    def rewind(self, step: int, reached: int) -> None:
        """A rollback from step `reached` to `step`: rows after `step` will be trained again."""

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass


class NoCheckpoints:
    """A checkpointer that saves nothing: for benchmarks and tests that time or inspect the loop alone."""

    failed = False

    def save(self, step: int, make_state: Callable[[], dict]) -> None:
        pass

    def wait(self) -> None:
        pass

    def raise_failure(self) -> None:
        raise AssertionError("NoCheckpoints never fails")

    def newest_healthy(self, distrust: int | None) -> dict | None:
        return None  # nothing to roll back to: a divergence stops the run

    write_seconds: float | None = None  # how long the last save took to write: nothing to write
    busy = False  # no save in flight


def peak_memory(device: torch.device) -> int:
    """Bytes at the peak so far: CUDA memory allocated by this process on GPU, its resident memory on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # Linux counts kilobytes


class Trainer:
    """The components are passed in, each built before the Trainer from what it needs (the worker's write
    the registry and the run directory); left out, each is one that keeps nothing, so that tests and
    benchmarks build a bare Trainer(settings, d). A checkpointer has NoCheckpoints' interface (save, wait,
    raise_failure, newest_healthy, failed, busy, write_seconds); engine/checkpoint.CheckpointManager is the real one."""

    def __init__(self, settings: TrainSettings, d: Dist, *, stop: StopFlag | None = None,
                 run_dir: Path | None = None, loaders: tuple | None = None, checkpointer=None,
                 metrics: Metrics | None = None, progress: TrainingProgress | None = None,
                 clock: LaunchClock | None = None, deadline: float | None = None,
                 deadline_margin: float = DEFAULT_MARGIN):
        self.settings, self.d = settings, d
        self.stop = stop or StopFlag()
        self.accumulation = settings.resolved_accumulation(d.world_size)
        self.tokens_per_step = settings.tokens_per_step(d.world_size)
        self.dtype = resolve_dtype(settings.dtype, d.device)
        self.autocast = autocast_for(d.device, self.dtype)
        if d.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True

        torch.manual_seed(settings.seed)
        random.seed(settings.seed)
        np.random.seed(settings.seed)
        self.raw_model = GPT(settings.shape, settings.activation_checkpointing).to(d.device)
        if settings.model_parallel:
            parallel.shard(self.raw_model, d, settings.mesh_shape(d.world_size))
        self.optimizers = make_optimizers(self.raw_model, settings, d.device.type)
        self.scaler = torch.amp.GradScaler(d.device.type, enabled=self.dtype == torch.float16)
        self.schedule = settings.schedule()
        # The module the loop calls: compiled and/or DDP-wrapped. Loading a state later copies into the
        # same parameters, so wrapping first changes nothing.
        self.model = parallel.wrap(self.raw_model, d, settings.model_parallel, settings.compile)
        self.train_loader, self.val_loader = loaders or make_loaders(settings, run_dir, self.accumulation, d)
        # name -> (interval, fn): evaluations besides the val loss, e.g. HellaSwag accuracy
        self.evals: dict[str, tuple[int, Callable[[], float]]] = {}
        if settings.hellaswag_interval:
            self.evals["hellaswag_acc"] = (settings.hellaswag_interval, hellaswag_eval(self))
        self.checkpointer = checkpointer or NoCheckpoints()
        self.metrics = metrics or Metrics()
        self.progress = progress or TrainingProgress(0, settings.max_steps, None, enabled=False)
        self.timer = PhaseTimer(settings.log_level == "debug", d.device)
        self.flops_per_token, self.peak_flops = _flops(settings, self.device_name, self.dtype, d.world_size)
        self.health = Health(settings.spike_factor, settings.nonfinite_streak)
        self.state = LoopState()
        self.clock = clock or LaunchClock()
        self.deadline = deadline  # wall-clock time by which the run must have stopped and saved (None: none)
        self.deadline_margin = deadline_margin  # seconds kept free before it, besides one step and one save
        self.poisoned = _test_spike_positions()

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(self.d.device) if self.d.device.type == "cuda" else self.d.device.type

    def peak_memory(self) -> int:
        return peak_memory(self.d.device)

    def deadline_near(self) -> bool:
        """Whether one more step, its evals and a save would end past the deadline (less the margin). The
        step is the slowest of the last few; the save as long as the last one took to write, or, before
        any, the state's size at ASSUMED_SAVE_RATE (twice that while a background save is still writing). Judged by the main rank alone, which times the saves:
        the ranks' votes are summed, so one judge is enough and they cannot disagree."""
        if self.deadline is None or not self.d.is_main:
            return False
        step = max(self.clock.recent, default=0.0)
        save = self.checkpointer.write_seconds
        if save is None:
            save = 3 * 4 * self.raw_model.num_params() / ASSUMED_SAVE_RATE  # fp32 weights and two AdamW moments
        if self.checkpointer.busy:
            save *= 2  # the last save must finish writing before the final one starts
        return time.time() + step + save + self.deadline_margin >= self.deadline

    # -- state ------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The checkpoint's contents: full, name-keyed state (collective under sharding: every rank calls it)."""
        model_state, optimizer_state = parallel.full_state(self.raw_model, self.optimizers)
        state = {"model": model_state, "optimizer": optimizer_state, "step": self.state.step,
                 "settings": self.settings.model_dump(mode="json"), "rng": rng_state(),
                 "metrics": [dict(r) for r in self.state.history],  # rows the loop may still add evals to
                 "loop": {"data_offset": self.state.data_offset, "rollbacks": self.state.rollbacks,
                          "health": self.health.state_dict()}}
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        parallel.load_full_state(self.raw_model, self.optimizers, state["model"], state["optimizer"])
        if "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"])
        step = int(state["step"])
        loop = state.get("loop", {})  # absent from checkpoints written before rollbacks existed
        self.state = LoopState(step=step, history=[m for m in state.get("metrics", []) if m["step"] <= step],
                               data_offset=int(loop.get("data_offset", 0)), rollbacks=int(loop.get("rollbacks", 0)))
        self.health = Health(self.settings.spike_factor, self.settings.nonfinite_streak)
        self.health.load_state_dict(loop.get("health", {}))

    def load_weights(self, model_state: dict) -> None:
        """Weights only (a finetune's parent): the optimizer, schedule and step count start fresh."""
        parallel.load_full_state(self.raw_model, None, model_state)

    # -- the loop ---------------------------------------------------------------------------------
    def train(self) -> LoopState:
        """Train from the state's step to --max-steps, or until a stop request (the finished step is saved)
        or a divergence with no rollback left. A step is saved after its evals, so that its checkpoint
        carries them (the last step's val loss too); an eval that fails never costs the checkpoint."""
        first = self.state.step + 1
        if self.clock.first_step_at is None:
            self.clock.first_step_at = time.time()
        while self.state.step < self.settings.max_steps and not self.state.interrupted:
            began = time.perf_counter()
            row, stop_now = self.train_step()
            if self.state.step > first:  # the launch's first step pays for warm-up and compilation
                self.state.speeds.append(row["tokens_per_s"])
            why = self.health.observe(row["loss"], not row.get("skipped"))
            if row.get("skipped"):
                self.metrics.event(row["step"], "skipped", f"non-finite loss {row['loss']} or grad norm "
                                   f"{row['grad_norm']}: the update was skipped")
            if why is not None:
                if self.diverged(row["step"], why):
                    continue  # rolled back: the loop goes on from the restored step
                break
            saving = bool(stop_now) or self.should_save(self.state.step)  # the last step always is
            self.state.history.append(row)
            evals = time.perf_counter()
            with self.timer("eval"):
                self.evaluate_before_saving(row, saving)
            self.clock.eval_s += time.perf_counter() - evals
            self.clock.recent.append(time.perf_counter() - began)
            self.metrics.log(row)
            self.progress.update(row)
            with self.timer("checkpoint"):
                if stop_now:
                    why = "the deadline is near, " if stop_now == "deadline" else ""
                    self.progress.message(f"step {self.state.step} finished: {why}saving its checkpoint before stopping")
                if saving:
                    self.save()
            if self.timer.enabled:
                self.progress.message(f"step {self.state.step} timing: {self.timer.report()}")
            self.state.interrupted, self.state.stopped_by = bool(stop_now), stop_now
        return self.state

    def diverged(self, step: int, why: str) -> bool:
        """The run diverged at `step`: roll back to the newest healthy checkpoint and skip the data that
        led here (True), or record why it stops (False). Every rank decides alike: `why` comes from
        all-reduced numbers."""
        kind = "diverged" if self.settings.on_divergence == "stop" else "spike" if "spiked" in why else "non-finite"
        self.metrics.event(step, kind, why)
        if self.settings.on_divergence == "rollback" and self.state.rollbacks < self.settings.max_rollbacks:
            state = self.checkpointer.newest_healthy(distrust=self.state.rolled_back_to)
            if state is not None:
                offset = self.state.data_offset + step - int(state["step"])
                rollbacks, target = self.state.rollbacks + 1, int(state["step"])
                self.load_state_dict(state)
                self.state.data_offset, self.state.rollbacks, self.state.rolled_back_to = offset, rollbacks, target
                self.metrics.rewind(target, reached=step)
                detail = (f"{why} at step {step}: rolled back to step {target}, skipping {step - target} steps of "
                          f"data (rollback {rollbacks} of at most {self.settings.max_rollbacks})")
                self.metrics.event(target, "rollback", detail)
                self.progress.message(detail)
                return True
        left = ("--on-divergence stop" if self.settings.on_divergence == "stop"
                else f"--max-rollbacks {self.settings.max_rollbacks} used" if self.state.rollbacks >= self.settings.max_rollbacks
                else "no healthy checkpoint to roll back to")
        self.state.diverged = f"{why} at step {step} ({left})"
        if self.settings.on_divergence == "rollback":
            self.metrics.event(step, "diverged", self.state.diverged)
        return False

    def train_step(self) -> tuple[dict, str | None]:
        """One optimizer step over `accumulation` micro-batches: the step's metrics row, and why the run
        stops after it: "signal" when any rank was asked to stop, "deadline" when one would otherwise end
        past the deadline, else None."""
        step = self.state.step + 1
        t0 = time.perf_counter()
        near_deadline = self.deadline_near()  # judged before the step: it must fit too
        lr = self.schedule.at(step)
        for optimizer in self.optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr * lr_scale(optimizer, group, self.settings)
            optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=self.d.device, dtype=torch.float32)
        position = step + self.state.data_offset  # which batches: a rollback skips the ones that led to it
        for micro in range(self.accumulation):
            with self.timer("data"):
                x, y = self.train_loader.batch(position, micro)
            last = micro == self.accumulation - 1
            with self.timer("forward/backward"), parallel.gradient_sync(self.model, self.raw_model, last):
                with self.autocast:
                    _, loss = self.model(x, y)
                loss = loss * self.train_loader.scale(position, micro)  # 1/accumulation unless batches differ in targets
                loss_sum += loss.detach()
                self.scaler.scale(loss).backward()
        if position in self.poisoned:
            loss_sum = loss_sum * 10  # GPTCTL_TEST_SPIKE_POSITIONS: a reported spike; the gradients are untouched
        with self.timer("optimizer"):
            for optimizer in self.optimizers:
                self.scaler.unscale_(optimizer)
            clip = self.settings.grad_clip if self.settings.grad_clip > 0 else float("inf")
            grad_norm = parallel.scalar(torch.nn.utils.clip_grad_norm_(self.raw_model.parameters(), clip))
        # One all-reduce carries the loss, whether any rank was asked to stop or is near the deadline (clocks
        # differ a little), and whether a background checkpoint save failed (so that every rank stops, not only the writer); one read brings it and
        # the grad norm to the host: the step's only host-device sync. The flags are filled on the device
        # (torch.tensor of host values would copy, and wait, on CUDA). It comes before the update, so
        # that a non-finite step never reaches the weights.
        packed = torch.stack([loss_sum, loss_sum.new_full((), float(self.stop.asked())),
                              loss_sum.new_full((), float(near_deadline)),
                              loss_sum.new_full((), float(self.checkpointer.failed))])
        all_reduce_sum(packed)
        loss_total, stop_votes, deadline_votes, save_failures, grad_norm = torch.cat(
            [packed, grad_norm.float().reshape(1)]).tolist()
        if save_failures:
            self.checkpointer.raise_failure()
        loss_value = loss_total / self.d.world_size
        # Under float16 an infinite gradient is the GradScaler's business (it skips and lowers the scale).
        finite = math.isfinite(loss_value) and (math.isfinite(grad_norm) or self.scaler.is_enabled())
        with self.timer("optimizer"):
            if finite:
                self._step_optimizer(step)
            else:
                self.scaler.update()  # forget this step's unscale; the gradients are dropped at the next zero_grad
        self.state.step = step
        elapsed = time.perf_counter() - t0
        self.clock.steps, self.clock.step_s = self.clock.steps + 1, self.clock.step_s + elapsed
        tokens_per_s = self.tokens_per_step / elapsed
        row = {
            "step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s, "tokens_seen": step * self.tokens_per_step, "time": time.time(),
            "mfu": (self.flops_per_token * tokens_per_s / self.peak_flops) if self.peak_flops else None,
        }
        if not finite:
            row["skipped"] = True
        return row, "signal" if stop_votes > 0 else "deadline" if deadline_votes > 0 else None

    def _step_optimizer(self, step: int) -> None:
        """The update (gradients unscaled and clipped); every --log-gradients steps also per-parameter norms
        and update ratios."""
        watch = self.settings.log_gradients and step % self.settings.log_gradients == 0
        before = gradient_norms(self.raw_model) if watch else None
        for optimizer in self.optimizers:
            self.scaler.step(optimizer)
        self.scaler.update()
        if watch:
            self.metrics.gradients(step, update_ratios(self.raw_model, before))

    def evaluate(self, row: dict) -> None:
        """Add the evals due at this row's step to it (every rank runs them: they are collective)."""
        step, last = row["step"], row["step"] == self.settings.max_steps
        if self.settings.is_eval_step(step, self.settings.max_steps):
            row["val_loss"] = mean_loss(self.model, self.val_loader, self.settings.eval_steps, self.autocast, self.d)
        for name, (interval, fn) in self.evals.items():
            if step % interval == 0 or last:
                row[name] = fn()

    def evaluate_before_saving(self, row: dict, saving: bool) -> None:
        """`evaluate(row)`; should it fail at a step that is to be saved, the step is saved first, without
        the evals (a run that trained for days never loses its last step to, say, an eval out of memory).
        The save is collective under sharding: it completes where the eval failed alike on every rank,
        as running out of memory on the same shapes does."""
        try:
            self.evaluate(row)
        except Exception:
            if saving:
                self.metrics.log(row)  # the registry has every row a checkpoint has
                self.save()
            raise

    def should_save(self, step: int) -> bool:
        return self.settings.is_save_step(step, self.settings.max_steps)

    def save(self) -> None:
        began = time.perf_counter()
        self.metrics.flush()  # metrics reach the registry before the checkpoint that contains them
        self.checkpointer.save(self.state.step, self.state_dict)
        self.clock.save_s, self.clock.saves = self.clock.save_s + time.perf_counter() - began, self.clock.saves + 1


def _test_spike_positions() -> frozenset[int]:
    """Test hook: GPTCTL_TEST_SPIKE_POSITIONS=7,8 reports ten times the loss of the steps that read the
    batches of those positions (as bad data would show; the weights are not changed by it)."""
    value = os.environ.get("GPTCTL_TEST_SPIKE_POSITIONS", "")
    return frozenset(int(p) for p in value.split(",") if p.strip())


def make_loaders(settings: TrainSettings, run_dir: Path | None, accumulation: int, d: Dist):
    """Train and val batches: token shards for pretraining, masked instruction examples for finetuning."""
    from gptctl.engine.loader import BatchLoader, TokenStream

    common = (settings.batch_size, settings.seq_len)
    if settings.kind == "finetune":
        from gptctl.data import dolly
        from gptctl.engine.sft import InstructionBatchLoader

        data = dolly.load(run_dir)
        return (InstructionBatchLoader(data.train, *common, accumulation, d.rank, d.world_size, d.device, settings.seed),
                InstructionBatchLoader(data.val, *common, settings.eval_steps, d.rank, d.world_size, d.device,
                                       settings.seed, shuffle=False))
    return (BatchLoader(TokenStream(settings.data_root, "train"), *common, accumulation, d.rank, d.world_size, d.device,
                        settings.num_workers, settings.seq_len_at),
            BatchLoader(TokenStream(settings.data_root, "val"), *common, settings.eval_steps, d.rank, d.world_size, d.device))


def hellaswag_eval(trainer: Trainer) -> Callable[[], float]:
    """HellaSwag accuracy of the model as it trains, items spread over the ranks."""
    from gptctl.data import hellaswag
    from gptctl.data.tokenizer import get_encoding
    from gptctl.engine.distributed import broadcast_object
    from gptctl.engine.evaluate import hellaswag_accuracy

    settings, d = trainer.settings, trainer.d
    path = settings.hellaswag_file
    if path is None:  # one download, by the main rank, into the shared cache
        path = Path(broadcast_object(str(hellaswag.fetch_val_file()) if d.is_main else None))
    items = hellaswag.encode(hellaswag.read_items(path), get_encoding())
    # A sharded model's forward passes are collective, so every rank must score the same items
    # (the counts summed over ranks then cancel out in the accuracy).
    rank, world = (0, 1) if settings.model_parallel else (d.rank, d.world_size)
    return lambda: hellaswag_accuracy(trainer.raw_model, items, d.device, trainer.autocast, rank, world).accuracy


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


class PhaseTimer:
    """Wall time per phase of a step, for --log-level debug. Disabled, it costs one branch per phase."""

    def __init__(self, enabled: bool, device: torch.device):
        self.enabled, self.device, self.times = enabled, device, {}

    @contextmanager
    def __call__(self, name: str):
        if not self.enabled:
            yield
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # otherwise the time lands in whichever phase syncs next
            self.times[name] = self.times.get(name, 0.0) + time.perf_counter() - t0

    def report(self) -> str:
        text = ", ".join(f"{name} {1000 * t:.1f} ms" for name, t in self.times.items())
        self.times = {}
        return text


@torch.no_grad()
def gradient_norms(raw_model) -> dict[str, tuple[float, torch.Tensor]]:
    """Per parameter: the (clipped) gradient norm and a copy of the weights before the update."""
    return {name: (float(parallel.scalar(p.grad.norm())), p.detach().clone())
            for name, p in raw_model.named_parameters() if p.grad is not None}


@torch.no_grad()
def update_ratios(raw_model, before: dict[str, tuple[float, torch.Tensor]]) -> list[dict]:
    """Rows of (name, grad_norm, update_ratio = |Δw| / |w|) after the optimizer step."""
    rows = []
    for name, p in raw_model.named_parameters():
        if name in before:
            grad_norm, old = before[name]
            weight = float(parallel.scalar(old.norm()))
            change = float(parallel.scalar((p.detach() - old).norm()))
            rows.append({"name": name, "grad_norm": grad_norm, "update_ratio": change / weight if weight else None})
    return rows
