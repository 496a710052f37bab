"""Batches of instruction examples with the prompt masked out of the loss.

Like the token loader, a batch is a pure function of (step, micro-step, rank, world size): step s
takes the examples [(s-1)·R, s·R) of an endless stream of epochs (R = examples per step), each
epoch a seeded permutation. Sequences are right-padded with <|endoftext|> to the batch's longest,
rounded up to a multiple of 64 (capped at seq_len); padding and prompt positions get the target
IGNORE_INDEX (-100), which the model's cross-entropy ignores.

A micro-batch's mean loss is scaled by its share of the step's target tokens (all micro-steps,
all ranks), times the world size that DDP divides by: the step's gradient is then exactly that
of the mean loss over every response token of the step, whatever the padding or batching.
"""

import numpy as np
import torch

from gptctl.data.dolly import Split
from gptctl.data.tokenizer import EOT_TOKEN
from gptctl.engine.model import IGNORE_INDEX

PAD_MULTIPLE = 64


class InstructionBatchLoader:
    def __init__(self, split: Split, batch_size: int, seq_len: int, accumulation: int, rank: int, world_size: int,
                 device: torch.device, seed: int, shuffle: bool = True):
        self.split, self.B, self.T = split, batch_size, seq_len
        self.accumulation, self.rank, self.world_size = accumulation, rank, world_size
        self.device, self.seed, self.shuffle = device, seed, shuffle
        self.rows_per_step = batch_size * accumulation * world_size
        lengths = np.diff(split.offsets)
        self.targets = lengths - split.prompt_lens  # response tokens (and EOT) per example
        self._perm: tuple[int, np.ndarray] | None = None
        self._step_targets: tuple[int, int] | None = None

    def _example(self, row: int) -> int:
        epoch, position = divmod(row, len(self.split))
        if not self.shuffle:
            return position
        if self._perm is None or self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.split)))
        return int(self._perm[1][position])

    def _examples(self, step: int, micro_step: int, rank: int) -> list[int]:
        first = (step - 1) * self.rows_per_step + (micro_step * self.world_size + rank) * self.B
        return [self._example(first + b) for b in range(self.B)]

    def batch(self, step: int, micro_step: int) -> tuple[torch.Tensor, torch.Tensor]:
        examples = self._examples(step, micro_step, self.rank)
        offsets, prompt_lens = self.split.offsets, self.split.prompt_lens
        longest = max(int(offsets[i + 1] - offsets[i]) - 1 for i in examples)
        width = min(self.T, -(-longest // PAD_MULTIPLE) * PAD_MULTIPLE)
        x = np.full((self.B, width), EOT_TOKEN, dtype=np.int64)
        y = np.full((self.B, width), IGNORE_INDEX, dtype=np.int64)
        for b, i in enumerate(examples):
            tokens = self.split.tokens[offsets[i] : offsets[i + 1]].astype(np.int64)
            n, p = len(tokens) - 1, int(prompt_lens[i])
            x[b, :n] = tokens[:-1]
            y[b, p - 1 : n] = tokens[p:]  # the target at position t is token t+1: response tokens only
        non_blocking = self.device.type == "cuda"
        return (torch.from_numpy(x).to(self.device, non_blocking=non_blocking),
                torch.from_numpy(y).to(self.device, non_blocking=non_blocking))

    def scale(self, step: int, micro_step: int) -> float:
        mine = sum(int(self.targets[i]) for i in self._examples(step, micro_step, self.rank))
        return mine / self._targets_of_step(step) * self.world_size

    def _targets_of_step(self, step: int) -> int:
        if self._step_targets is None or self._step_targets[0] != step:
            first = (step - 1) * self.rows_per_step
            total = sum(int(self.targets[self._example(first + r)]) for r in range(self.rows_per_step))
            self._step_targets = (step, total)
        return self._step_targets[1]
