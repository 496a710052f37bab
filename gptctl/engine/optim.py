"""AdamW with decay/no-decay groups (the learning-rate schedules are gptctl.schedule, pure Python)."""

import inspect

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
