"""Registry: the cost of recording metrics must not grow with the length of the run.

Reproduce:

    python benchmarks/registry_metrics.py --levels 1000,10000,100000,1000000 --batches 20 --batch-rows 50

One run in a fresh registry (opened by gptctl.registry.open_registry: WAL, synchronous=NORMAL)
is filled to each level of existing metric rows, then --batches calls of queries.write_metrics with
--batch-rows new steps each are timed, as the worker's RegistryMetrics flushes them (one transaction per
batch, every few seconds). Baseline: the first level. Filling between levels uses one executemany
per 10,000 rows of the same columns (untimed; only the measured batches go through gptctl's code).
"""

import argparse
import sys
import time
from pathlib import Path

from _common import median, print_footer, print_header, print_table, scratch_dir

TARGET_RATIO = 1.5  # "flat": the last level's per-row cost within 1.5× of the first's
COLUMNS = ["step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "mfu", "tokens_seen", "time"]
FILL_CHUNK = 10_000


def metric_row(step: int) -> dict:
    return {"step": step, "loss": 3.0 + 1.0 / step, "val_loss": 3.1 if step % 250 == 0 else None, "lr": 6e-4,
            "grad_norm": 1.0, "tokens_per_s": 1e5, "mfu": 0.4, "tokens_seen": step * 524288, "time": time.time()}


def new_run(db) -> str:
    from gptctl.registry import queries
    from gptctl.settings import TrainSettings

    run_id = queries.new_run_id(db)
    queries.insert_run(db, {"id": run_id, "name": "bench", "kind": "pretrain",
                            "settings": TrainSettings(model="tiny").model_dump_json(), "run_dir": f"/nonexistent/{run_id}",
                            "command": "registry_metrics.py", "max_steps": 10**9})
    return run_id


def fill(db, run_id: str, first_step: int, last_step: int) -> None:
    from gptctl.registry.db import transaction

    sql = f"insert into metrics (run_id, {', '.join(COLUMNS)}) values (?, {', '.join('?' * len(COLUMNS))})"
    for start in range(first_step, last_step + 1, FILL_CHUNK):
        stop = min(start + FILL_CHUNK, last_step + 1)
        with transaction(db):
            db.conn.executemany(sql, ([run_id, *(metric_row(s)[c] for c in COLUMNS)] for s in range(start, stop)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1000,10000,100000,1000000",
                        help="Existing rows before each measurement. (default: 1000,10000,100000,1000000)")
    parser.add_argument("--batches", type=int, default=20, help="Timed write_metrics calls per level. (default: 20)")
    parser.add_argument("--batch-rows", type=int, default=50, help="Rows per write_metrics call. (default: 50)")
    parser.add_argument("--dir", type=Path, default=None, help="Where the registry lives (its disk is measured). (default: /tmp)")
    args = parser.parse_args()
    levels = sorted(int(x) for x in args.levels.split(","))
    print_header("registry metrics", " ".join(["python", *sys.argv]))

    from gptctl.registry import open_registry, queries

    rows = []
    with scratch_dir(args.dir) as work:
        db = open_registry(work / "home")
        run_id = new_run(db)
        existing = 0
        for level in levels:
            fill(db, run_id, existing + 1, level)  # a no-op when the timed batches already passed the level
            existing = max(existing, level)
            per_row = []
            for _ in range(args.batches):
                batch = [metric_row(s) for s in range(existing + 1, existing + args.batch_rows + 1)]
                t0 = time.perf_counter()
                queries.write_metrics(db, run_id, batch)
                per_row.append((time.perf_counter() - t0) / args.batch_rows)
                existing += args.batch_rows
            rows.append([f"{level:,}", 1e6 * median(per_row), 1e6 * min(per_row), 1e6 * max(per_row),
                         1e3 * median(per_row) * args.batch_rows])
    base = rows[0][1]
    for row in rows:
        row.append(row[1] / base)
    print_table(f"write_metrics, {args.batches} batches of {args.batch_rows} rows per level; ratio against {rows[0][0]} rows",
                ["existing rows", "µs/row (median)", "min", "max", "ms/batch", "ratio"], rows)
    ratio = rows[-1][-1]
    print(f"\nlate/early per-row ratio: {ratio:.2f} (target ≤ {TARGET_RATIO}: {'met' if ratio <= TARGET_RATIO else 'not met'})")
    print_footer()


if __name__ == "__main__":
    main()
