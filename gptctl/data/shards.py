"""Find and memmap token shards. numpy only: imported by the training engine.

Two layouts are understood:
  * gptctl's own: `manifest.json` lists every shard file with its split ("train"/"val") and token count;
  * build-nanogpt's (no manifest): `*_train_*.npy` and `*_val_*.npy` files in the directory,
    e.g. `edufineweb_train_000001.npy` / `edufineweb_val_000000.npy`.
Shards are 1-D uint16 arrays written with np.save.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Callable

import numpy as np

from gptctl.errors import UserError

MANIFEST = "manifest.json"


def read_manifest(data_root: Path) -> dict | None:
    """The parsed manifest.json of `data_root`, or None when there is none."""
    path = Path(data_root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"--data-root: cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise UserError(f"--data-root: {path} is not a gptctl manifest (no 'shards' list)")
    for i, entry in enumerate(manifest["shards"]):
        problem = _shard_entry_problem(entry)
        if problem:
            raise UserError(f"--data-root: {path} shard entry {i} ({json.dumps(entry)[:60]}) {problem}; "
                            "re-run `gptctl data prepare --force`")
    return manifest


def _shard_entry_problem(entry) -> str | None:
    """What is wrong with one manifest entry, or None: an object naming a file inside the data root and its split."""
    if not isinstance(entry, dict):
        return "is not an object"
    file = entry.get("file")
    if not isinstance(file, str) or not file:
        return "has no 'file' name"
    if Path(file).is_absolute() or ".." in Path(file).parts:
        return "names a file outside the data root"
    if entry.get("split") not in ("train", "val"):
        return "has no 'split' of train or val"
    return None


def find_shards(data_root: Path, split: str) -> list[Path]:
    """Sorted shard paths for `split` ("train" or "val") under `data_root`; UserError if none."""
    data_root = Path(data_root)
    if not data_root.is_dir():
        raise UserError(
            f"--data-root: {data_root} is not a directory; create shards with `gptctl data prepare --data-root {data_root}`"
        )
    manifest = read_manifest(data_root)
    if manifest is not None:
        shards = sorted(data_root / s["file"] for s in manifest["shards"] if s.get("split") == split)
        missing = [p for p in shards if not p.is_file()]
        if missing:
            raise UserError(
                f"--data-root: {data_root / MANIFEST} lists {missing[0].name}, which is missing; "
                "re-run `gptctl data prepare --force`"
            )
    else:
        shards = sorted(p for p in data_root.glob(f"*_{split}_*.npy") if p.is_file())
    if not shards:
        raise UserError(
            f"--data-root: no {split!r} shards in {data_root} (expected manifest.json or *_{split}_*.npy files); "
            f"create them with `gptctl data prepare --data-root {data_root}`"
        )
    return shards


def load_tokens(path: Path) -> np.ndarray:
    """Memory-map one shard (np.load mmap_mode="r"); it must be a 1-D uint16 array."""
    path = Path(path)
    try:
        tokens = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise UserError(f"--data-root: cannot load shard {path}: {exc}") from None
    if tokens.dtype != np.uint16 or tokens.ndim != 1:
        raise UserError(
            f"--data-root: shard {path} holds {tokens.dtype} with shape {tokens.shape}; expected a 1-D uint16 array"
        )
    return tokens


def count_tokens(data_root: Path, split: str) -> int:
    """Total tokens over all shards of `split` (reads only the .npy headers)."""
    return int(sum(load_tokens(p).shape[0] for p in find_shards(data_root, split)))


def check_split_size(data_root: Path, split: str, batch_size: int, seq_len: int) -> None:
    """A split must hold one micro-batch: batch_size rows of seq_len inputs and their next-token targets.
    Rows wrap around the split, so this is enough for any step, rank or world size (engine/loader.py)."""
    tokens, needed = count_tokens(data_root, split), batch_size * seq_len + 1
    if tokens < needed:
        raise UserError(f"--data-root: the {split} split of {data_root} has {tokens:,} tokens, fewer than one micro-batch "
                        f"needs (--batch-size × --seq-len + 1 = {batch_size}×{seq_len}+1 = {needed:,}); prepare more "
                        f"{split} data or lower --batch-size/--seq-len")


# Identity: what the data is, not where it is. A run records its data's fingerprint; every resume
# compares it (preflight.py), and so does every start of its workers (a job script's requeue).

def _digest(entries: list) -> str:
    return hashlib.sha256(json.dumps(entries, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def manifest_fingerprint(shards: list[dict]) -> str:
    """The fingerprint of a manifest whose entries carry their content hash (gptctl data prepare)."""
    return "sha256:" + _digest(sorted([s["file"], s["split"], s["tokens"], s["bytes"], s["sha256"]] for s in shards))


def fingerprint(data_root: Path) -> str:
    """What `data_root` holds, in one string. From the content hashes its manifest recorded at prepare
    time (`sha256:…`); for a manifest without them (an older gptctl) or build-nanogpt's layout, from the
    shard files' names, splits and sizes (`listing:…`). Reads the manifest and stats the shards."""
    data_root = Path(data_root)
    manifest = read_manifest(data_root)
    if manifest is not None and all("sha256" in s and "bytes" in s for s in manifest["shards"]):
        return manifest_fingerprint(manifest["shards"])
    listing = [[p.name, split, p.stat().st_size] for split in ("train", "val") for p in find_shards(data_root, split)]
    return "listing:" + _digest(listing)


def shard_problem(data_root: Path, content: Callable[[Path], str] | None = None) -> str | None:
    """Why a shard no longer matches its manifest (its size, always; its sha256 with `content`, which
    hashes a file or answers from a cache), or None. For the layouts without recorded sizes: None."""
    data_root = Path(data_root)
    manifest = read_manifest(data_root)
    for entry in manifest["shards"] if manifest is not None else []:
        path = data_root / entry["file"]
        if "bytes" not in entry:
            continue
        try:
            size = path.stat().st_size
        except OSError:
            return f"shard {entry['file']} listed in its manifest is missing"
        if size != entry["bytes"]:
            return (f"shard {entry['file']} is {size:,} bytes, its manifest says {entry['bytes']:,} (truncated or "
                    "replaced)")
        if content is not None and "sha256" in entry and content(path) != entry["sha256"]:
            return f"shard {entry['file']} does not match the sha256 its manifest recorded (changed since it was prepared)"
    return None
