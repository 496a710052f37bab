"""Engine throughput: tokens/s of a real `gptctl pretrain` against a bare training loop.

Reproduce (CPU: the tiny and ~10M `small` presets; with CUDA: gpt2 124M, chosen automatically):

    python benchmarks/engine_throughput.py --steps 25 --warmup 4 --repeats 2
    python benchmarks/engine_throughput.py --repeats 2 --threads 1     # steadier on a shared machine

gptctl runs as a user runs it (launcher → torchrun → worker, registry, log file, metrics flushes,
prefetch thread), with eval and checkpoints pushed out of the run by huge --eval-interval and
--checkpoint-interval. Its speed is wall-clock time between the `time` stamps of its metrics rows:
a row is stamped right after its step's optimizer update and loss sync, before that step's eval
and checkpoint, so the interval from step W to step N-1 holds N-1-W whole steps plus everything the
control plane does between them, and neither the warm-up steps nor the final step's forced eval and
checkpoint. (runs.tokens_per_s, shown for reference, times each step from its start to its loss
sync and so misses the work between steps: it cannot show control-plane overhead.)

The bare loop is written here: the same GPT class, make_optimizer, LR schedule, gradient clipping,
micro-steps and batch shapes, a contiguous reader over the same memmapped shards, one loss sync per
step; no registry, logging, prefetch thread or checkpoints. It runs in a fresh process with the thread
count torchrun gives gptctl's worker (probed by running gptctl's own torchrun command line; --threads N
sets OMP_NUM_THREADS=N for both sides instead). Repeats alternate which side goes first. The overhead
is reported twice: over the whole window (what a user waits for) and on the fastest step (the one
other processes disturbed least: on a shared machine the steadier figure, but blind to work done
only every few seconds, such as metrics flushes).
--gptctl-args passes extra options to gptctl, to find where an overhead comes from.
"""

import argparse
import json
import shlex
import sqlite3
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

from _common import cli_env, gptctl, median, prepare_shakespeare, print_footer, print_header, print_table, scratch_dir

TARGET_OVERHEAD = 0.03
MAX_LR = 1e-3
WARMUP_LR_STEPS = 2
HUGE_INTERVAL = 10**9  # eval and checkpoint only at the final step, which is outside the timed window


@dataclass(frozen=True)
class Shape:
    model: str
    seq_len: int
    batch_size: int
    accumulation: int

    @property
    def tokens_per_step(self) -> int:
        return self.seq_len * self.batch_size * self.accumulation


CPU_SHAPES = {"tiny": Shape("tiny", 32, 4, 2), "small": Shape("small", 32, 4, 2)}  # tests' TINY_RUN batch
CUDA_SHAPES = {"gpt2": Shape("gpt2", 1024, 16, 4)}


def worker_threads(shape: Shape, device: str, home: Path) -> int:
    """torch.get_num_threads() in a process started by gptctl's own torchrun command line."""
    from gptctl.launch import torchrun_command
    from gptctl.settings import LaunchSettings

    cmd = torchrun_command(LaunchSettings(), home, "probe", "probe")
    launcher = cmd[: cmd.index("-m", 3)]  # torchrun and its flags, without the worker module
    probe = launcher + ["--no-python", sys.executable, "-c", "import torch; print(torch.get_num_threads())"]
    out = subprocess.run(probe, env=cli_env(home), capture_output=True, text=True, check=True).stdout
    return int(out.split()[-1])


def run_gptctl(shape: Shape, data_root: Path, home: Path, steps: int, threads: int | None, device: str,
               extra: list[str]) -> dict:
    """Step durations from the wall-clock stamps of the run's metrics rows, and runs.tokens_per_s."""
    proc = gptctl(
        "pretrain", "--model", shape.model, "--data-root", str(data_root), "--seq-len", str(shape.seq_len),
        "--batch-size", str(shape.batch_size), "--total-batch-size", str(shape.tokens_per_step),
        "--max-steps", str(steps), "--warmup-steps", str(WARMUP_LR_STEPS), "--max-lr", str(MAX_LR),
        "--eval-interval", str(HUGE_INTERVAL), "--eval-steps", "1", "--checkpoint-interval", str(HUGE_INTERVAL),
        "--device", device, "--run-name", f"bench-{shape.model}", "--json", *extra, home=home, env=thread_env(threads),
    )
    run_id = json.loads(proc.stdout)["run_id"]
    with sqlite3.connect(home / "gptctl.db") as conn:
        stamps = dict(conn.execute("select step, time from metrics where run_id = ?", [run_id]))
        (registry_speed,) = conn.execute("select tokens_per_s from runs where id = ?", [run_id]).fetchone()
    return {"stamps": [stamps[s] for s in range(1, steps)], "registry": registry_speed}


def thread_env(threads: int | None) -> dict[str, str]:
    return {} if threads is None else {"OMP_NUM_THREADS": str(threads)}


def speeds(stamps: list[float], warmup: int, tokens_per_step: int) -> tuple[float, float]:
    """(tokens/s over the whole window, tokens/s of the fastest step) from per-step end times 1..N-1."""
    durations = [b - a for a, b in zip(stamps[warmup - 1:], stamps[warmup:])]
    return tokens_per_step * len(durations) / sum(durations), tokens_per_step / min(durations)


class ContiguousBatches:
    """nanoGPT's DataLoaderLite: consecutive B×T+1 windows of the memmapped shards, in order."""

    def __init__(self, data_root: Path, shape: Shape, device):
        from gptctl.data.shards import find_shards, load_tokens

        self.shards = [load_tokens(p) for p in find_shards(data_root, "train")]
        self.B, self.T, self.device = shape.batch_size, shape.seq_len, device
        self.shard, self.pos = 0, 0

    def next(self):
        import numpy as np
        import torch

        n = self.B * self.T + 1
        if self.pos + n > len(self.shards[self.shard]):
            self.shard, self.pos = (self.shard + 1) % len(self.shards), 0
        buf = torch.from_numpy(self.shards[self.shard][self.pos: self.pos + n].astype(np.int64))
        self.pos += n - 1
        x, y = buf[:-1].view(self.B, self.T), buf[1:].view(self.B, self.T)
        return x.to(self.device), y.to(self.device)


def run_bare(shape: Shape, data_root: Path, steps: int, device_name: str, threads: int) -> list[float]:
    """End times of steps 1..N-1 of the bare loop."""
    import torch
    from gptctl.engine.distributed import resolve_dtype
    from gptctl.engine.model import GPT
    from gptctl.engine.optim import make_optimizer
    from gptctl.schedule import Schedule
    from gptctl.presets import PRESETS

    torch.set_num_threads(threads)
    device = torch.device(device_name)
    dtype = resolve_dtype("auto", device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    torch.manual_seed(1337)
    model = GPT(PRESETS[shape.model]).to(device)
    optimizer = make_optimizer(model, 0.1, MAX_LR, device.type)
    batches = ContiguousBatches(data_root, shape, device)
    schedule = Schedule("cosine", MAX_LR, MAX_LR / 10, WARMUP_LR_STEPS, steps)
    stamps = []
    for step in range(1, steps):  # the same steps as gptctl's timed window: up to N-1
        lr = schedule.at(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss_sum = torch.zeros((), device=device)
        for _ in range(shape.accumulation):
            x, y = batches.next()
            with autocast:
                _, loss = model(x, y)
            loss = loss / shape.accumulation
            loss_sum += loss.detach()
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        loss_sum.item()  # the one host-device sync per step, as in gptctl's loop
        stamps.append(time.perf_counter())
    return stamps


def run_bare_process(shape: Shape, data_root: Path, steps: int, device: str, threads: int, home: Path) -> list[float]:
    """The bare loop in a fresh process, as gptctl's worker is one (no allocator or thread-pool history)."""
    spec = {"shape": vars(shape), "data_root": str(data_root), "steps": steps, "device": device, "threads": threads}
    proc = subprocess.run([sys.executable, __file__, "--bare-loop", json.dumps(spec)], env=cli_env(home),
                          capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25, help="Optimizer steps per run (N). (default: 25)")
    parser.add_argument("--warmup", type=int, default=4, help="Steps left out of the timing (W). (default: 4)")
    parser.add_argument("--repeats", type=int, default=2, help="gptctl/bare pairs per preset. (default: 2)")
    parser.add_argument("--presets", default=None, help="Comma-separated presets. (default: tiny,small on CPU, gpt2 with CUDA)")
    parser.add_argument("--threads", type=int, default=None,
                        help="OMP_NUM_THREADS for both sides. (default: what torchrun gives gptctl's worker)")
    parser.add_argument("--data-root", type=Path, default=None, help="A prepared data root. (default: prepare tiny Shakespeare)")
    parser.add_argument("--gptctl-args", default="", help="Extra `gptctl pretrain` options, to find where overhead comes "
                        "from, e.g. '--num-workers 0'. (default: none)")
    parser.add_argument("--bare-loop", default=None, help=argparse.SUPPRESS)  # internal: one bare run, stamps as JSON
    args = parser.parse_args()
    if args.bare_loop:
        spec = json.loads(args.bare_loop)
        print(json.dumps(run_bare(Shape(**spec["shape"]), Path(spec["data_root"]), spec["steps"], spec["device"],
                                  spec["threads"])))
        return
    if args.steps - 1 - args.warmup < 2 or args.warmup < 1:
        parser.error("--warmup must be at least 1 and --steps must exceed it by at least 3")

    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = CUDA_SHAPES if device == "cuda" else CPU_SHAPES
    chosen = [{**CPU_SHAPES, **CUDA_SHAPES}[p] for p in (args.presets.split(",") if args.presets else shapes)]
    print_header("engine throughput", " ".join(["python", *sys.argv]))
    rows, summary = [], []
    with scratch_dir() as work:
        data_root = prepare_shakespeare(work, args.data_root)
        home = work / "home"
        for shape in chosen:
            threads = args.threads or worker_threads(shape, device, home)
            window = {"gptctl": [], "gptctl best step": [], "bare": [], "bare best step": []}
            for repeat in range(args.repeats):
                registry = None
                for side in (["gptctl", "bare"] if repeat % 2 == 0 else ["bare", "gptctl"]):  # alternate: drift cancels
                    if side == "gptctl":
                        g = run_gptctl(shape, data_root, home, args.steps, args.threads, device, shlex.split(args.gptctl_args))
                        stamps, registry = g["stamps"], g["registry"]
                    else:
                        stamps = run_bare_process(shape, data_root, args.steps, device, threads, home)
                    whole, fastest = speeds(stamps, args.warmup, shape.tokens_per_step)
                    window[side].append(whole)
                    window[f"{side} best step"].append(fastest)
                g, b = window["gptctl"][-1], window["bare"][-1]
                gm, bm = window["gptctl best step"][-1], window["bare best step"][-1]
                rows.append([shape.model, repeat + 1, threads, f"{shape.accumulation}×{shape.batch_size}×{shape.seq_len}",
                             g, b, _pct(g, b), gm, bm, _pct(gm, bm), registry])
            g, b = median(window["gptctl"]), median(window["bare"])
            gm, bm = median(window["gptctl best step"]), median(window["bare best step"])
            summary.append([shape.model, g, b, g / b, _pct(g, b), _pct(gm, bm), f"< {100 * TARGET_OVERHEAD:.0f}%",
                            "met" if 1 - g / b < TARGET_OVERHEAD else "not met"])
    timed = args.steps - 1 - args.warmup
    print_table(f"per run ({device}; tokens/s over steps {args.warmup + 1}..{args.steps - 1} ({timed} steps); "
                "'best step' = tokens/s of the fastest step)",
                ["preset", "repeat", "threads", "micro×B×T", "gptctl", "bare", "overhead",
                 "gptctl best step", "bare best step", "overhead (best step)", "runs.tokens_per_s"], rows)
    print_table("median over repeats: overhead = 1 - gptctl/bare",
                ["preset", "gptctl tok/s", "bare tok/s", "ratio", "overhead", "overhead (best step)", "target",
                 "result"], summary)
    print_footer()


def _pct(gptctl_speed: float, bare_speed: float) -> str:
    return f"{100 * (1 - gptctl_speed / bare_speed):+.1f}%"


if __name__ == "__main__":
    main()
