"""Peak training memory: `gptctl estimate`'s formula against a measured peak, and what the chunked loss
and activation checkpointing save.

Reproduce (CPU: about 10 minutes on a shared 2-core machine, one core at a time):

    python benchmarks/memory.py
    python benchmarks/memory.py --json memory.json

How it is measured on CPU: each configuration trains 2 optimizer steps (so AdamW's moments exist) of
the engine's GPT and make_optimizer, in a fresh process with one thread. The figure is the process's
peak resident set (getrusage ru_maxrss) minus its resident set just before the model was built (after
importing torch and training a throw-away 1-layer model once, so that libraries, kernels and thread
pools are already loaded). glibc would keep freed memory in its heap and so overstate a later peak;
MALLOC_MMAP_THRESHOLD_=65536 makes every allocation above 64 KiB its own mapping that goes back to the
system when freed, so the resident set follows the live tensors. Estimated is
gptctl.estimate.memory_bytes without the 1 GiB CUDA overhead. With CUDA (chosen automatically) the
measured figure is torch.cuda.max_memory_allocated after the same 2 steps instead.

"whole logits" is the loss the engine computed before: the head's B×T×V logits, .float(),
F.cross_entropy; the engine now uses gptctl.engine.model.chunked_cross_entropy.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from _common import print_footer, print_header, print_table

# (label, n_layer, n_head, n_embd, seq_len, batch, dtype, checkpointing, chunked loss)
CPU_CASES = [
    ("small T256 B8", 6, 6, 192, 256, 8, "float32", "none", False),
    ("small T256 B8", 6, 6, 192, 256, 8, "float32", "none", True),
    ("small T256 B8", 6, 6, 192, 256, 8, "float32", "selective", True),
    ("small T256 B8", 6, 6, 192, 256, 8, "float32", "full", True),
    ("small T512 B8", 6, 6, 192, 512, 8, "bfloat16", "none", False),
    ("small T512 B8", 6, 6, 192, 512, 8, "bfloat16", "none", True),
    ("small T512 B8", 6, 6, 192, 512, 8, "bfloat16", "full", True),
    ("L8 d256 T256 B16", 8, 4, 256, 256, 16, "float32", "none", True),
    ("L8 d256 T256 B16", 8, 4, 256, 256, 16, "float32", "selective", True),
    ("L8 d256 T256 B16", 8, 4, 256, 256, 16, "float32", "full", True),
]
CUDA_CASES = [
    ("gpt2 T1024 B16", 12, 12, 768, 1024, 16, "bfloat16", "none", False),
    ("gpt2 T1024 B16", 12, 12, 768, 1024, 16, "bfloat16", "none", True),
    ("gpt2 T1024 B16", 12, 12, 768, 1024, 16, "bfloat16", "selective", True),
    ("gpt2 T1024 B16", 12, 12, 768, 1024, 16, "bfloat16", "full", True),
]
MMAP_THRESHOLD = "65536"


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def train_steps(model, optimizer, batch: int, seq_len: int, dtype: str, chunked: bool, device, steps: int = 2) -> None:
    import torch
    import torch.nn.functional as F

    from gptctl.engine.distributed import autocast_for

    autocast = autocast_for(device, getattr(torch, dtype))
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randint(0, 50257, (batch, seq_len), generator=g).to(device)
        optimizer.zero_grad(set_to_none=True)
        with autocast:
            if chunked:
                _, loss = model(x, x)
            else:
                logits, _ = model(x)
                loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), x.view(-1), ignore_index=-100)
        loss.backward()
        optimizer.step()
        del loss
        if not chunked:
            del logits


def measure(case: list) -> int:
    """Peak bytes of 2 training steps of `case`, in this (fresh) process."""
    import resource

    import torch

    from gptctl.engine.model import GPT
    from gptctl.engine.optim import make_optimizer
    from gptctl.presets import ModelShape

    _, L, H, D, T, B, dtype, mode, chunked = case
    torch.set_num_threads(1)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    warm = GPT(ModelShape(1, 1, 8, block_size=8), mode).to(device)
    train_steps(warm, make_optimizer(warm, 0.1, 1e-3, device.type), 1, 8, dtype, chunked, device, steps=1)
    del warm
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_bytes()
    model = GPT(ModelShape(L, H, D, block_size=T), mode).to(device)
    train_steps(model, make_optimizer(model, 0.1, 1e-3, device.type), B, T, dtype, chunked, device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() - base
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base


def estimated(case: list) -> int:
    from gptctl.estimate import memory_bytes
    from gptctl.presets import ModelShape

    _, L, H, D, T, B, dtype, mode, chunked = case
    return memory_bytes(ModelShape(L, H, D, block_size=T), T, B, dtype, mode, chunked, overhead=0)["total_bytes"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", type=Path, default=None, help="Also write the rows here.")
    parser.add_argument("--measure", default=None, help=argparse.SUPPRESS)  # internal: one case, in a fresh process
    args = parser.parse_args()
    if args.measure:
        print(measure(json.loads(args.measure)))
        return
    import torch

    cases = CUDA_CASES if torch.cuda.is_available() else CPU_CASES
    print_header("memory", "python benchmarks/memory.py")
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD, "OMP_NUM_THREADS": "1"}
    rows, out = [], []
    whole = {}
    for case in cases:
        proc = subprocess.run([sys.executable, __file__, "--measure", json.dumps(case)], env=env,
                              capture_output=True, text=True, check=True)
        measured, est = int(proc.stdout.split()[-1]), estimated(case)
        label, *_, dtype, mode, chunked = case
        if not chunked:
            whole[label] = measured
        saved = f"{measured / whole[label]:.2f}" if label in whole and chunked else "-"
        rows.append([label, dtype, mode, "chunked" if chunked else "whole logits", measured / 2**20, est / 2**20,
                     f"{est / measured:.2f}", saved])
        out.append({"case": label, "dtype": dtype, "activation_checkpointing": mode, "chunked_loss": chunked,
                    "measured_bytes": measured, "estimated_bytes": est, "estimated_over_measured": est / measured})
        print(f"  {rows[-1]}", flush=True)
    print_table("peak memory of 2 training steps (MiB)",
                ["shape", "dtype", "checkpointing", "loss", "measured", "estimated", "est/measured",
                 "vs whole-logits none"], rows)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    print_footer()


if __name__ == "__main__":
    main()
