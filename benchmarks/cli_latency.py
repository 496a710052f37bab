"""CLI latency: wall time of light gptctl commands against `python -c "import typer, rich"`.

Reproduce:

    python benchmarks/cli_latency.py --runs 100 --checkpoints-per-run 100 --metrics-per-run 1000 --repeats 5

The registry is built through gptctl.registry.queries: --runs completed runs, each with
--checkpoints-per-run registered checkpoints (10,000 by default) and --metrics-per-run metric rows
(an eval every 250 steps). Every checkpoint is a real 1 kB file in its run's checkpoints directory with
the registered size and sha256, because `ckpt list` first reconciles each run with the disk (a stat
per row, a glob per run); file size does not change that cost. Commands run as a user runs them:
the installed `gptctl` script, output to a pipe (rich renders the full table), GPTCTL_HOME set.
Each repeat runs every command once, in turn, so load changes hit all of them alike.
"""

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

from _common import cli_env, gptctl_command, median, print_footer, print_header, print_table, scratch_dir

BASELINE = "python -c 'import typer, rich' (baseline)"
COMMANDS = {
    BASELINE: [sys.executable, "-c", "import typer, rich"],
    "gptctl --help": [*gptctl_command(), "--help"],
    "gptctl runs list": [*gptctl_command(), "runs", "list"],
    "gptctl ckpt list": [*gptctl_command(), "ckpt", "list"],
    "gptctl ckpt list --json": [*gptctl_command(), "ckpt", "list", "--json"],  # the same work without the rich table
    "gptctl estimate": [*gptctl_command(), "estimate"],
}
EVAL_EVERY = 250


def build_registry(home: Path, runs: int, checkpoints_per_run: int, metrics_per_run: int) -> None:
    from gptctl.registry import open_registry, queries
    from gptctl.registry.db import transaction
    from gptctl.settings import TrainSettings

    db = open_registry(home)
    steps_between = max(metrics_per_run // max(checkpoints_per_run, 1), 1)
    for r in range(runs):
        run_id = queries.new_run_id(db)
        run_dir = home / f"run{r}-{run_id}"
        (run_dir / "checkpoints").mkdir(parents=True)
        settings = TrainSettings(model="tiny", run_name=f"run{r}", max_steps=metrics_per_run + 1, warmup_steps=0)
        queries.insert_run(db, {
            "id": run_id, "name": f"run{r}", "kind": "pretrain", "settings": settings.model_dump_json(),
            "run_dir": str(run_dir), "command": f"gptctl pretrain --run-name run{r}", "max_steps": settings.max_steps,
            "status": "completed", "started_at": queries.now(), "ended_at": queries.now(), "last_step": metrics_per_run,
        })
        with transaction(db):
            for c in range(1, checkpoints_per_run + 1):
                path = run_dir / "checkpoints" / f"model_{c * steps_between:05d}.pt"
                data = os.urandom(1024)
                path.write_bytes(data)
                queries.register_checkpoint(db, run_id, c * steps_between, path, len(data),
                                            hashlib.sha256(data).hexdigest(), pinned=False)
        queries.write_metrics(db, run_id, [
            {"step": s, "loss": 3.0, "lr": 6e-4, "grad_norm": 1.0, "tokens_per_s": 1e5, "tokens_seen": s * 512,
             "time": time.time(), **({"val_loss": 3.1} if s % EVAL_EVERY == 0 else {})}
            for s in range(1, metrics_per_run + 1)
        ])


def wall_time(cmd: list[str], env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr.decode()}")
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=100, help="Runs in the registry. (default: 100)")
    parser.add_argument("--checkpoints-per-run", type=int, default=100, help="Registered checkpoints (real files) per run. (default: 100)")
    parser.add_argument("--metrics-per-run", type=int, default=1000, help="Metric rows (steps) per run. (default: 1000)")
    parser.add_argument("--repeats", type=int, default=5, help="Times each command runs. (default: 5)")
    args = parser.parse_args()
    print_header("CLI latency", " ".join(["python", *sys.argv]))
    with scratch_dir() as work:
        home = work / "home"
        t0 = time.perf_counter()
        build_registry(home, args.runs, args.checkpoints_per_run, args.metrics_per_run)
        print(f"registry: {args.runs} runs, {args.runs * args.checkpoints_per_run:,} checkpoints (real files), "
              f"{args.runs * args.metrics_per_run:,} metric rows; built in {time.perf_counter() - t0:.1f} s")
        env = cli_env(home)
        wall_time(COMMANDS["gptctl ckpt list --json"], env)  # untimed: the first look may reconcile; warms the page cache
        times: dict[str, list[float]] = {name: [] for name in COMMANDS}
        for _ in range(args.repeats):
            for name, cmd in COMMANDS.items():
                times[name].append(wall_time(cmd, env))
    base = median(times[BASELINE])
    rows = [[name, median(values), min(values), max(values), median(values) / base] for name, values in times.items()]
    print_table(f"wall seconds over {args.repeats} repeats; ratio = median / baseline median",
                ["command", "median s", "min s", "max s", "ratio"], rows)
    print_footer()


if __name__ == "__main__":
    main()
