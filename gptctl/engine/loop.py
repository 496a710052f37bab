"""The training loop: gradient accumulation, clipping, LR schedule, eval, metrics, checkpoints.

It knows nothing of files or the registry: it reports through `on_metrics` and `checkpoints.save`.
"""

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from gptctl.engine.distributed import Dist, all_reduce_sum, autocast_for
from gptctl.engine.parallel import gradient_sync, scalar
from gptctl.engine.optim import Schedule
from gptctl.engine.model import IGNORE_INDEX
from gptctl.engine.startup import StopFlag


@dataclass
class LoopConfig:
    max_steps: int
    accumulation: int
    tokens_per_step: int
    schedule: Schedule
    grad_clip: float
    eval_interval: int
    eval_steps: int
    checkpoint_interval: int
    permanent_steps: frozenset[int] = frozenset()  # saved whatever the interval: a permanent step is a promise
    flops_per_token: float | None = None
    peak_flops: float | None = None  # all processes together, for MFU
    log_gradients: int = 0  # every N steps: per-parameter gradient norms and update/weight ratios
    timing: bool = False  # per-phase wall times (synchronising the device: debug only)


@dataclass
class LoopResult:
    last_step: int
    interrupted: bool
    tokens_per_s: float | None


def train(model, raw_model, optimizer, scaler, train_loader, val_loader, cfg: LoopConfig, dist_: Dist,
          start_step: int, autocast_dtype: torch.dtype, checkpoints, state_fn: Callable[[int], dict],
          on_metrics: Callable[[dict], None], progress, stop: StopFlag,
          periodic_evals: dict[str, tuple[int, Callable[[], float]]] | None = None,
          on_gradients: Callable[[int, list[dict]], None] | None = None) -> LoopResult:
    """Train from `start_step` to cfg.max_steps. `periodic_evals` maps a metric name to (interval, fn)."""
    device = dist_.device
    phases = PhaseTimer(cfg.timing, device)
    autocast = autocast_for(device, autocast_dtype)
    speeds: list[float] = []
    step = start_step
    for step in range(start_step + 1, cfg.max_steps + 1):
        t0 = time.perf_counter()
        lr = cfg.schedule.at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        for micro in range(cfg.accumulation):
            with phases("data"):
                x, y = train_loader.batch(step, micro)
            last = micro == cfg.accumulation - 1
            with phases("forward/backward"), gradient_sync(model, raw_model, last):
                with autocast:
                    _, loss = model(x, y)
                loss = loss * train_loader.scale(step, micro)  # 1/accumulation unless batches differ in targets
                loss_sum += loss.detach()
                scaler.scale(loss).backward()
        with phases("optimizer"):
            scaler.unscale_(optimizer)
            grad_norm = scalar(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
            watch = on_gradients is not None and cfg.log_gradients and step % cfg.log_gradients == 0
            before = gradient_norms(raw_model) if watch else None
            scaler.step(optimizer)
            scaler.update()
            if watch:
                on_gradients(step, update_ratios(raw_model, before))
        # One all-reduce carries the loss, whether any rank was asked to stop, and whether a background
        # checkpoint save failed (so that every rank stops, not only the writer); one read brings it and
        # the grad norm to the host: the step's only host-device sync. The flags are filled on the device
        # (torch.tensor of host values would copy, and wait, on CUDA).
        packed = torch.stack([loss_sum, loss_sum.new_full((), float(stop.requested)),
                              loss_sum.new_full((), float(checkpoints.failed))])
        all_reduce_sum(packed)
        loss_total, stop_votes, save_failures, grad_norm = torch.cat([packed, grad_norm.float().reshape(1)]).tolist()
        if save_failures:
            checkpoints.raise_failure()
        loss_value, stop_now = loss_total / dist_.world_size, stop_votes > 0
        dt = time.perf_counter() - t0
        tokens_per_s = cfg.tokens_per_step / dt
        if step > start_step + 1:  # the first step pays for warm-up and compilation
            speeds.append(tokens_per_s)
        row = {
            "step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
            "tokens_per_s": tokens_per_s, "tokens_seen": step * cfg.tokens_per_step, "time": time.time(),
            "mfu": (cfg.flops_per_token * tokens_per_s / cfg.peak_flops) if cfg.peak_flops and cfg.flops_per_token else None,
        }
        with phases("eval"):
            if step % cfg.eval_interval == 0 or step == cfg.max_steps:
                row["val_loss"] = evaluate(model, val_loader, cfg.eval_steps, autocast, dist_)
            for name, (interval, fn) in (periodic_evals or {}).items():
                if step % interval == 0 or step == cfg.max_steps:
                    row[name] = fn()
        on_metrics(row)
        progress.update(row)
        with phases("checkpoint"):
            if stop_now:
                progress.message(f"step {step} finished: saving its checkpoint before stopping")
            if should_save(step, cfg) or stop_now:
                checkpoints.save(step, lambda: state_fn(step))
        if cfg.timing:
            progress.message(f"step {step} timing: {phases.report()}")
        if stop_now:
            return LoopResult(step, True, _mean(speeds))
    return LoopResult(step, False, _mean(speeds))


def should_save(step: int, cfg: LoopConfig) -> bool:
    return step % cfg.checkpoint_interval == 0 or step == cfg.max_steps or step in cfg.permanent_steps


@torch.no_grad()
def evaluate(model, val_loader, eval_steps: int, autocast, dist_: Dist) -> float:
    """Mean loss over every target token of `eval_steps` micro-batches on every rank."""
    model.eval()
    totals = torch.zeros(2, device=dist_.device, dtype=torch.float32)  # sum of token losses, target tokens
    for k in range(eval_steps):
        x, y = val_loader.batch(1, k)
        with autocast:
            _, loss = model(x, y)
        targets = (y != IGNORE_INDEX).sum()
        totals += torch.stack([loss.float() * targets, targets.float()])
    model.train()
    all_reduce_sum(totals)
    loss_sum, count = totals.tolist()
    return loss_sum / count


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
    return {name: (float(scalar(p.grad.norm())), p.detach().clone())
            for name, p in raw_model.named_parameters() if p.grad is not None}


@torch.no_grad()
def update_ratios(raw_model, before: dict[str, tuple[float, torch.Tensor]]) -> list[dict]:
    """Rows of (name, grad_norm, update_ratio = |Δw| / |w|) after the optimizer step."""
    rows = []
    for name, p in raw_model.named_parameters():
        if name in before:
            grad_norm, old = before[name]
            weight = float(scalar(old.norm()))
            change = float(scalar((p.detach() - old).norm()))
            rows.append({"name": name, "grad_norm": grad_norm, "update_ratio": change / weight if weight else None})
    return rows


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
