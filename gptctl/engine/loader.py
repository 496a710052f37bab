"""Batches from memmapped token shards, as a pure function of (step, micro-step, rank, world size).

The split is one stream: its shards concatenated. Optimizer step s consumes the rows
[(s-1)·R, s·R) of that stream (R = rows per step, wrapping around at the end of an epoch),
and each (micro-step, rank) takes its own B consecutive rows of them. Which rows a step sees
therefore depends only on the total batch, never on how many processes share it, so a run can
resume exactly, even with a different world size. The loader has no state beyond the step.

With a sequence-length warmup, step s reads the very same tokens, cut into rows of T_s < T
tokens, B·T/T_s of them per micro-batch: the token batch and the data order do not change.
"""

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from gptctl.data.shards import find_shards, load_tokens


class TokenStream:
    def __init__(self, data_root: Path, split: str):
        self.shards = [load_tokens(p) for p in find_shards(data_root, split)]  # memmaps, not copies
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards])
        self.num_tokens = int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start+length) of the concatenated stream."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        shard = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            local = start + filled - int(self.offsets[shard])
            take = min(length - filled, len(self.shards[shard]) - local)
            out[filled : filled + take] = self.shards[shard][local : local + take]
            filled += take
            shard += 1
        return out


class BatchLoader:
    def __init__(self, stream: TokenStream, batch_size: int, seq_len: int, accumulation: int,
                 rank: int, world_size: int, device: torch.device, prefetch: int = 0,
                 seq_len_at: Callable[[int], int] | None = None):
        self.stream, self.B, self.T = stream, batch_size, seq_len
        self.accumulation, self.rank, self.world_size = accumulation, rank, world_size
        self.rows_per_epoch = (stream.num_tokens - 1) // seq_len
        self.rows_per_step = batch_size * accumulation * world_size
        if self.rows_per_epoch < batch_size:
            raise ValueError(
                f"the data has {stream.num_tokens} tokens, fewer than one micro-batch of "
                f"{batch_size}×{seq_len}+1; prepare more data or lower --batch-size/--seq-len"
            )
        self.device = device
        # Sequence-length warmup: shorter rows, proportionally more of them, at the same token offsets.
        self.seq_len_at = seq_len_at or (lambda step: seq_len)
        # `prefetch` threads read the next `prefetch` micro-batches while the model computes.
        self.prefetch = prefetch
        self.pool = ThreadPoolExecutor(max_workers=prefetch) if prefetch > 0 else None
        self.pending: dict[tuple[int, int], object] = {}

    def _rows(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.seq_len_at(step)
        B = self.B * self.T // T
        first = (step - 1) * self.rows_per_step * self.T + (micro_step * self.world_size + self.rank) * B * T
        epoch_tokens = self.rows_per_epoch * self.T  # a multiple of every T, so no row straddles the end
        xs = np.empty((B, T + 1), dtype=np.int64)
        for b in range(B):
            xs[b] = self.stream.read((first + b * T) % epoch_tokens, T + 1)
        data = torch.from_numpy(xs)
        if self.device.type == "cuda":
            data = data.pin_memory()
        return data[:, :-1].contiguous(), data[:, 1:].contiguous()

    def scale(self, step: int, micro_step: int) -> float:
        """Weight of a micro-batch's mean loss in the step's loss: every micro-batch has B×T targets."""
        return 1.0 / self.accumulation

    def _next(self, step: int, micro_step: int) -> tuple[int, int]:
        return (step, micro_step + 1) if micro_step + 1 < self.accumulation else (step + 1, 0)

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        key = (step, micro_step)
        future = self.pending.pop(key, None)
        x, y = future.result() if future is not None else self._rows(step, micro_step)
        if self.pool is not None:
            ahead, pending = key, {}
            for _ in range(self.prefetch):  # keep what is already on its way; drop what a jump skipped
                ahead = self._next(*ahead)
                pending[ahead] = self.pending.pop(ahead, None) or self.pool.submit(self._rows, *ahead)
            self.pending = pending
        non_blocking = self.device.type == "cuda"
        return x.to(self.device, non_blocking=non_blocking), y.to(self.device, non_blocking=non_blocking)
