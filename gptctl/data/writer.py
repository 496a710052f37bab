"""Cut the token stream into shard files `{name}_{split}_{index:06d}.npy` (np.save of a 1-D uint16 array).

`segments` says which split each stretch of the stream belongs to, in order, e.g. [("val", 10**8),
("train", None)] (build-nanogpt: the first shard is val) or [("train", n_train), ("val", n_val)]. A shard
ends when it holds `shard_size` tokens or its segment ends; shard indices count from 0 within each split.
Memory: one shard-sized buffer.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import numpy as np

from gptctl.atomic import atomic_write
from gptctl.digest import sha256_of


class ShardWriter:
    def __init__(self, data_root: Path, name: str, shard_size: int, segments: list[tuple[str, int | None]],
                 finished: list[dict]):
        self.data_root, self.name, self.shard_size, self.segments = data_root, name, shard_size, segments
        self.shards = list(finished)  # manifest entries of the shards written so far, resumed ones included
        self.written = sum(s["tokens"] for s in self.shards)
        self.buffer = np.empty(shard_size, dtype=np.uint16)
        self.filled = 0

    @property
    def tokens(self) -> int:
        """Tokens taken so far, buffered ones included."""
        return self.written + self.filled

    def _segment(self) -> tuple[str, int | None]:
        """The current segment's split and absolute end (None: open-ended)."""
        end = 0
        for split, length in self.segments:
            if length is None:
                return split, None
            end += length
            if self.written < end:
                return split, end
        raise ValueError(f"the stream is longer than its segments {self.segments}")

    def room(self) -> int:
        """Tokens the current shard still takes before it must be flushed."""
        _, end = self._segment()
        room = self.shard_size - self.filled
        return room if end is None else min(room, end - self.tokens)

    def take(self, tokens: np.ndarray) -> int:
        """Buffer as many of `tokens` as fit before the next shard boundary; return how many."""
        n = min(len(tokens), self.room())
        self.buffer[self.filled : self.filled + n] = tokens[:n]
        self.filled += n
        return n

    def flush(self) -> dict | None:
        """Write the buffered tokens as the next shard; return its entry (None if nothing was buffered)."""
        if not self.filled:
            return None
        split, _ = self._segment()
        index = sum(1 for s in self.shards if s["split"] == split)
        entry = {"file": f"{self.name}_{split}_{index:06d}.npy", "split": split, "tokens": self.filled}
        path = self.data_root / entry["file"]
        _save_once(path, self.buffer[: self.filled])
        # What the shard is, recorded once here (read back from the page cache: what is on disk), so that
        # a run can tell its data from other data under the same root (shards.fingerprint).
        entry.update(bytes=path.stat().st_size, sha256=sha256_of(path))
        self.shards.append(entry)
        self.written += self.filled
        self.filled = 0
        return entry


def _save_once(path: Path, tokens: np.ndarray) -> None:
    """Atomically write `tokens` to `path`, unless `path` already holds exactly them: a prepare killed
    between writing a shard and recording it finds it again on resume, and a finished shard is never
    rewritten."""
    if path.exists():
        try:
            existing = np.load(path, mmap_mode="r", allow_pickle=False)
            if existing.dtype == tokens.dtype and np.array_equal(existing, tokens):
                return
        except (OSError, ValueError):
            pass  # unreadable: replace it
    try:
        with atomic_write(path) as f:
            np.save(f, tokens)
    except OSError as exc:
        # numpy's tofile says only "N requested and M written" (no errno) when the disk fills
        if exc.errno is None and shutil.disk_usage(path.parent).free < tokens.nbytes:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from None
        raise
