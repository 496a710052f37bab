"""Documents from local files (`--input`), format chosen by suffix:

  * .jsonl / .json -- JSON lines, one object per non-blank line with a string field `text`;
  * .parquet       -- column `text`, read with pyarrow in record batches (null counts as empty);
  * anything else  -- UTF-8 text; the whole file is ONE document (read whole: for big corpora use JSONL/Parquet).

Every line/row/file is one record, empty ones included, so a resumed prepare can skip records by count.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from gptctl.errors import UserError

BATCH_DOCS = 1024


def input_format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    return "text"


def check_files(paths: list[Path], option: str) -> None:
    if not paths:
        raise UserError(f"{option}: give at least one file")
    for path in paths:
        if not path.exists():
            raise UserError(f"{option}: {path} does not exist")
        if not path.is_file():
            raise UserError(f"{option}: {path} is not a file")


def file_fingerprint(path: Path) -> dict:
    """What must not change between an interrupted prepare and its resumption."""
    stat = path.stat()
    return {"path": str(path.resolve()), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


# --- readers: each yields (texts of a batch of records, input bytes consumed) ------------------------


def _read_text(path: Path) -> Iterator[tuple[list[str], int]]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"--input: {path} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    yield [text], path.stat().st_size


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
            batch.append(text)
            if len(batch) >= BATCH_DOCS:
                yield batch, nbytes
                batch, nbytes = [], 0
    yield batch, nbytes


def _read_parquet(path: Path) -> Iterator[tuple[list[str], int]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow raises several unrelated types for a bad file
        raise UserError(f"--input: {path} is not a readable Parquet file ({exc})") from None
    if "text" not in pf.schema_arrow.names:
        raise UserError(f"--input: {path} has no column 'text' (columns: {', '.join(pf.schema_arrow.names)})")
    size = path.stat().st_size
    rows = max(pf.metadata.num_rows, 1)
    done = 0
    for batch in pf.iter_batches(columns=["text"], batch_size=BATCH_DOCS):
        texts = [t or "" for t in batch.column(0).to_pylist()]
        if any(not isinstance(t, str) for t in texts):
            raise UserError(f"--input: {path} column 'text' is not a string column")
        advance = size * batch.num_rows // rows
        done += advance
        yield texts, advance
    if size > done:
        yield [], size - done


READERS = {"text": _read_text, "jsonl": _read_jsonl, "parquet": _read_parquet}


class LocalFiles:
    """The --input files' records in order. Resumes by counting records (state is always None)."""

    def __init__(self, paths: list[Path]):
        check_files(paths, "--input")
        self.paths = paths

    def open(self) -> None:
        """Nothing to open: the files are read as batches are asked for."""

    def fingerprint(self) -> dict:
        return {"--input": [file_fingerprint(p) for p in self.paths]}

    def describe(self) -> dict:
        return {"kind": "files", "inputs": [{"path": str(p.resolve()), "format": input_format(p)} for p in self.paths]}

    def total_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.paths)

    def batches(self, state: None) -> Iterator[tuple[None, list[str], int]]:
        for path in self.paths:
            for texts, nbytes in READERS[input_format(path)](path):
                yield None, texts, nbytes
