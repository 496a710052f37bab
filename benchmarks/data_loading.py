"""Data loading: gptctl's BatchLoader over memmapped shards, with and without its prefetch thread.

Reproduce:

    python benchmarks/data_loading.py --steps 30 --batches 200

1. Time per batch: `BatchLoader.batch(step, micro)` called back to back (nothing to overlap with),
   for the tiny training shape and for the GPT-2 recipe's 16×1024 micro-batch. Baseline: no prefetch
   (--num-workers 0).
2. Share of a training step spent waiting for data: a real loop with the tiny model (forward,
   backward, clipping, AdamW step, loss sync) times each `batch()` call against the whole step.
   With prefetching the next micro-batch is read while the model computes, so the wait should be ~0.

Data: tiny Shakespeare prepared by `gptctl data prepare` into a temporary directory.
"""

import argparse
import sys
import time
from pathlib import Path

from _common import median, prepare_shakespeare, print_footer, print_header, print_table, scratch_dir

TRAIN_SHAPE = (8, 64, 2)  # batch size, sequence length, micro-steps: the tiny training shape
READ_SHAPES = {"tiny 8×64": (8, 64), "gpt2 recipe 16×1024": (16, 1024)}
PREFETCH = {"no prefetch (baseline)": 0, "prefetch thread (default)": 1}
TARGET_WAIT_SHARE = 0.01


def make_loader(data_root: Path, batch_size: int, seq_len: int, accumulation: int, prefetch: int):
    import torch
    from gptctl.engine.loader import BatchLoader, TokenStream

    stream = TokenStream(data_root, "train")
    return BatchLoader(stream, batch_size, seq_len, accumulation, 0, 1, torch.device("cpu"), prefetch)


def time_batches(data_root: Path, batch_size: int, seq_len: int, prefetch: int, batches: int) -> float:
    """Median seconds per `batch()` call, called back to back."""
    accumulation = 4
    loader = make_loader(data_root, batch_size, seq_len, accumulation, prefetch)
    times = []
    for i in range(batches):
        step, micro = divmod(i, accumulation)
        t0 = time.perf_counter()
        loader.batch(step + 1, micro)
        times.append(time.perf_counter() - t0)
    return median(times)


def wait_share(data_root: Path, prefetch: int, steps: int, warmup: int) -> tuple[float, float]:
    """(seconds waiting for data per step, seconds per step) of a real tiny-model training loop."""
    import torch
    from gptctl.engine.model import GPT
    from gptctl.engine.optim import make_optimizer
    from gptctl.presets import PRESETS

    batch_size, seq_len, accumulation = TRAIN_SHAPE
    loader = make_loader(data_root, batch_size, seq_len, accumulation, prefetch)
    torch.manual_seed(1337)
    model = GPT(PRESETS["tiny"])
    optimizer = make_optimizer(model, 0.1, 1e-3, "cpu")
    waits, totals = [], []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        waited = 0.0
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros(())
        for micro in range(accumulation):
            w0 = time.perf_counter()
            x, y = loader.batch(step, micro)
            waited += time.perf_counter() - w0
            _, loss = model(x, y)
            loss = loss * loader.scale(step, micro)
            loss_sum += loss.detach()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_sum.item()
        if step > warmup:
            waits.append(waited)
            totals.append(time.perf_counter() - t0)
    return sum(waits) / len(waits), sum(totals) / len(totals)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=200, help="batch() calls per read timing. (default: 200)")
    parser.add_argument("--steps", type=int, default=30, help="Training steps per loop. (default: 30)")
    parser.add_argument("--warmup", type=int, default=3, help="Training steps left out. (default: 3)")
    parser.add_argument("--data-root", type=Path, default=None, help="A prepared data root. (default: prepare tiny Shakespeare)")
    args = parser.parse_args()
    if args.steps <= args.warmup:
        parser.error("--steps must exceed --warmup")
    print_header("data loading", " ".join(["python", *sys.argv]))
    with scratch_dir() as work:
        data_root = prepare_shakespeare(work, args.data_root)
        reads = []
        for shape_name, (batch_size, seq_len) in READ_SHAPES.items():
            per_mode = {mode: time_batches(data_root, batch_size, seq_len, n, args.batches) for mode, n in PREFETCH.items()}
            base = per_mode["no prefetch (baseline)"]
            reads += [[shape_name, mode, 1e6 * t, t / base] for mode, t in per_mode.items()]
        shares = []
        results = {mode: wait_share(data_root, n, args.steps, args.warmup) for mode, n in PREFETCH.items()}
        base_wait = results["no prefetch (baseline)"][0]
        for mode, (wait, step) in results.items():
            shares.append([mode, 1e3 * step, 1e3 * wait, f"{100 * wait / step:.2f}%", wait / base_wait,
                           f"< {100 * TARGET_WAIT_SHARE:.0f}%", "met" if wait / step < TARGET_WAIT_SHARE else "not met"])
    print_table("time per batch() call, back to back (median)", ["micro-batch", "mode", "µs/batch", "ratio"], reads)
    print_table(f"tiny model training, micro-batch {TRAIN_SHAPE[0]}×{TRAIN_SHAPE[1]}, {TRAIN_SHAPE[2]} micro-steps "
                f"(mean over steps {args.warmup + 1}..{args.steps})",
                ["mode", "ms/step", "ms waiting for data/step", "wait share", "wait ratio", "target", "result"], shares)
    print_footer()


if __name__ == "__main__":
    main()
