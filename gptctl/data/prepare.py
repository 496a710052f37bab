"""Tokenize local text/JSONL/Parquet files into uint16 .npy shards plus manifest.json.

Inputs (format chosen by suffix):
  * .jsonl / .json -- JSON lines, one object per line with a string field `text` (one document per line);
  * .parquet       -- column `text`, read with pyarrow in record batches (null rows skipped);
  * anything else  -- UTF-8 text; the whole file is ONE document.
Empty documents are skipped.

Token stream: each document is encoded with `encode_ordinary` (special-token text is not special)
and FOLLOWED by the <|endoftext|> token (50256). build-nanogpt puts EOT *before* each document
instead; for training on the concatenated stream the difference is one token at each end.

Split: the stream is the inputs' documents in order; the LAST `val_fraction` of its tokens becomes
the "val" split and the rest "train" (so a single file like tiny Shakespeare yields both splits; the
cut can fall mid-document). Each split is cut into shards of at most `shard_size` tokens, named
`{name}_{train|val}_{index:06d}.npy` (np.save of a 1-D uint16 array, so np.load(mmap_mode="r") works),
with the index counting from 0 within each split.

Writing: the stream is first appended to a hidden temporary file in `data_root` (so memory holds at
most one batch of documents, or one shard while slicing), then each shard is written to a temp file and
os.replace'd into place, and manifest.json is written last, also atomically. A failure before the
shards are written leaves `data_root` as it was.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from gptctl.errors import UserError
from gptctl.data.shards import MANIFEST
from gptctl.data.tokenizer import EOT_TOKEN, get_encoding, resolve_name

DEFAULT_SHARD_SIZE = 100_000_000
DEFAULT_VAL_FRACTION = 0.1
_BATCH_DOCS = 1024

# on_progress(documents_done_delta, bytes_done_delta)
ProgressFn = Callable[[int, int], None]


@dataclass
class PrepareOptions:
    inputs: list[Path]
    data_root: Path
    name: str | None = None
    tokenizer: str = "gpt2"
    val_fraction: float = DEFAULT_VAL_FRACTION
    shard_size: int = DEFAULT_SHARD_SIZE
    force: bool = False


def input_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def existing_outputs(data_root: Path) -> list[Path]:
    """manifest.json and *.npy files directly in data_root (what --force removes)."""
    if not data_root.is_dir():
        return []
    found = sorted(data_root.glob("*.npy"))
    if (data_root / MANIFEST).exists():
        found.insert(0, data_root / MANIFEST)
    return found


def validate(opts: PrepareOptions) -> str:
    """Check every option before anything is written; return the dataset name."""
    if not opts.inputs:
        raise UserError("--input: give at least one input file")
    for path in opts.inputs:
        if not path.exists():
            raise UserError(f"--input: {path} does not exist")
        if not path.is_file():
            raise UserError(f"--input: {path} is not a file")
    if not (0.0 < opts.val_fraction < 1.0):
        raise UserError(f"--val-fraction: must be between 0 and 1 (exclusive), got {opts.val_fraction}")
    if opts.shard_size <= 0:
        raise UserError(f"--shard-size: must be a positive number of tokens, got {opts.shard_size}")
    if opts.shard_size > 2**31:
        raise UserError(f"--shard-size: at most {2**31} tokens per shard, got {opts.shard_size}")
    resolve_name(opts.tokenizer)
    name = opts.name if opts.name is not None else opts.inputs[0].stem
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise UserError(f"--name: {name!r} is not a usable file-name prefix")
    if opts.data_root.exists() and not opts.data_root.is_dir():
        raise UserError(f"--data-root: {opts.data_root} exists and is not a directory")
    old = existing_outputs(opts.data_root)
    if old and not opts.force:
        raise UserError(
            f"--data-root: {opts.data_root} already holds a dataset ({old[0].name}"
            f"{f' and {len(old) - 1} more' if len(old) > 1 else ''}); pass --force to replace it"
        )
    return name


def total_input_bytes(inputs: list[Path]) -> int:
    return sum(p.stat().st_size for p in inputs)


# --- readers: each yields (list of documents, bytes consumed) -------------------------------------


def _read_text(path: Path) -> Iterator[tuple[list[str], int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--input: {path} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    yield ([text] if text else []), path.stat().st_size


def _read_jsonl(path: Path) -> Iterator[tuple[list[str], int]]:
    batch: list[str] = []
    nbytes = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            nbytes += len(raw)
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except ValueError as exc:
                raise UserError(f"--input: {path}:{lineno} is not valid JSON ({exc})") from None
            text = obj.get("text") if isinstance(obj, dict) else None
            if not isinstance(text, str):
                raise UserError(f"--input: {path}:{lineno} has no string field 'text'")
            if text:
                batch.append(text)
            if len(batch) >= _BATCH_DOCS:
                yield batch, nbytes
                batch, nbytes = [], 0
    yield batch, nbytes


def _read_parquet(path: Path) -> Iterator[tuple[list[str], int]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:
        raise UserError(f"--input: {path} is not a readable Parquet file ({exc})") from None
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"--input: {path} has no column 'text' (columns: {', '.join(pf.schema_arrow.names)})")
    size = path.stat().st_size
    rows = max(pf.metadata.num_rows, 1)
    done = 0
    for batch in pf.iter_batches(columns=["text"], batch_size=_BATCH_DOCS):
        texts = [t for t in batch.column(0).to_pylist() if t]
        if any(not isinstance(t, str) for t in texts):
            raise UserError(f"--input: {path} column 'text' is not a string column")
        advance = size * batch.num_rows // rows
        done += advance
        yield texts, advance
    if size > done:
        yield [], size - done


READERS = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}


# --- writing ---------------------------------------------------------------------------------------


def _atomic_save(path: Path, array) -> None:
    import numpy as np

    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare(opts: PrepareOptions, on_progress: ProgressFn | None = None) -> dict:
    """Tokenize opts.inputs into shards under opts.data_root; return the manifest written."""
    import numpy as np

    name = validate(opts)
    enc = get_encoding(opts.tokenizer)
    data_root = opts.data_root
    created_root = not data_root.exists()
    data_root.mkdir(parents=True, exist_ok=True)
    stream_path = data_root / f".{name}.tokens.tmp"
    sources = []
    try:
        total = 0
        with stream_path.open("wb") as stream:
            for path in opts.inputs:
                fmt = input_format(path)
                docs = 0
                for texts, nbytes in READERS[fmt](path):
                    if texts:
                        for tokens in enc.encode_ordinary_batch(texts):
                            tokens.append(EOT_TOKEN)
                            np.asarray(tokens, dtype=np.uint16).tofile(stream)
                            total += len(tokens)
                        docs += len(texts)
                    if on_progress:
                        on_progress(len(texts), nbytes)
                sources.append({"path": str(path.resolve()), "format": fmt, "documents": docs})
        if total < 2:
            raise UserError("--input: the inputs hold too little text to make a train and a val split")
        n_val = min(max(int(total * opts.val_fraction), 1), total - 1)
        n_train = total - n_val

        # Only now touch what was there before.
        if opts.force:
            for old in existing_outputs(data_root):
                old.unlink()

        stream_tokens = np.memmap(stream_path, dtype=np.uint16, mode="r")
        shards = []
        for split, start, end in (("train", 0, n_train), ("val", n_train, total)):
            for index, lo in enumerate(range(start, end, opts.shard_size)):
                hi = min(lo + opts.shard_size, end)
                file = f"{name}_{split}_{index:06d}.npy"
                _atomic_save(data_root / file, np.ascontiguousarray(stream_tokens[lo:hi]))
                shards.append({"file": file, "split": split, "tokens": int(hi - lo)})
        del stream_tokens

        manifest = {
            "format": 1,
            "name": name,
            "tokenizer": resolve_name(opts.tokenizer),
            "eot_token": EOT_TOKEN,
            "eot_position": "after",
            "sources": sources,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "shards": shards,
            "train_tokens": int(n_train),
            "val_tokens": int(n_val),
        }
        _atomic_write_text(data_root / MANIFEST, json.dumps(manifest, indent=2) + "\n")
        return manifest
    except BaseException:
        if created_root and data_root.is_dir() and not any(p != stream_path for p in data_root.iterdir()):
            stream_path.unlink(missing_ok=True)
            data_root.rmdir()
        raise
    finally:
        stream_path.unlink(missing_ok=True)
