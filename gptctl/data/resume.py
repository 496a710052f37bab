"""Where an interrupted prepare stands, and how to continue it from there.

After each finished shard, `.gptctl-prepare.json` in the data root is replaced atomically. It holds the
arguments the prepare was started with, the finished shards, and the Position just after the shard's
last token: the source's own resume state, the records read since that state, and how many tokens of
the next record (a document cut by the shard boundary) were already written. Tokenization is
deterministic, so re-encoding that record and dropping those tokens continues the stream exactly.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from gptctl.atomic import write_text_atomic
from gptctl.errors import UserError

STATE_FILE = ".gptctl-prepare.json"


@dataclass
class Position:
    state: Any = None  # the source's resume state (datasets' state_dict), None: the start
    records: int = 0  # records to skip after `state`
    doc_tokens: int = 0  # tokens of the record after those already written


@dataclass
class Batch:
    """Where a batch of records starts in the source (the texts travel separately, to the workers)."""

    state: Any
    first_record: int  # records between `state` and this batch's first record
    doc_tokens: int  # tokens of the first record to drop (nonzero only right after a resume)
    nbytes: int


def batches_from(source, position: Position) -> Iterator[tuple[Batch, list[str]]]:
    """The source's batches of texts, starting exactly at `position`."""
    state, since, skip, doc_tokens, skipped_bytes = position.state, 0, position.records, position.doc_tokens, 0
    for batch_state, texts, nbytes in source.batches(position.state):
        if batch_state is not None:
            state, since = batch_state, 0
        if skip >= len(texts):  # also passes empty batches through the byte count
            skip -= len(texts)
            since += len(texts)
            skipped_bytes += nbytes
            continue
        yield Batch(state, since + skip, doc_tokens, skipped_bytes + nbytes), texts[skip:]
        since += len(texts)
        skip = doc_tokens = skipped_bytes = 0


def read_state(data_root: Path) -> dict | None:
    path = data_root / STATE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--data-root: cannot read {path} ({exc}); pass --force to start over") from None


def write_state(data_root: Path, state: dict) -> None:
    write_text_atomic(data_root / STATE_FILE, json.dumps(state, indent=1) + "\n")


def new_state(arguments: dict, total_tokens: int | None = None) -> dict:
    return {
        "format": 1,
        "arguments": arguments,
        "total_tokens": total_tokens,  # counted first when val is the last fraction
        "position": asdict(Position()),
        "documents": 0,
        "shards": [],
    }


def mismatch(saved: dict, arguments: dict) -> str | None:
    """The first option whose value differs between an interrupted prepare and this one, if any."""
    for key in sorted(set(saved) | set(arguments)):
        if saved.get(key) != arguments.get(key):
            return key
    return None
