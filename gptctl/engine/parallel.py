"""How the model is spread over processes: DDP (replicas) or FSDP2 (sharded, optionally hybrid).

With --model-parallel, every transformer block and then the whole model are wrapped with
`fully_shard` over a DeviceMesh: parameters, gradients and optimizer state are split across
--model-parallel-size processes, and groups of that size replicate each other (HSDP) when the
world is larger. Checkpoints always hold *full* state dicts keyed by parameter name (gathered by
torch.distributed.checkpoint's state-dict helpers), so a checkpoint from any layout loads into any
other, and the file format is the same as for a single process.
"""

from contextlib import nullcontext

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.nn.parallel import DistributedDataParallel as DDP

from gptctl.engine.distributed import Dist


def shard(raw_model: torch.nn.Module, d: Dist, mesh_shape: tuple[int, int]) -> None:
    """FSDP2 in place: each block is its own all-gather unit, the root holds embeddings, ln_f and lm_head."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    replicas, shards = mesh_shape
    if replicas == 1:
        mesh = init_device_mesh(d.device.type, (shards,), mesh_dim_names=("shard",))
    else:
        mesh = init_device_mesh(d.device.type, (replicas, shards), mesh_dim_names=("replicate", "shard"))
    for block in raw_model.transformer.h:
        fully_shard(block, mesh=mesh)
    fully_shard(raw_model, mesh=mesh)


def wrap(raw_model: torch.nn.Module, d: Dist, sharded: bool, compile_: bool) -> torch.nn.Module:
    """The module the loop calls: compiled and/or DDP-wrapped (a sharded model is already distributed)."""
    model = torch.compile(raw_model) if compile_ else raw_model
    if d.world_size > 1 and not sharded:
        model = DDP(model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    return model


def gradient_sync(model: torch.nn.Module, raw_model: torch.nn.Module, last_micro_step: bool):
    """Reduce gradients only on the last micro-step of an accumulation."""
    if isinstance(model, DDP):
        return nullcontext() if last_micro_step else model.no_sync()
    if hasattr(raw_model, "set_requires_gradient_sync"):  # FSDP2
        raw_model.set_requires_gradient_sync(last_micro_step)
    return nullcontext()


def scalar(value: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a possibly distributed one (clip_grad_norm_ of sharded gradients is a DTensor)."""
    return value.full_tensor() if hasattr(value, "full_tensor") else value


_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_state(raw_model: torch.nn.Module, optimizer) -> tuple[dict, dict]:
    """Model and optimizer state as full, name-keyed CPU tensors (collective: every rank calls it;
    with sharding only rank 0 gets the values)."""
    return get_state_dict(raw_model, optimizer, options=_FULL)


def load_full_state(raw_model: torch.nn.Module, optimizer, model_state: dict, optimizer_state: dict | None = None) -> None:
    """Load full state dicts into this layout (each rank keeps its shard); the model alone when no optimizer."""
    options = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        set_model_state_dict(raw_model, model_state, options=options)
    else:
        set_state_dict(raw_model, optimizer, model_state_dict=model_state, optim_state_dict=optimizer_state, options=options)
