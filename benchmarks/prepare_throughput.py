"""Tokens/s of `gptctl data prepare`'s real code path with 1 and 2 worker processes, against plain
single-process `enc.encode_ordinary` over the same documents, measured in the same run.

The corpus is tiny Shakespeare split into its paragraphs (~7,200 documents, ~0.33M tokens) and
replicated --copies times, written as one Parquet file (--format jsonl: JSONL). The prepare rows call gptctl.data.prepare.prepare()
(reading, worker pool, ordered results, shard files and resume state included; --val-tokens so there is
no counting pass) and count the time from the call to the manifest. Each row is the best of --repeats
runs, which on a shared machine is the least disturbed one. The encode_ordinary_batch row answers
why workers call encode_ordinary per document. The last line is the fixed start-up cost inside each
prepare row (new worker pool, BPE load per worker), which a real corpus amortizes.

Reproduce (from the repository root, about 40 s):

    . .venv/bin/activate && TIKTOKEN_CACHE_DIR=../shared/tiktoken python benchmarks/prepare_throughput.py
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CORPUS = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"


def best_of(repeats: int, fn) -> tuple[float, int]:
    """(fastest wall time, tokens) over `repeats` calls of fn() -> tokens."""
    runs = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        runs.append((time.perf_counter() - start, tokens))
    return min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS)
    parser.add_argument("--copies", type=int, default=6, help="replicate the paragraphs this many times")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--format", choices=["parquet", "jsonl"], default="parquet",
                        help="input file format (FineWeb-Edu ships Parquet; JSONL costs a json.loads per line)")
    args = parser.parse_args()

    import pyarrow as pa
    import pyarrow.parquet as pq

    from gptctl.data.encode import encode_in_order
    from gptctl.data.prepare import PrepareOptions, prepare
    from gptctl.data.tokenizer import get_encoding

    enc = get_encoding("gpt2")
    docs = [p for p in args.corpus.read_text(encoding="utf-8").split("\n\n") if p] * args.copies
    work = Path(tempfile.mkdtemp(prefix="gptctl-bench-"))
    try:
        corpus = work / f"docs.{args.format}"
        if args.format == "parquet":
            pq.write_table(pa.table({"text": docs}), corpus)
        else:
            corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")

        def encode_ordinary() -> int:
            return sum(len(enc.encode_ordinary(d)) + 1 for d in docs)  # +1: the EOT prepare appends

        def encode_ordinary_batch() -> int:
            return sum(len(t) + 1 for t in enc.encode_ordinary_batch(docs))

        def gptctl_prepare(workers: int):
            def run() -> int:
                root = work / f"out-{workers}"
                shutil.rmtree(root, ignore_errors=True)
                manifest = prepare(PrepareOptions(data_root=root, inputs=[corpus], val_tokens=1_000_000,
                                                  shard_size=100_000_000, workers=workers))
                return manifest["train_tokens"] + manifest["val_tokens"]
            return run

        rows = [
            ("encode_ordinary, 1 process (baseline)", best_of(args.repeats, encode_ordinary)),
            ("encode_ordinary_batch, 1 process, 8 threads", best_of(args.repeats, encode_ordinary_batch)),
            ("gptctl prepare --workers 1", best_of(args.repeats, gptctl_prepare(1))),
            ("gptctl prepare --workers 2", best_of(args.repeats, gptctl_prepare(2))),
        ]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    # Fixed cost inside each prepare row: a new pool of workers, each loading the BPE (fork server warm).
    startup = best_of(args.repeats, lambda: len(list(encode_in_order([(None, ["warm up"])], "gpt2", 2))))[0]

    tokens = {n for _, (_, n) in rows}
    assert len(tokens) == 1, f"the methods disagree on the token count: {rows}"
    baseline = rows[0][1][1] / rows[0][1][0]
    print(f"{len(docs):,} documents ({args.format}), {tokens.pop():,} tokens; best of {args.repeats}; "
          f"os.cpu_count()={os.cpu_count()}, load average {os.getloadavg()[0]:.1f} (others share this machine)")
    print(f"{'method':46} {'seconds':>8} {'tokens/s':>12} {'vs baseline':>12}")
    for label, (seconds, n) in rows:
        rate = n / seconds
        print(f"{label:46} {seconds:8.2f} {rate:12,.0f} {rate / baseline:11.2f}x")
    print(f"of which worker start-up (2 workers, one tiny batch): {startup:.2f} s")


if __name__ == "__main__":  # the prepare workers are spawned and re-import this module
    main()
