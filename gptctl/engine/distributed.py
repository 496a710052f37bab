"""Process-group setup: NCCL on CUDA, gloo on CPU; one device per local rank."""

import os
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """Global rank 0 writes the registry and checkpoints (it alone receives gathered full state dicts)."""
        return self.rank == 0


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was requested but CUDA is not available")
    return torch.device(requested)


def setup(requested_device: str) -> Dist:
    rank = int(os.environ.get("RANK", 0))
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    device = resolve_device(requested_device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size > 1:
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, local_rank, world_size, device)


def resolve_dtype(requested: str, device: torch.device) -> torch.dtype:
    if requested == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[requested]


def autocast_for(device: torch.device, dtype: torch.dtype):
    """Mixed precision for forward passes: autocast to `dtype`, or nothing for float32."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_object(obj, src: int = 0):
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def share_run(d: Dist, run: dict | None) -> dict | None:
    """Every rank gets the run that node 0's workers hold. With c10d rendezvous ranks follow arrival
    order, so global rank 0 (the writer) may be on another node and learns the run here."""
    if not dist.is_initialized():
        return run
    runs = [None] * d.world_size
    dist.all_gather_object(runs, run)
    return next((r for r in runs if r is not None), None)


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
