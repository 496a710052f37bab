"""Checkpoint files: atomic writes with a sha256, and loads that can never execute code."""

import hashlib
import os
import pickle
from pathlib import Path
from typing import Any

import torch

from gptctl.registry.files import TMP_PREFIX


def checkpoint_name(step: int) -> str:
    return f"model_{step:05d}.pt"


class _HashingWriter:
    def __init__(self, f):
        self.f, self.sha, self.size = f, hashlib.sha256(), 0

    def write(self, data) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def save_atomic(state: dict[str, Any], path: Path) -> tuple[int, str]:
    """Write to a temporary file in the same directory, fsync, rename, fsync the directory.

    A crash at any moment leaves either no file or a complete one at `path`; a leftover
    temporary file never has a checkpoint's name. Returns (bytes, sha256 hex).
    """
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            writer = _HashingWriter(f)
            torch.save(state, writer)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return writer.size, writer.sha.hexdigest()


class UnsafeCheckpoint(Exception):
    """The file is not a checkpoint gptctl can load as plain data."""


def load(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with weights_only=True: tensors and plain containers only, never pickled code."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpoint(f"{path} is not a plain-data checkpoint and was not loaded: {str(exc).splitlines()[0]}") from None
    except (RuntimeError, EOFError, ValueError) as exc:
        raise UnsafeCheckpoint(f"{path} is not a readable checkpoint: {str(exc).splitlines()[0]}") from None


class CheckpointManager:
    """Where checkpoints live and what is kept. The loop only calls `save(step, state)`.

    Registration happens after the rename, so a registered checkpoint is always complete;
    retention runs after registration and never touches the newest checkpoint.
    """

    def __init__(self, db, run_id: str, directory: Path, keep_last: int, permanent: set[int], write: bool):
        self.db, self.run_id, self.directory = db, run_id, directory
        self.keep_last, self.permanent, self.write = keep_last, permanent, write
        if write:
            directory.mkdir(parents=True, exist_ok=True)
            for leftover in directory.glob(TMP_PREFIX + "*"):
                leftover.unlink(missing_ok=True)  # an interrupted save; never a valid checkpoint

    def save(self, step: int, state: dict[str, Any]) -> None:
        if not self.write:
            return
        from gptctl.registry import queries, retention

        path = self.directory / checkpoint_name(step)
        size, sha = save_atomic(state, path)
        queries.register_checkpoint(self.db, self.run_id, step, path, size, sha, pinned=step in self.permanent)
        run = queries.get_run(self.db, self.run_id)
        retention.delete(self.db, retention.plan(self.db, run, self.keep_last))
