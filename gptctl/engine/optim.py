"""AdamW with decay/no-decay groups, and the warmup + cosine learning-rate schedule."""

import inspect
import math

import torch


def make_optimizer(model: torch.nn.Module, weight_decay: float, lr: float, device_type: str) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    # Matrices (and embeddings) decay; biases and LayerNorm gains do not.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def learning_rate(step: int, max_lr: float, min_lr: float, warmup_steps: int, max_steps: int, decay: bool) -> float:
    """LR for optimizer step `step` (1-based: the update that completes step `step`)."""
    if step <= warmup_steps:
        return max_lr * step / warmup_steps
    if not decay:
        return max_lr
    progress = min((step - warmup_steps) / max(max_steps - warmup_steps, 1), 1.0)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)
