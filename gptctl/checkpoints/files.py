"""The checkpoint file: atomic writes with a sha256, and loads that can never execute code.

torch is imported when a file is written or read, not with this module: the store's torch-free
commands (`ckpt list`) import it for its names.
"""

import errno
import hashlib
import os
import pickle
import re
import time
import warnings
from pathlib import Path
from typing import Any

from gptctl.atomic import atomic_write

CHECKPOINT_GLOB = "model_*.pt"
CHECKPOINT_NAME = re.compile(r"model_\d+\.pt")


def checkpoint_name(step: int) -> str:
    return f"model_{step:05d}.pt"


def step_of_name(path: Path) -> int:
    """The step a checkpoint's file name says (CHECKPOINT_NAME)."""
    return int(path.stem.removeprefix("model_"))


class _InjectedFaults:
    """Real faults injected into a real save, for tests/test_faults.py. Set by environment variables,
    read only by `save_atomic`, so they cost nothing unless set:

    GPTCTL_TEST_SLOW_SAVE=SECONDS         sleep once the first bytes are in the temporary file (a kill
                                          lands mid-write, before fsync and rename)
    GPTCTL_TEST_FAIL_SAVE_AFTER_BYTES=N   the disk is full after N bytes: writes fail with ENOSPC
    GPTCTL_TEST_FAULT_FROM_STEP=STEP      only checkpoints of step >= STEP get the faults (default: all)
    """

    def __init__(self, slow_s: float, fail_after: int | None):
        self.slow_s, self.fail_after = slow_s, fail_after

    @classmethod
    def from_env(cls, step: int) -> "_InjectedFaults | None":
        env = os.environ
        if "GPTCTL_TEST_SLOW_SAVE" not in env and "GPTCTL_TEST_FAIL_SAVE_AFTER_BYTES" not in env:
            return None
        if step < int(env.get("GPTCTL_TEST_FAULT_FROM_STEP", 0)):
            return None
        fail_after = env.get("GPTCTL_TEST_FAIL_SAVE_AFTER_BYTES")
        return cls(float(env.get("GPTCTL_TEST_SLOW_SAVE", 0)), int(fail_after) if fail_after else None)

    def before_write(self, f, written: int, data) -> None:
        if self.fail_after is not None and written + len(data) > self.fail_after:
            f.write(data[: max(self.fail_after - written, 0)])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)
        if self.slow_s and written:
            f.flush()  # the partial file is really on disk while we wait to be killed
            time.sleep(self.slow_s)
            self.slow_s = 0


class _HashingWriter:
    def __init__(self, f, faults: _InjectedFaults | None = None):
        self.f, self.sha, self.size, self.faults = f, hashlib.sha256(), 0, faults
        self.error: OSError | None = None  # torch.save swallows it and reports "unexpected pos" instead

    def write(self, data) -> int:
        try:
            if self.faults:
                self.faults.before_write(self.f, self.size, data)
            written = self.f.write(data)
        except OSError as exc:
            self.error = exc
            raise
        self.sha.update(data)
        self.size += len(data)
        return written

    def flush(self) -> None:
        self.f.flush()


def save_atomic(state: dict[str, Any], path: Path) -> tuple[int, str]:
    """Write to a temporary file in the same directory, fsync, rename, fsync the directory.

    A crash at any moment leaves either no file or a complete one at `path`; a leftover
    temporary file never has a checkpoint's name. A failed write removes its temporary file.
    Returns (bytes, sha256 hex). Tests inject faults here: see `_InjectedFaults`.
    """
    import torch

    with atomic_write(path) as f:
        writer = _HashingWriter(f, _InjectedFaults.from_env(int(state.get("step", 0))))
        try:
            torch.save(state, writer)
        except RuntimeError:
            if writer.error is not None:
                raise writer.error from None  # e.g. ENOSPC: say what really went wrong
            raise
    return writer.size, writer.sha.hexdigest()


class UnsafeCheckpoint(Exception):
    """The file is not a checkpoint gptctl can load as plain data."""


_LFS_POINTER = b"version https://git-lfs"
_PICKLED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def load(path: Path, map_location: Any = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load with weights_only=True: tensors and plain containers only, never pickled code.

    mmap=True maps the tensors instead of reading them: for callers that need part of a file (its
    settings and step, or the weights without the optimizer state, which is two thirds of it), and
    processes on one node then share the page cache instead of holding a copy each.

    Whatever the file holds, a failure is an UnsafeCheckpoint in gptctl's words naming what was found:
    torch's own message advises re-running with weights_only=False, i.e. running the file's code.
    """
    import torch

    with open(path, "rb") as f:
        head = f.read(64)
    if not head:
        raise UnsafeCheckpoint(f"{path} is empty, not a checkpoint")
    if head.startswith(_LFS_POINTER):
        raise UnsafeCheckpoint(f"{path} is not a checkpoint but a git-lfs pointer; fetch the file itself (git lfs pull)")
    try:
        with warnings.catch_warnings():  # torch warns about odd pickles before failing: one line is ours to say
            warnings.simplefilter("ignore")
            return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        code = _PICKLED_GLOBAL.search(str(exc))
        if code:
            raise UnsafeCheckpoint(f"{path} is not a plain-data checkpoint and was not loaded: it holds pickled code: "
                                   f"{code.group(1)}; gptctl loads checkpoints as data only") from None
        raise UnsafeCheckpoint(f"{path} is not a checkpoint: {_what_it_looks_like(head)}") from None
    except Exception:  # random bytes make the unpickler fail in many ways (KeyError, IndexError, UnicodeDecodeError…)
        raise UnsafeCheckpoint(f"{path} is not a readable checkpoint: {_what_it_looks_like(head)}") from None


def _what_it_looks_like(head: bytes) -> str:
    if head.startswith(b"PK\x03\x04"):
        return "a damaged or truncated torch file, or a zip archive that torch did not write"
    if head[:1] == b"\x80":
        return "a pickle that is not plain checkpoint data"
    return f"unrecognized content starting with {head[:16]!r}"


def _not_a_checkpoint(state: Any) -> str | None:
    """Why a loaded object is not a gptctl checkpoint: model weights, the settings that made them and
    the step they reached (None: it is one)."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a dict of state"
    if not isinstance(state.get("model"), dict):
        return "no model weights"
    if not isinstance(state.get("settings"), dict):
        return "no settings"
    step = state.get("step")
    if not isinstance(step, int) or isinstance(step, bool):
        return f"no step number ({step!r})"
    return None


def stored_step(path: Path) -> int | None:
    """The step a gptctl checkpoint file holds, or None when it is not one (loaded as plain data only).

    How an unregistered `model_*.pt` found in a checkpoints directory earns a row: a partial manual
    copy or a foreign file never becomes a checkpoint that resume or retention trusts."""
    try:
        state = load(path, mmap=True)
    except (UnsafeCheckpoint, OSError):
        return None
    return None if _not_a_checkpoint(state) else state["step"]


def load_step(path: Path, step: int, mmap: bool = True) -> dict[str, Any]:
    """The state in `path`, checked to be a gptctl checkpoint of `step`: the one answer to "is this file
    really step N", for the store (newest good checkpoint, verify) and a rebuild alike.
    UnsafeCheckpoint (or OSError) saying why not."""
    state = load(path, mmap=mmap)
    why = _not_a_checkpoint(state)
    if why:
        raise UnsafeCheckpoint(f"{path} is not a gptctl checkpoint ({why})")
    if state["step"] != step:
        raise UnsafeCheckpoint(f"{path} holds step {state['step']}, not {step}")
    return state
