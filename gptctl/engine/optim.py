"""The optimizers of a run (the learning-rate schedules are gptctl.schedule, pure Python).

adamw: GPT-2's recipe, AdamW over every parameter. muon: the speedrun's split, torch.optim.Muon for
the 2-D weight matrices inside the transformer blocks (attention and MLP) and AdamW for the rest
(token and position embeddings, which the head shares, and every bias and LayerNorm gain). Muon
orthogonalises each matrix's momentum (Newton-Schulz), which needs the whole matrix on one rank.

--arch modern splits AdamW's part further, as the speedruns do: the token embedding (--embedding-lr),
the untied head (--head-lr) and the RMSNorm gains (--scalar-lr) each learn at a rate of their own, without
weight decay; with --optimizer adamw the block matrices take --max-lr and --weight-decay.

Everything follows the one schedule: each parameter group's LR is the schedule's value times `lr_scale`
(its peak LR over --max-lr, by the group's role), taken from the settings at every step, so a checkpoint
never carries a stale one.
"""

import inspect

import torch

# Newton-Schulz steps per Muon update (torch's default): what estimate counts as its extra FLOPs.
MUON_NS_STEPS = 5


def is_muon_parameter(name: str, p: torch.Tensor) -> bool:
    """A weight matrix inside a transformer block: c_attn, c_proj and c_fc of attention and MLP."""
    return p.dim() == 2 and name.startswith("transformer.h.")


def make_optimizer(model: torch.nn.Module, weight_decay: float, lr: float, device_type: str,
                   fused: bool | None = None, exclude: frozenset[str] = frozenset()) -> torch.optim.AdamW:
    """AdamW over the model's parameters but `exclude` (names). fused=None: the fused kernel on CUDA (one
    launch for all parameters), the default elsewhere. fused=True selects it on CPU too (torch has a CPU
    kernel), which is how tests rehearse that path."""
    params = [p for name, p in model.named_parameters() if p.requires_grad and name not in exclude]
    # Matrices (and embeddings) decay; biases and LayerNorm gains do not.
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    if fused is None:
        fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def parameter_roles(model: torch.nn.Module) -> dict[str, str]:
    """Each trainable parameter's role in --arch modern's split: matrix, embedding, head or scalar."""
    roles = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            roles[name] = ("matrix" if is_muon_parameter(name, p) else "embedding" if name == "transformer.wte.weight"
                           else "head" if name == "lm_head.weight" else "scalar" if p.dim() < 2 else "matrix")
    return roles


def _modern_adamw(model: torch.nn.Module, settings, device_type: str, with_matrices: bool) -> torch.optim.AdamW:
    params = dict(model.named_parameters())
    by_role: dict[str, list] = {}
    for name, role in parameter_roles(model).items():
        by_role.setdefault(role, []).append(params[name])
    groups = [{"params": by_role[role], "role": role, "weight_decay": settings.weight_decay if role == "matrix" else 0.0}
              for role in ("matrix", "embedding", "head", "scalar") if by_role.get(role)
              and (with_matrices or role != "matrix")]
    fused = device_type == "cuda" and "fused" in inspect.signature(torch.optim.AdamW).parameters
    return torch.optim.AdamW(groups, lr=settings.max_lr, betas=(0.9, 0.95), eps=1e-8, fused=fused)


def make_optimizers(model: torch.nn.Module, settings, device_type: str) -> list[torch.optim.Optimizer]:
    """The run's optimizers by --optimizer: [AdamW], or [AdamW, Muon] with the split above."""
    modern = settings.arch == "modern"
    if settings.optimizer == "adamw":
        if modern:
            return [_modern_adamw(model, settings, device_type, with_matrices=True)]
        return [make_optimizer(model, settings.weight_decay, settings.max_lr, device_type)]
    matrices = {name: p for name, p in model.named_parameters() if p.requires_grad and is_muon_parameter(name, p)}
    adamw = (_modern_adamw(model, settings, device_type, with_matrices=False) if modern else
             make_optimizer(model, settings.weight_decay, settings.max_lr, device_type, exclude=frozenset(matrices)))
    # adjust_lr_fn "original": the LR times √max(1, rows/cols), so that a wide matrix (c_fc: 4d × d) moves
    # as much per element as a square one; --muon-lr is then the LR of a square matrix at any width.
    muon = torch.optim.Muon(list(matrices.values()), lr=settings.muon_lr, weight_decay=settings.muon_weight_decay,
                            momentum=settings.muon_momentum, nesterov=True, ns_steps=MUON_NS_STEPS,
                            adjust_lr_fn="original")
    return [adamw, muon]


def lr_scale(optimizer: torch.optim.Optimizer, group: dict, settings) -> float:
    """A parameter group's peak LR over --max-lr. gpt2's groups have no role (nor did checkpoints of
    earlier versions): they learn at --max-lr."""
    if isinstance(optimizer, torch.optim.Muon):
        return muon_lr_scale(settings)
    own = {"embedding": settings.embedding_lr, "head": settings.head_lr, "scalar": settings.scalar_lr}.get(group.get("role"))
    return 1.0 if own is None else own / settings.max_lr


def muon_lr_scale(settings) -> float:
    """Muon's LR over AdamW's at every step: both follow one schedule, each from its own peak."""
    return settings.muon_lr / settings.max_lr
