"""Tokenize a corpus into uint16 .npy shards plus manifest.json, with all cores, resumably.

Sources: local files (`--input`, gptctl/data/local_files.py), or a named one (gptctl/data/sources.py):
`fineweb-edu` streamed from the Hub with `datasets` (or local files with its schema, `--data-files`) and
`tinyshakespeare` downloaded from karpathy/char-rnn.

Token stream: each document is encoded with `encode_ordinary` (special-token text is not special) and
FOLLOWED by <|endoftext|> (50256); empty documents add nothing. build-nanogpt puts EOT *before* each
document instead; for training on the concatenated stream the difference is one token at each end.
Worker processes encode batches of documents; results are used in input order, so the stream is the
same for any --workers (gptctl/data/encode.py). --max-tokens cuts the stream after that many tokens.

Split, one of:
  * --val-tokens N: the FIRST N tokens are val, the rest train. fineweb-edu's default: one shard
    (--shard-size), or a tenth of --max-tokens if smaller -- exactly build-nanogpt's fineweb.py, whose
    shard 0 (the first 100M tokens) is val.
  * --val-fraction F (local files and tinyshakespeare; default 0.1): the LAST F of the tokens are val,
    as nanoGPT's shakespeare prepare does. The cut needs the total, so the inputs are tokenized twice:
    once to count, once to write (pass --val-tokens to skip the count). A streamed source has no total.
Shards hold at most --shard-size tokens and never straddle the split (gptctl/data/writer.py).

Writing and resuming: shards are written while the stream goes, each atomically; the resume state
(gptctl/data/resume.py) is written before the first and replaced after each; manifest.json comes last
and the state is removed. Rerunning
the same command continues after the last finished shard, and never rewrites a finished one; different
arguments are refused unless --force, which starts over. A failure (not a kill) before the first shard
is finished leaves --data-root as it was. One prepare at a time per data root (a lock file).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from gptctl.atomic import TMP_PREFIX, write_text_atomic
from gptctl.data.resume import (
    STATE_FILE, Batch, Position, batches_from, mismatch, new_state, read_state, write_state,
)
from gptctl.data.shards import MANIFEST, manifest_fingerprint
from gptctl.digest import sha256_of
from gptctl.data.tokenizer import EOT_TOKEN, get_encoding, resolve_name
from gptctl.errors import UserError

DEFAULT_SHARD_SIZE = 100_000_000
DEFAULT_VAL_FRACTION = 0.1
SOURCES = ("fineweb-edu", "tinyshakespeare")

# on_progress(phase, tokens, done, total): `done`/`total` count tokens when their total is known
# (--max-tokens, or counted), else input bytes for local files; total None when neither is known.
ProgressFn = Callable[[str, int, int, "int | None"], None]


@dataclass
class PrepareOptions:
    data_root: Path
    inputs: list[Path] = field(default_factory=list)
    source: str | None = None  # None: the --input files
    data_files: list[Path] = field(default_factory=list)
    subset: str | None = None
    max_tokens: int | None = None
    name: str | None = None
    tokenizer: str = "gpt2"
    val_fraction: float | None = None
    val_tokens: int | None = None
    shard_size: int = DEFAULT_SHARD_SIZE
    workers: int | None = None  # None: os.cpu_count()
    force: bool = False


@dataclass
class Plan:
    """Validated options, the opened source, and the interrupted prepare to resume (if any)."""

    opts: PrepareOptions
    name: str
    source: object
    val_tokens: int | None
    val_fraction: float | None
    workers: int
    arguments: dict
    resume: dict | None


_COUNT = re.compile(r"^(\d+(?:\.\d+)?)([kmbg]?)$")
_SCALE = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_count(value: str, option: str) -> int:
    """'100000000', '100_000_000', '100M', '1.5B' -> int; UserError naming `option` otherwise."""
    match = _COUNT.match(value.strip().lower().replace("_", "").replace(",", ""))
    if not match:
        raise UserError(f"{option}: {value!r} is not a count; write e.g. 100000000, 100M or 1.5B")
    return int(float(match.group(1)) * _SCALE[match.group(2)])


def existing_outputs(data_root: Path) -> list[Path]:
    """manifest.json and *.npy files directly in data_root (what --force removes)."""
    if not data_root.is_dir():
        return []
    found = sorted(data_root.glob("*.npy"))
    if (data_root / MANIFEST).exists():
        found.insert(0, data_root / MANIFEST)
    return found


def _remove_outputs(data_root: Path) -> None:
    for path in [*existing_outputs(data_root), data_root / STATE_FILE, *data_root.glob(TMP_PREFIX + "*")]:
        path.unlink(missing_ok=True)


# --- validation: everything is checked before anything is written -----------------------------------


def _check_source_choice(opts: PrepareOptions) -> None:
    if opts.source is not None and opts.source not in SOURCES:
        raise UserError(
            f"SOURCE: unknown source {opts.source!r}; choose {' or '.join(SOURCES)}, or give local files with --input FILE"
        )
    if opts.source and opts.inputs:
        raise UserError(f"--input: not used with SOURCE {opts.source}; give either a SOURCE or --input files")
    if not opts.source and not opts.inputs:
        raise UserError(f"--input: give a SOURCE ({', '.join(SOURCES)}) or at least one --input FILE")
    if opts.source != "fineweb-edu":
        if opts.subset is not None:
            raise UserError("--subset: only the fineweb-edu source has subsets")
        if opts.data_files:
            raise UserError("--data-files: only for the fineweb-edu source; other local files go in --input")
    elif opts.subset is not None and opts.data_files:
        raise UserError("--subset: not used with --data-files (the files are the data); drop one of them")
    elif opts.subset is not None and not re.fullmatch(r"[A-Za-z0-9][\w.-]*", opts.subset):
        raise UserError(f"--subset: {opts.subset!r} is not a config name such as sample-10BT")


def _check_numbers(opts: PrepareOptions) -> None:
    if not 0 < opts.shard_size <= 2**31:
        raise UserError(f"--shard-size: must be between 1 and {2**31} tokens, got {opts.shard_size}")
    if opts.max_tokens is not None and opts.max_tokens < 2:
        raise UserError(f"--max-tokens: must be at least 2 (a train and a val token), got {opts.max_tokens}")
    if opts.workers is not None and opts.workers < 1:
        raise UserError(f"--workers: must be at least 1, got {opts.workers}")


def _val_split(opts: PrepareOptions) -> tuple[int | None, float | None]:
    """(val_tokens, val_fraction), exactly one of them set."""
    if opts.val_fraction is not None and opts.val_tokens is not None:
        raise UserError("--val-tokens: not used with --val-fraction; give one of them")
    if opts.val_tokens is not None:
        if opts.val_tokens < 1:
            raise UserError(f"--val-tokens: must be a positive number of tokens, got {opts.val_tokens}")
        if opts.max_tokens is not None and opts.val_tokens >= opts.max_tokens:
            raise UserError(
                f"--val-tokens: {opts.val_tokens} val tokens leave no train tokens within --max-tokens {opts.max_tokens}"
            )
        return opts.val_tokens, None
    if opts.source == "fineweb-edu":
        if opts.val_fraction is not None:
            raise UserError("--val-fraction: fineweb-edu is streamed, so its total is unknown; use --val-tokens N")
        first_shard = opts.shard_size if opts.max_tokens is None else min(opts.shard_size, opts.max_tokens // 10)
        return max(first_shard, 1), None
    fraction = DEFAULT_VAL_FRACTION if opts.val_fraction is None else opts.val_fraction
    if not 0.0 < fraction < 1.0:
        raise UserError(f"--val-fraction: must be between 0 and 1 (exclusive), got {fraction}")
    return None, fraction


def _check_data_root(opts: PrepareOptions) -> dict | None:
    """The interrupted prepare in data_root, if any; UserError when data_root holds something else."""
    root = opts.data_root
    if root.exists() and not root.is_dir():
        raise UserError(f"--data-root: {root} exists and is not a directory")
    if opts.force or not root.is_dir():
        return None
    old = existing_outputs(root)
    state = read_state(root)
    if (root / MANIFEST).exists() or (old and state is None):
        raise UserError(
            f"--data-root: {root} already holds a dataset ({old[0].name}"
            f"{f' and {len(old) - 1} more' if len(old) > 1 else ''}); pass --force to replace it"
        )
    return state


def _make_source(opts: PrepareOptions):
    from gptctl.data.local_files import LocalFiles
    from gptctl.data.sources import FineWebEdu, TinyShakespeare

    if opts.source == "fineweb-edu":
        return FineWebEdu(opts.subset, opts.data_files)
    if opts.source == "tinyshakespeare":
        return TinyShakespeare()
    return LocalFiles(opts.inputs)


def validate(opts: PrepareOptions) -> Plan:
    """Check every option (and open the source: download, Hub) before anything is written."""
    _check_source_choice(opts)
    _check_numbers(opts)
    val_tokens, val_fraction = _val_split(opts)
    tokenizer = resolve_name(opts.tokenizer)
    get_encoding(opts.tokenizer)  # a missing vocabulary file is a one-line error here, not in every worker
    default_name = {"fineweb-edu": "edufineweb", "tinyshakespeare": "tinyshakespeare"}
    name = opts.name if opts.name is not None else default_name.get(opts.source) or opts.inputs[0].stem
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise UserError(f"--name: {name!r} is not a usable file-name prefix")
    resume = _check_data_root(opts)
    source = _make_source(opts)  # opened once the arguments are known to fit a prepare to resume
    arguments = {
        "SOURCE": opts.source or "files", **source.fingerprint(), "--name": name, "--tokenizer": tokenizer,
        "--shard-size": opts.shard_size, "--max-tokens": opts.max_tokens,
        "--val-tokens": val_tokens, "--val-fraction": val_fraction,
    }
    if resume is not None and (differs := mismatch(resume.get("arguments", {}), arguments)):
        raise UserError(
            f"--data-root: {opts.data_root} holds an unfinished prepare started with other arguments ({differs} "
            "differs); rerun that command to resume it, or pass --force to start over"
        )
    source.open()
    workers = opts.workers or os.cpu_count() or 1
    return Plan(opts, name, source, val_tokens, val_fraction, workers, arguments, resume)


# --- running --------------------------------------------------------------------------------------


class _Meter:
    def __init__(self, on_progress: ProgressFn | None, phase: str, tokens: int, total_tokens: int | None,
                 total_bytes: int | None):
        self.on_progress, self.phase, self.total_tokens, self.total_bytes = on_progress, phase, total_tokens, total_bytes
        self.bytes = 0
        self.update(tokens, 0)

    def update(self, tokens: int, nbytes: int) -> None:
        self.bytes += nbytes
        if self.on_progress is None:
            return
        if self.total_tokens is not None:
            self.on_progress(self.phase, tokens, tokens, self.total_tokens)
        elif self.total_bytes is not None:
            self.on_progress(self.phase, tokens, self.bytes, self.total_bytes)
        else:
            self.on_progress(self.phase, tokens, tokens, None)


def _count_tokens(plan: Plan, on_progress: ProgressFn | None) -> int:
    from gptctl.data.encode import encode_in_order

    limit = plan.opts.max_tokens
    meter = _Meter(on_progress, "counting tokens", 0, limit, plan.source.total_bytes())
    total = 0
    for batch, tokens, _ in encode_in_order(batches_from(plan.source, Position()), plan.opts.tokenizer, plan.workers):
        total += len(tokens)
        meter.update(total, batch.nbytes)
        if limit is not None and total >= limit:
            return limit
    if total < 2:
        raise UserError("--input: the inputs hold too little text to make a train and a val split")
    return total


def _consumed(batch: Batch, lengths: np.ndarray, starts: np.ndarray, taken: int) -> tuple[Position, int]:
    """Where the source stands after the first `taken` tokens of `batch`, and the documents begun so far in it."""
    ends = np.cumsum(lengths)
    whole = int(np.searchsorted(ends, taken, side="right"))  # records written completely (empty ones too)
    into = taken - (int(ends[whole - 1]) if whole else 0) + (batch.doc_tokens if whole == 0 else 0)
    begun = int(np.count_nonzero(starts & (ends - lengths < taken)))
    return Position(batch.state, batch.first_record + whole, into), begun


def _write(plan: Plan, state: dict, writer, stop_at: int | None, on_progress: ProgressFn | None) -> int:
    """Stream the source into `writer`, saving the resume state after every shard; return the documents written."""
    from gptctl.data.encode import encode_in_order

    root, documents = plan.opts.data_root, state["documents"]
    meter = _Meter(on_progress, "tokenizing", writer.tokens, stop_at, plan.source.total_bytes())
    batches = batches_from(plan.source, Position(**state["position"]))
    for batch, tokens, lengths in encode_in_order(batches, plan.opts.tokenizer, plan.workers):
        starts = lengths > 0
        if batch.doc_tokens:  # the first document was cut by the last finished shard and is counted already
            tokens = tokens[batch.doc_tokens :]
            lengths[0] -= batch.doc_tokens
            starts[0] = False
        if stop_at is not None:
            tokens = tokens[: stop_at - writer.tokens]
        taken = 0
        while taken < len(tokens):
            taken += writer.take(tokens[taken:])
            if writer.room() == 0 or writer.tokens == stop_at:
                writer.flush()
                position, begun = _consumed(batch, lengths, starts, taken)
                state.update(position=asdict(position), documents=documents + begun, shards=writer.shards)
                write_state(root, state)
        meter.update(writer.tokens, batch.nbytes)
        if writer.tokens == stop_at:
            return documents + _consumed(batch, lengths, starts, taken)[1]
        documents += int(np.count_nonzero(starts))
    writer.flush()
    return documents


def _finish(plan: Plan, writer, documents: int) -> dict:
    totals = {split: sum(s["tokens"] for s in writer.shards if s["split"] == split) for split in ("train", "val")}
    if not totals["train"]:
        _remove_outputs(plan.opts.data_root)  # unusable, and nothing left to resume
        raise UserError(
            f"--val-tokens: the data has only {totals['val']:,} tokens, all of them within the first "
            f"{plan.val_tokens:,} (val); lower --val-tokens (fineweb-edu's default is --shard-size)"
        )
    for shard in writer.shards:  # a prepare resumed from an older version's state: record what they are now
        if "sha256" not in shard:
            path = plan.opts.data_root / shard["file"]
            shard.update(bytes=path.stat().st_size, sha256=sha256_of(path))
    manifest = {
        "format": 1,
        "name": plan.name,
        "tokenizer": resolve_name(plan.opts.tokenizer),
        "eot_token": EOT_TOKEN,
        "eot_position": "after",
        "source": plan.source.describe(),
        "documents": documents,
        "val_position": "first" if plan.val_tokens is not None else "last",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "shards": writer.shards,
        "train_tokens": totals["train"],
        "val_tokens": totals["val"],
        "fingerprint": manifest_fingerprint(writer.shards),  # what a run records of its data (shards.fingerprint)
    }
    write_text_atomic(plan.opts.data_root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    (plan.opts.data_root / STATE_FILE).unlink(missing_ok=True)
    return manifest


def run(plan: Plan, on_progress: ProgressFn | None = None) -> dict:
    """Write (or finish writing) the shards and manifest that `plan` describes; return the manifest."""
    from gptctl.data.writer import ShardWriter
    from gptctl.registry.locks import LOCK_NAME, DirectoryLock

    root = plan.opts.data_root
    created_root = not root.exists()
    root.mkdir(parents=True, exist_ok=True)
    lock = DirectoryLock(root)
    if not lock.acquire():
        raise UserError(f"--data-root: another `gptctl data prepare` is writing to {root}; wait for it to finish")
    state = plan.resume
    for leftover in root.glob(TMP_PREFIX + "*"):  # a killed prepare's half-written file; we hold the lock
        leftover.unlink(missing_ok=True)
    try:
        if state is None:
            total = _count_tokens(plan, on_progress) if plan.val_fraction is not None else None
            _remove_outputs(root)  # --force's old dataset, or temporaries of a prepare killed early
            state = new_state(plan.arguments, total)
            write_state(root, state)  # from here on a killed prepare can be resumed, even before its first shard
        if plan.val_fraction is not None:
            total = state["total_tokens"]
            n_val = min(max(int(total * plan.val_fraction), 1), total - 1)
            segments, stop_at = [("train", total - n_val), ("val", n_val)], total
        else:
            segments, stop_at = [("val", plan.val_tokens), ("train", None)], plan.opts.max_tokens
        writer = ShardWriter(root, plan.name, plan.opts.shard_size, segments, state["shards"])
        documents = _write(plan, state, writer, stop_at, on_progress)
        manifest = _finish(plan, writer, documents)
        (root / LOCK_NAME).unlink(missing_ok=True)
        return manifest
    except BaseException:
        if state is not None and not state["shards"]:  # begun, but nothing finished: leave root as it was
            _remove_outputs(root)
        if created_root and not (root / STATE_FILE).exists():
            (root / LOCK_NAME).unlink(missing_ok=True)
            if not any(root.iterdir()):
                root.rmdir()
        raise
    finally:
        lock.release()


def prepare(opts: PrepareOptions, on_progress: ProgressFn | None = None) -> dict:
    """Validate `opts`, then tokenize the source into shards under opts.data_root; return the manifest.

    The workers are spawned processes, so a script calling this needs the usual
    `if __name__ == "__main__":` guard (Python's "safe importing of main module").
    """
    return run(validate(opts), on_progress)
