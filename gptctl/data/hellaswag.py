"""HellaSwag (Zellers et al., 2019): the validation set's 10,042 four-way completions, in rowanz/hellaswag's JSONL.

Each line holds `ctx`, `endings` (4 strings) and `label` (the index of the right ending). The file is
downloaded once into the cache directory; --hellaswag-file gives a local copy (or a subset) instead.
tiktoken is only touched through the encoding passed to `encode`.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from gptctl.atomic import atomic_write
from gptctl.data.tokenizer import EOT_TOKEN
from gptctl.errors import UserError

HELLASWAG_VAL_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
HELLASWAG_URL_ENV = "GPTCTL_HELLASWAG_URL"  # a mirror, e.g. inside a firewall
CACHE_ENV = "GPTCTL_CACHE"
NUM_ENDINGS = 4


@dataclass(frozen=True)
class Item:
    ctx: str
    endings: tuple[str, ...]
    label: int


@dataclass(frozen=True)
class EncodedItem:
    context: list[int]
    endings: list[list[int]]
    label: int


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "gptctl")


def fetch_val_file() -> Path:
    """The cached validation file, downloaded on first use; an interrupted download leaves no file behind."""
    url = os.environ.get(HELLASWAG_URL_ENV) or HELLASWAG_VAL_URL
    path = cache_dir() / "hellaswag" / "hellaswag_val.jsonl"
    if path.is_file():
        return path
    import urllib.request

    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"downloading {url} to {path}", file=sys.stderr)
    try:
        with urllib.request.urlopen(url, timeout=30) as response, atomic_write(path) as f:
            while chunk := response.read(1 << 20):
                f.write(chunk)
    except OSError as exc:  # URLError, timeouts, HTTP errors, a full disk
        reason = getattr(exc, "reason", exc)
        raise UserError(f"--hellaswag-file: cannot download {url} ({reason}); without network pass a local copy "
                        "in HellaSwag's JSONL schema (ctx, endings, label): --hellaswag-file FILE") from None
    return path


def read_items(path: Path, limit: int | None = None, option: str = "--hellaswag-file") -> list[Item]:
    """The first `limit` items (all without one) of a JSONL file in HellaSwag's schema; UserError names the bad line."""
    if not path.is_file():
        raise UserError(f"{option}: {path} is not a file; give a JSONL file in HellaSwag's schema (ctx, endings, label)")
    items = []
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
                if limit is not None and len(items) == limit:
                    break
                if line.strip():
                    items.append(_parse(line, f"{option}: {path} line {number}"))
    except UnicodeDecodeError:
        raise UserError(f"{option}: {path} is not UTF-8 text; give a JSONL file in HellaSwag's schema") from None
    if not items:
        raise UserError(f"{option}: {path} holds no items; give a JSONL file in HellaSwag's schema (ctx, endings, label)")
    return items


def _parse(line: str, where: str) -> Item:
    try:
        record = json.loads(line)
    except ValueError as exc:
        raise UserError(f"{where}: not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with ctx, endings and label")
    ctx, endings, label = record.get("ctx"), record.get("endings"), record.get("label")
    if not isinstance(ctx, str):
        raise UserError(f"{where}: 'ctx' must be a string")
    if not (isinstance(endings, list) and len(endings) == NUM_ENDINGS and all(isinstance(e, str) for e in endings)):
        raise UserError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
    if isinstance(label, str) and label.isdigit():  # the Hugging Face copy stores it as a string
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise UserError(f"{where}: 'label' must be the index of the right ending, 0 to {NUM_ENDINGS - 1}")
    return Item(ctx, tuple(endings), label)


def encode(items: list[Item], enc) -> list[EncodedItem]:
    """Tokens as build-nanogpt renders them: the context, and each ending with a leading space."""
    encoded = []
    for item in items:
        # An empty context still needs a token to predict the ending's first token from: a document start.
        context = enc.encode_ordinary(item.ctx) or [EOT_TOKEN]
        encoded.append(EncodedItem(context, [enc.encode_ordinary(" " + e) for e in item.endings], item.label))
    return encoded

