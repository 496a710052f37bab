"""Instruction data for finetuning: databricks-dolly-15k (or a local file in its schema), tokenized with masks.

Each example becomes the tokens of `format_prompt(instruction, context)` followed by the response
and <|endoftext|>; `prompt_len` says how many of them are prompt, which the loss never counts.
An example longer than the context (seq_len + 1 tokens, since inputs and targets are shifted by
one) loses prompt tokens from the left; if its response alone does not fit beside at least
MIN_PROMPT_TOKENS of prompt, it is skipped and counted. The held-out split is a seeded
permutation, so it is the same on every rank and on every resume.

The tokenized set is written into the run directory once, so a resumed finetune never depends
on the hub again and always sees exactly the same examples.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gptctl.atomic import atomic_write
from gptctl.errors import UserError
from gptctl.prompt import format_prompt

DOLLY_HUB_NAME = "databricks/databricks-dolly-15k"
FIELDS = ("instruction", "context", "response")
MIN_PROMPT_TOKENS = 16
DATA_FILE = "sft_data.npz"


@dataclass
class Split:
    tokens: "np.ndarray"  # uint16, all examples concatenated  # noqa: F821
    offsets: "np.ndarray"  # int64, example i is tokens[offsets[i]:offsets[i+1]]  # noqa: F821
    prompt_lens: "np.ndarray"  # int32  # noqa: F821

    def __len__(self) -> int:
        return len(self.prompt_lens)


@dataclass
class InstructionData:
    train: Split
    val: Split
    skipped: int  # examples whose response does not fit the context


def load_records(dataset_path: Path | None) -> Iterator[tuple[str, dict]]:
    """(where, record) of each example, `where` naming it for error messages. A local JSONL file is read here,
    line by line, so a bad line is named by its number; the hub dataset and other files come through `datasets`."""
    if dataset_path is not None and dataset_path.suffix.lower() == ".jsonl":
        return _read_jsonl(dataset_path)
    ds = _load_dataset(dataset_path)
    return ((f"{dataset_path or DOLLY_HUB_NAME} record {i + 1}", r) for i, r in enumerate(ds))


def _read_jsonl(path: Path) -> Iterator[tuple[str, dict]]:
    try:
        with path.open("rb") as f:
            for lineno, raw in enumerate(f, 1):
                if not raw.strip():
                    continue
                try:
                    record = json.loads(raw)
                except ValueError as exc:
                    raise UserError(f"--dataset-path: {path}:{lineno} is not valid JSON ({exc})") from None
                if not isinstance(record, dict):
                    raise UserError(f"--dataset-path: {path}:{lineno} is not a JSON object; expected Dolly's schema "
                                    f"({', '.join(FIELDS)})")
                yield f"{path}:{lineno}", record
    except OSError as exc:
        raise UserError(f"--dataset-path: cannot read {path} ({exc.strerror})") from None


def check_record(where: str, record: dict) -> None:
    """Instruction and response are text (empty ones are skipped, not refused); context is text or absent."""
    for field in FIELDS:
        value = record.get(field)
        if field != "context" and field not in record:
            raise UserError(f"--dataset-path: {where} has no field {field!r}; expected Dolly's schema: {', '.join(FIELDS)}")
        if value is not None and not isinstance(value, str):
            raise UserError(f"--dataset-path: {where} field {field!r} is a {type(value).__name__} "
                            f"({json.dumps(value)[:40]}), not text")


def _load_dataset(dataset_path: Path | None):
    from datasets import load_dataset

    try:
        if dataset_path is None:
            ds = load_dataset(DOLLY_HUB_NAME, split="train")
        else:
            builder = "parquet" if dataset_path.suffix == ".parquet" else "json"
            ds = load_dataset(builder, data_files=str(dataset_path), split="train")
    except Exception as exc:  # offline hub, unreadable file: both are the user's to fix
        where = dataset_path or DOLLY_HUB_NAME
        raise UserError(f"--dataset-path: could not load {where} ({type(exc).__name__}: {str(exc).splitlines()[0]}); "
                        "pass a local JSONL file in Dolly's schema") from None
    missing = [f for f in ("instruction", "response") if f not in ds.column_names]
    if missing:
        raise UserError(f"--dataset-path: {dataset_path} lacks field(s) {', '.join(missing)}; "
                        f"expected Dolly's schema: {', '.join(FIELDS)}")
    return ds


def encode_example(enc, instruction: str, context: str | None, response: str, seq_len: int) -> tuple[list[int], int] | None:
    """(tokens, prompt_len) for one example, cut to seq_len + 1 tokens, or None when it cannot fit."""
    prompt = enc.encode_ordinary(format_prompt(instruction, context))
    answer = enc.encode_ordinary(response.strip()) + [enc.eot_token]
    room = seq_len + 1 - len(answer)
    if room < min(MIN_PROMPT_TOKENS, len(prompt)):
        return None
    prompt = prompt[-room:] if len(prompt) > room else prompt
    return prompt + answer, len(prompt)


def build(dataset_path: Path | None, seq_len: int, val_fraction: float, seed: int) -> InstructionData:
    import numpy as np

    from gptctl.data.tokenizer import get_encoding

    enc = get_encoding("gpt2")
    examples, skipped = [], 0
    for where, r in load_records(dataset_path):
        check_record(where, r)
        if not (r.get("instruction") or "").strip() or not (r.get("response") or "").strip():
            skipped += 1
            continue
        encoded = encode_example(enc, r["instruction"], r.get("context"), r["response"], seq_len)
        if encoded is None:
            skipped += 1
        else:
            examples.append(encoded)
    n_val = max(1, round(len(examples) * val_fraction))
    if len(examples) - n_val < 1:
        raise UserError(f"--dataset-path: only {len(examples)} usable example(s); need at least 2 (one to train, one for val)")
    order = np.random.default_rng(seed).permutation(len(examples))
    val_idx, train_idx = sorted(order[:n_val]), sorted(order[n_val:])
    return InstructionData(_pack([examples[i] for i in train_idx]), _pack([examples[i] for i in val_idx]), skipped)


def _pack(examples: list[tuple[list[int], int]]) -> Split:
    import numpy as np

    lengths = np.array([len(t) for t, _ in examples], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    tokens = np.fromiter((tok for t, _ in examples for tok in t), dtype=np.uint16, count=int(offsets[-1]))
    return Split(tokens, offsets, np.array([p for _, p in examples], dtype=np.int32))


def save(data: InstructionData, directory: Path) -> Path:
    """Atomically write the tokenized set as one .npz in `directory`."""
    import numpy as np

    path = directory / DATA_FILE
    with atomic_write(path) as f:
        np.savez(f, skipped=data.skipped, **{f"{name}_{field}": getattr(getattr(data, name), field)
                                             for name in ("train", "val") for field in ("tokens", "offsets", "prompt_lens")})
    return path


def load(directory: Path) -> InstructionData:
    import numpy as np

    with np.load(directory / DATA_FILE, allow_pickle=False) as z:
        splits = {name: Split(z[f"{name}_tokens"], z[f"{name}_offsets"], z[f"{name}_prompt_lens"]) for name in ("train", "val")}
        return InstructionData(splits["train"], splits["val"], int(z["skipped"]))
