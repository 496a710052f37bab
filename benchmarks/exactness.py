"""Exactness under load: do identical runs give identical bits on a busy machine, and what does MKL's
Conditional Numerical Reproducibility (MKL_CBWR=AUTO, which every worker now sets) cost?

Reproduce the figures in README's "Exactness:" paragraph (a 2-core AMD EPYC, other jobs running too):

    python benchmarks/exactness.py --reps 8 --busy 2 --pairs           # bits: 40 fresh processes under load
    python benchmarks/exactness.py --cli --reps 3 --busy 2             # bits: 12 real `gptctl pretrain` runs
    python benchmarks/exactness.py --cost --rounds 8 --model small --timed 10   # cost of CNR: 0.98-0.99
    python benchmarks/exactness.py --cost --rounds 6 --model tiny --timed 15    # (noisier: the tiny model)

Bits: each repetition is a fresh Python process that starts as gptctl's worker does (the thread pools
pinned by `startup.pin_thread_pools` before torch loads, then `worker.pin_numerics`), builds the
real Trainer from the tests' tiny-run settings and trains 3 steps; it prints every step's loss and
grad norm as float.hex and a sha256 of every gradient. Meanwhile `--busy` processes of pure
busy-looping Python (and, with --pairs, a second probe at the same time) load the cores. Conditions:
the default thread count (what users get: OMP_NUM_THREADS unset), OMP_NUM_THREADS=1 (the tests'),
MKL's CNR off (the worker before this change) and on, and 2 prefetch threads (--num-workers 2).
A condition is exact when all its repetitions print the same bits. (Different thread counts give
different gradients' last bits by design: conditions are compared within, not across.)

--cli runs whole `gptctl pretrain` runs (launcher → torchrun → worker → registry), two at a time,
and compares every step's loss and val loss read back from the registry, bit for bit.

--cost times train steps of a fresh process with CNR off and with MKL_CBWR=AUTO, alternating which
goes first in each round, and reports the median ratio of step times (on a shared machine only
ratios measured side by side mean anything).
"""

import argparse
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, cli_env, gptctl_command, prepare_shakespeare, print_footer, print_header, print_table  # noqa: E402

TINY = dict(model="tiny", seq_len=32, batch_size=2, total_batch_size=128, warmup_steps=2, max_lr=3e-3,
            eval_interval=4, eval_steps=2)
CLI_RUN = ["--model", "tiny", "--seq-len", "32", "--batch-size", "2", "--total-batch-size", "128",
           "--warmup-steps", "2", "--max-lr", "3e-3", "--eval-interval", "4", "--eval-steps", "2", "--max-steps", "4"]
BUSY = "import time\nend = time.time() + {seconds}\nwhile time.time() < end: pass\n"

# name -> environment changes (None: remove the variable). "cnr off" is the worker before MKL_CBWR.
CONDITIONS = {
    "threads default, cnr on": {"OMP_NUM_THREADS": None},
    "threads default, cnr off": {"OMP_NUM_THREADS": None, "EXACTNESS_CNR_OFF": "1"},
    "threads default, 2 prefetch threads": {"OMP_NUM_THREADS": None, "EXACTNESS_NUM_WORKERS": "2"},
    "OMP_NUM_THREADS=1, cnr on": {"OMP_NUM_THREADS": "1"},
    "OMP_NUM_THREADS=1, cnr off": {"OMP_NUM_THREADS": "1", "EXACTNESS_CNR_OFF": "1"},
}


def probe(data_root: Path, steps: int, model: str, timed: int) -> None:
    """One fresh process, started as gptctl's worker starts: prints one JSON line."""
    from gptctl.engine.startup import pin_thread_pools

    cnr_off = bool(os.environ.get("EXACTNESS_CNR_OFF"))  # the worker as it was before MKL_CBWR
    pin_thread_pools()
    import hashlib

    import torch

    from gptctl.engine.distributed import Dist
    from gptctl.engine.trainer import Trainer
    from gptctl.engine.worker import pin_numerics
    from gptctl.settings import TrainSettings

    pin_numerics(deterministic=False)
    if cnr_off:  # MKL reads MKL_CBWR at its first BLAS call, which comes after this
        os.environ.pop("MKL_CBWR", None)
    settings = TrainSettings(**{**TINY, "model": model}, device="cpu", data_root=data_root,
                             max_steps=max(steps + timed, 4), num_workers=int(os.environ.get("EXACTNESS_NUM_WORKERS", "0")))
    trainer = Trainer(settings, Dist(0, 0, 1, torch.device("cpu")))
    rows = []
    for _ in range(steps):
        row, _ = trainer.train_step()
        digest = hashlib.sha256()
        for p in trainer.raw_model.parameters():
            digest.update(p.grad.numpy().tobytes())
        rows.append([row["loss"].hex(), row["grad_norm"].hex(), digest.hexdigest()[:16]])
    times = []
    for _ in range(timed):
        began = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - began)
    print(json.dumps({"steps": rows, "threads": torch.get_num_threads(), "step_s": times}), flush=True)


def probe_env(changes: dict) -> dict:
    env = cli_env(Path(tempfile.gettempdir()))
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def start_probe(data_root: Path, changes: dict, steps: int = 3, model: str = "tiny", timed: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, "--probe", str(data_root), "--steps", str(steps), "--model", model,
                             "--timed", str(timed)], env=probe_env(changes), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=REPO)


def result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"probe failed ({proc.returncode}):\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


@contextmanager
def busy(n: int, seconds: float = 1800):
    """n processes of pure busy-looping Python, always killed at the end."""
    procs = [subprocess.Popen([sys.executable, "-c", BUSY.format(seconds=seconds)]) for _ in range(n)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def bits(data_root: Path, reps: int, n_busy: int, pairs: bool) -> None:
    rows = []
    with busy(n_busy):
        for name, changes in CONDITIONS.items():
            seen, loads = collections.Counter(), []
            first = None
            for _ in range(reps if not pairs else (reps + 1) // 2):
                procs = [start_probe(data_root, changes) for _ in range(2 if pairs else 1)]
                for proc in procs:
                    r = result(proc)
                    seen[json.dumps(r["steps"])] += 1
                    first = first or r
                loads.append(os.getloadavg()[0])
            steps = json.loads(seen.most_common(1)[0][0])
            rows.append([name, first["threads"], sum(seen.values()), len(seen), f"{min(loads):.1f}-{max(loads):.1f}",
                         steps[0][0], steps[-1][2]])
            print(f"{name}: {dict(seen.most_common())}", flush=True)
    print_table("Fresh processes, 3 steps each (exact: 1 distinct result)",
                ["condition", "threads", "runs", "distinct", "load (1 min)", "step-1 loss", "step-3 grads sha256"], rows)


def cli_runs(data_root: Path, reps: int, n_busy: int) -> None:
    import sqlite3

    rows = []
    with busy(n_busy), tempfile.TemporaryDirectory(prefix="exactness-") as tmp:
        for name, omp in (("threads default", None), ("OMP_NUM_THREADS=1", "1")):
            seen = collections.Counter()
            for i in range(reps):
                procs = []
                for j in range(2):  # two at a time: each loads the other
                    home = Path(tmp) / f"{name}-{i}-{j}".replace(" ", "_").replace("=", "")
                    env = {**probe_env({"OMP_NUM_THREADS": omp}), "GPTCTL_HOME": str(home)}
                    procs.append((home, subprocess.Popen([*gptctl_command(), "pretrain", *CLI_RUN, "--data-root", str(data_root),
                                                          "--run-name", "r"], env=env, stdout=subprocess.DEVNULL,
                                                         stderr=subprocess.PIPE, text=True)))
                for home, proc in procs:
                    err = proc.communicate()[1]
                    if proc.returncode != 0:
                        raise SystemExit(f"gptctl pretrain failed:\n{err[-3000:]}")
                    with sqlite3.connect(home / "gptctl.db") as conn:
                        got = conn.execute("select step, loss, val_loss from metrics order by step").fetchall()
                    seen[tuple((s, loss.hex(), val.hex() if val is not None else None) for s, loss, val in got)] += 1
            rows.append([name, sum(seen.values()), len(seen)])
            print(f"{name}: {list(seen.values())} {list(seen)[0]}", flush=True)
    print_table("`gptctl pretrain`, 4 steps, two runs at a time (exact: 1 distinct result)",
                ["condition", "runs", "distinct"], rows)


def cost(data_root: Path, rounds: int, model: str, timed: int) -> None:
    rows = []
    for threads in (None, "1"):
        ratios, medians = [], {"off": [], "on": []}
        for i in range(rounds):
            order = ("off", "on") if i % 2 == 0 else ("on", "off")
            got = {}
            for side in order:
                changes = {"OMP_NUM_THREADS": threads, **({"EXACTNESS_CNR_OFF": "1"} if side == "off" else {})}
                got[side] = statistics.median(result(start_probe(data_root, changes, steps=2, model=model, timed=timed))["step_s"])
                medians[side].append(got[side])
            ratios.append(got["on"] / got["off"])
        rows.append([threads or "default", rounds, statistics.median(ratios), min(ratios), max(ratios)])
    print_table(f"Step time with MKL_CBWR=AUTO / without ({model} model, {timed} timed steps per process, median per process)",
                ["threads", "rounds", "median ratio", "min", "max"], rows)


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwinds: the busy processes are killed too
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=12, help="repetitions per condition")
    parser.add_argument("--busy", type=int, default=3, help="busy-looping processes loading the machine")
    parser.add_argument("--pairs", action="store_true", help="two probes at a time (each loads the other)")
    parser.add_argument("--cli", action="store_true", help="whole `gptctl pretrain` runs instead of probes")
    parser.add_argument("--cost", action="store_true", help="time CNR on against off instead")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--timed", type=int, default=10, help="--cost: timed steps per process")
    parser.add_argument("--data-root", type=Path, default=None, help="a prepared data root (default: prepare Shakespeare)")
    parser.add_argument("--probe", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe is not None:
        probe(args.probe, args.steps, args.model, args.timed)
        return
    command = "python benchmarks/exactness.py " + " ".join(sys.argv[1:])
    print_header("exactness", command)
    with tempfile.TemporaryDirectory(prefix="exactness-data-") as tmp:
        data_root = prepare_shakespeare(Path(tmp), args.data_root)
        if args.cost:
            cost(data_root, args.rounds, args.model, args.timed)
        elif args.cli:
            cli_runs(data_root, args.reps, args.busy)
        else:
            bits(data_root, args.reps, args.busy, args.pairs)
    print_footer()


if __name__ == "__main__":
    main()
