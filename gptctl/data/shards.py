"""Find and memmap token shards. numpy only: imported by the training engine.

Two layouts are understood:
  * gptctl's own: `manifest.json` lists every shard file with its split ("train"/"val") and token count;
  * build-nanogpt's (no manifest): `*_train_*.npy` and `*_val_*.npy` files in the directory,
    e.g. `edufineweb_train_000001.npy` / `edufineweb_val_000000.npy`.
Shards are 1-D uint16 arrays written with np.save.
"""

from __future__ import annotations

import json
from pathlib import Path

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
    return manifest


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
