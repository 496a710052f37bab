"""The training loop: gradient accumulation, clipping, LR schedule, eval, metrics, checkpoints.

It knows nothing of files or the registry: it reports through `on_metrics` and `checkpoints.save`.
"""

import signal
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch
from gptctl.engine.distributed import Dist, all_reduce_sum
from gptctl.engine.parallel import gradient_sync, scalar
from gptctl.engine.optim import Schedule


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
    flops_per_token: float | None = None
    peak_flops: float | None = None  # all processes together, for MFU


@dataclass
class StopFlag:
    """Set by SIGINT/SIGTERM; the loop finishes the step, checkpoints and stops."""

    requested: bool = False
    signum: int | None = None

    def install(self) -> None:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, self._handle)

    def _handle(self, signum, _frame) -> None:
        self.requested, self.signum = True, signum


@dataclass
class LoopResult:
    last_step: int
    interrupted: bool
    tokens_per_s: float | None


def train(model, raw_model, optimizer, scaler, train_loader, val_loader, cfg: LoopConfig, dist_: Dist,
          start_step: int, autocast_dtype: torch.dtype, checkpoints, state_fn: Callable[[int], dict],
          on_metrics: Callable[[dict], None], progress, stop: StopFlag) -> LoopResult:
    device = dist_.device
    autocast = (
        torch.autocast(device_type=device.type, dtype=autocast_dtype)
        if autocast_dtype != torch.float32 else nullcontext()
    )
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
            x, y = train_loader.batch(step, micro)
            last = micro == cfg.accumulation - 1
            with gradient_sync(model, raw_model, last):
                with autocast:
                    _, loss = model(x, y)
                loss = loss * train_loader.scale(step, micro)  # 1/accumulation unless batches differ in targets
                loss_sum += loss.detach()
                scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        grad_norm = scalar(torch.nn.utils.clip_grad_norm_(raw_model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else float("inf")))
        scaler.step(optimizer)
        scaler.update()
        # One all-reduce carries the loss and whether any rank was asked to stop.
        packed = torch.stack([loss_sum, torch.tensor(float(stop.requested), device=device)])
        all_reduce_sum(packed)
        loss_total, stop_votes = packed.tolist()  # the step's one host-device sync, for logging
        loss_value, stop_now = loss_total / dist_.world_size, stop_votes > 0
        dt = time.perf_counter() - t0
        tokens_per_s = cfg.tokens_per_step / dt
        if step > start_step + 1:  # the first step pays for warm-up and compilation
            speeds.append(tokens_per_s)
        row = {
            "step": step, "loss": loss_value, "lr": lr, "grad_norm": float(grad_norm),
            "tokens_per_s": tokens_per_s, "tokens_seen": step * cfg.tokens_per_step, "time": time.time(),
            "mfu": (cfg.flops_per_token * tokens_per_s / cfg.peak_flops) if cfg.peak_flops and cfg.flops_per_token else None,
        }
        if step % cfg.eval_interval == 0 or step == cfg.max_steps:
            row["val_loss"] = evaluate(model, val_loader, cfg.eval_steps, autocast, dist_)
        on_metrics(row)
        progress.update(row)
        if step % cfg.checkpoint_interval == 0 or step == cfg.max_steps or stop_now:
            checkpoints.save(step, state_fn(step))
        if stop_now:
            return LoopResult(step, True, _mean(speeds))
    return LoopResult(step, False, _mean(speeds))


@torch.no_grad()
def evaluate(model, val_loader, eval_steps: int, autocast, dist_: Dist) -> float:
    """Mean loss over every target token of `eval_steps` micro-batches on every rank."""
    model.eval()
    totals = torch.zeros(2, device=dist_.device, dtype=torch.float32)  # sum of token losses, target tokens
    for k in range(eval_steps):
        x, y = val_loader.batch(1, k)
        with autocast:
            _, loss = model(x, y)
        targets = (y != -100).sum()
        totals += torch.stack([loss.float() * targets, targets.float()])
    model.train()
    all_reduce_sum(totals)
    loss_sum, count = totals.tolist()
    return loss_sum / count


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None
