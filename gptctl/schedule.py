"""The learning-rate schedules, as pure functions of the step. Pure Python: `resume` reads them
without torch."""

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Schedule:
    """Linear warmup, then one of the schedulers below, as a pure function of the step (so resumes are exact).

    cosine: one half-cosine from max_lr to min_lr at max_steps. cosine_with_restarts: `restarts` + 1 equal
    cycles after warmup, each a half-cosine from max_lr to min_lr (SGDR without warm restarts' warmup).
    linear: straight down to min_lr at max_steps. constant: max_lr after warmup. wsd (warmup-stable-
    decay): max_lr until the last `decay_fraction` of the steps, then straight down to min_lr.
    `max_steps` is where the schedule ends (the run's --lr-decay-steps); after it, min_lr.
    """

    kind: str
    max_lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    restarts: int = 0
    decay_fraction: float = 0.2

    def decay_start(self) -> int:
        """wsd: the last step at max_lr."""
        return max(self.max_steps - int(self.decay_fraction * self.max_steps), self.warmup_steps)

    def at(self, step: int) -> float:
        """LR for optimizer step `step` (1-based: the update that completes step `step`)."""
        if step <= self.warmup_steps:
            return self.max_lr * step / self.warmup_steps
        if self.kind == "constant":
            return self.max_lr
        if self.kind == "wsd":
            start = self.decay_start()
            progress = min(max(step - start, 0) / max(self.max_steps - start, 1), 1.0)
            return self.max_lr - progress * (self.max_lr - self.min_lr)
        progress = min((step - self.warmup_steps) / max(self.max_steps - self.warmup_steps, 1), 1.0)
        if self.kind == "linear":
            return self.max_lr - progress * (self.max_lr - self.min_lr)
        if self.kind == "cosine_with_restarts" and progress < 1.0:
            progress = (progress * (self.restarts + 1)) % 1.0
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.max_lr - self.min_lr)
