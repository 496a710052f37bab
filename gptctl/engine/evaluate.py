"""Evaluating a model: HellaSwag multiple choice, and val loss on prepared shards as training measures it.

HellaSwag is scored as in the GPT-2/GPT-3 papers and build-nanogpt's hellaswag.py: each ending is
scored by the model's cross-entropy on the ending's tokens alone, given the context; the prediction
is the ending with the lowest mean loss per token ("acc_norm"). The lowest summed loss is counted too.
"""

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.nn import functional as F

from gptctl.data.hellaswag import EncodedItem
from gptctl.engine.distributed import Dist, all_reduce_sum
from gptctl.engine.loader import BatchLoader, TokenStream
from gptctl.engine.model import IGNORE_INDEX
from gptctl.errors import UserError


@torch.no_grad()
def mean_loss(model, val_loader, eval_steps: int, autocast, dist_: Dist) -> float:
    """Mean loss over every target token of `eval_steps` micro-batches on every rank (training's val loss)."""
    model.eval()
    totals = torch.zeros(2, device=dist_.device, dtype=torch.float32)  # sum of token losses, target tokens
    for k in range(eval_steps):
        x, y = val_loader.batch(1, k)
        with autocast:
            _, loss = model(x, y)
        targets = (y != IGNORE_INDEX).sum()
        totals += torch.stack([loss.float() * targets, targets.float()])
    model.train()
    all_reduce_sum(totals)
    loss_sum, count = totals.tolist()
    return loss_sum / count

def ending_batch(item: EncodedItem, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets, (endings, T), right-padded: targets are the ending tokens, IGNORE_INDEX elsewhere.

    A row longer than the model's context loses tokens from the left, i.e. from the context, so the
    ending is always scored whole (unless it alone exceeds the context).
    """
    rows = [(item.context + ending)[-(block_size + 1):] for ending in item.endings]
    width = max(map(len, rows)) - 1
    x = torch.zeros((len(rows), width), dtype=torch.long)
    y = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    for i, (tokens, ending) in enumerate(zip(rows, item.endings)):
        n = len(tokens) - 1
        scored = min(len(ending), n)  # the last `scored` targets are the ending's tokens
        x[i, :n] = torch.tensor(tokens[:-1])
        y[i, n - scored:n] = torch.tensor(tokens[-scored:])
    return x, y


@torch.no_grad()
def ending_losses(model, item: EncodedItem, device: torch.device, autocast=nullcontext()) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, sum) of each ending's token losses, one forward pass for all endings."""
    x, y = (t.to(device) for t in ending_batch(item, model.config.block_size))
    with autocast:
        logits, _ = model(x)
    losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=IGNORE_INDEX, reduction="none")
    sums = losses.view_as(y).sum(dim=1)
    return sums / (y != IGNORE_INDEX).sum(dim=1), sums


@dataclass(frozen=True)
class HellaSwagScore:
    correct: int  # lowest mean loss per ending token (acc_norm)
    correct_sum: int  # lowest total loss
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total

    @property
    def accuracy_sum(self) -> float:
        return self.correct_sum / self.total


def hellaswag_accuracy(model, items: Sequence[EncodedItem], device: torch.device, autocast=nullcontext(),
                       rank: int = 0, world_size: int = 1,
                       on_item: Callable[[int, int], None] | None = None) -> HellaSwagScore:
    """Score items i with i % world_size == rank; the counts are summed over all ranks (no-op without a process group).

    Pass the unwrapped model, not DDP: ranks run different numbers of forward passes. `on_item(correct, done)`
    follows this rank's progress.
    """
    was_training = model.training
    model.eval()
    correct = correct_sum = done = 0
    for item in items[rank::world_size]:
        mean, total = ending_losses(model, item, device, autocast)
        correct += int(mean.argmin()) == item.label
        correct_sum += int(total.argmin()) == item.label
        done += 1
        if on_item:
            on_item(correct, done)
    model.train(was_training)
    counts = all_reduce_sum(torch.tensor([correct, correct_sum, done], dtype=torch.int64, device=device))
    correct_norm, correct_sum, scored = counts.tolist()
    return HellaSwagScore(correct_norm, correct_sum, scored)


class _Reporting:
    """A loader that reports every batch it hands out, so a progress bar can follow mean_loss."""

    def __init__(self, loader: BatchLoader, on_batch: Callable[[], None]):
        self.loader, self.on_batch = loader, on_batch

    def batch(self, step: int, micro_step: int):
        out = self.loader.batch(step, micro_step)
        self.on_batch()
        return out


@dataclass(frozen=True)
class ValLoss:
    loss: float
    tokens: int
    batches: int


def val_batches(data_root: Path, seq_len: int, batch_size: int, limit: int | None) -> tuple[TokenStream, int]:
    """The val split and how many batches of it to read: every complete one (never wrapping around), or `limit`."""
    stream = TokenStream(data_root, "val")
    complete = (stream.num_tokens - 1) // seq_len // batch_size
    if complete == 0:
        raise UserError(f"--batch-size: the val split of {data_root} has {stream.num_tokens:,} tokens, fewer than one "
                        f"batch of {batch_size}×{seq_len}+1; lower --batch-size")
    return stream, min(complete, limit) if limit else complete


def val_loss(model, stream: TokenStream, batches: int, seq_len: int, batch_size: int, device: torch.device,
             autocast=nullcontext(), on_batch: Callable[[], None] | None = None) -> ValLoss:
    """Mean loss over every target token of the first `batches` val batches: the rows training's eval reads first."""
    loader = BatchLoader(stream, batch_size, seq_len, batches, rank=0, world_size=1, device=device)
    reporting = _Reporting(loader, on_batch or (lambda: None))
    loss = mean_loss(model, reporting, batches, autocast, Dist(0, 0, 1, device))
    model.eval()  # mean_loss leaves the model in training mode, for the training loop
    return ValLoss(loss, batches * batch_size * seq_len, batches)
