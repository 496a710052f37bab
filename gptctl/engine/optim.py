"""AdamW with decay/no-decay groups, and the learning-rate schedules."""

import inspect
import math
from dataclasses import dataclass

import torch


def make_optimizer(model: torch.nn.Module, weight_decay: float, lr: float, device_type: str,
                   fused: bool | None = None) -> torch.optim.AdamW:
    """fused=None: the fused kernel on CUDA (one launch for all parameters), the default elsewhere.
    fused=True selects it on CPU too (torch has a CPU kernel), which is how tests rehearse that path."""
    params = [p for p in model.parameters() if p.requires_grad]
    # Matrices (and embeddings) decay; biases and LayerNorm gains do not.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if fused is None:
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


@dataclass(frozen=True)
class Schedule:
    """Linear warmup, then one of the schedulers below, as a pure function of the step (so resumes are exact).

    cosine: one half-cosine from max_lr to min_lr at max_steps. cosine_with_restarts: `restarts` + 1 equal
    cycles after warmup, each a half-cosine from max_lr to min_lr (SGDR without warm restarts' warmup).
    linear: straight down to min_lr at max_steps. constant: max_lr after warmup.
    """

    kind: str
    max_lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    restarts: int = 0

    def at(self, step: int) -> float:
        """LR for optimizer step `step` (1-based: the update that completes step `step`)."""
        if step <= self.warmup_steps:
            return self.max_lr * step / self.warmup_steps
        if self.kind == "constant":
            return self.max_lr
        progress = min((step - self.warmup_steps) / max(self.max_steps - self.warmup_steps, 1), 1.0)
        if self.kind == "linear":
            return self.max_lr - progress * (self.max_lr - self.min_lr)
        if self.kind == "cosine_with_restarts" and progress < 1.0:
            progress = (progress * (self.restarts + 1)) % 1.0
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.max_lr - self.min_lr)
