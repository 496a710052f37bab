"""Checkpoint files: atomic writes with a sha256, and loads that can never execute code."""

import errno
import hashlib
import os
import pickle
import re
import threading
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gptctl.atomic import TMP_PREFIX, atomic_write
from gptctl.settings import CheckpointSettings


def checkpoint_name(step: int) -> str:
    return f"model_{step:05d}.pt"


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (disk full, I/O error); earlier checkpoints are untouched."""


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


def load(path: Path, map_location: str | torch.device = "cpu", mmap: bool = False) -> dict[str, Any]:
    """Load with weights_only=True: tensors and plain containers only, never pickled code.

    mmap=True maps the tensors instead of reading them: for callers that need part of a file (its
    settings and step, or the weights without the optimizer state, which is two thirds of it), and
    processes on one node then share the page cache instead of holding a copy each.

    Whatever the file holds, a failure is an UnsafeCheckpoint in gptctl's words naming what was found:
    torch's own message advises re-running with weights_only=False, i.e. running the file's code.
    """
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


def stored_step(path: Path) -> int | None:
    """The step a gptctl checkpoint file holds, or None when it is not one (loaded as plain data only).

    How an unregistered `model_*.pt` found in a checkpoints directory earns a row: a partial manual
    copy or a foreign file never becomes a checkpoint that resume or retention trusts."""
    try:
        state = load(path, mmap=True)
    except (UnsafeCheckpoint, OSError):
        return None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict) or "settings" not in state:
        return None
    step = state.get("step")
    return step if isinstance(step, int) and not isinstance(step, bool) else None


def cpu_copy(obj: Any, memo: dict | None = None) -> Any:
    """A copy of a state whose tensors the training loop can no longer change. A tensor that appears
    twice (the tied wte/lm_head weight) is copied once, so the file stores it once, as torch.save does."""
    memo = {} if memo is None else memo
    if isinstance(obj, torch.Tensor):
        key = (obj.untyped_storage().data_ptr(), obj.storage_offset(), tuple(obj.shape), obj.stride(), obj.dtype)
        if key not in memo:
            memo[key] = obj.detach().to("cpu", copy=True)
        return memo[key]
    if isinstance(obj, dict):
        return {k: cpu_copy(v, memo) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(cpu_copy(v, memo) for v in obj)
    return obj


class CheckpointManager:
    """Where checkpoints live and what is kept. The loop only calls `save(step, state)`.

    Registration happens after the rename, so a registered checkpoint is always complete;
    retention runs after registration and never touches the newest checkpoint.

    Asynchronous saves block the loop only while the state is copied into CPU memory (`copy_state`:
    not needed where the state is already a fresh copy, e.g. gathered from CUDA with cpu_offload); a
    background thread (with its own registry connection from `connect`) writes, registers and applies
    retention. One save is in flight at a time. A failed background save shows in `failed` at once
    (the loop votes on it every step, so all ranks stop together) and is raised by `raise_failure`,
    the next `save`, or `wait`, which the trainer calls before it reports the run's outcome.
    """

    def __init__(self, connect: Callable[[], Any], run_id: str, directory: Path, config: CheckpointSettings,
                 write: bool, copy_state: bool = True, note: Callable[[str], None] = lambda line: None):
        self.connect, self.run_id, self.directory, self.write = connect, run_id, directory, write
        self.note = note  # a line for the run's log once a checkpoint is durable and registered
        self.keep_last, self.permanent = config.keep_last_n_checkpoints, set(config.permanent_checkpoints)
        self.asynchronous = config.async_checkpoint
        self.copy_state = copy_state
        self._pending: threading.Thread | None = None
        self._error: BaseException | None = None
        self.write_seconds: float | None = None  # the last save's write, start to registered (rank 0's)
        if write:
            directory.mkdir(parents=True, exist_ok=True)
            for leftover in directory.glob(TMP_PREFIX + "*"):
                leftover.unlink(missing_ok=True)  # an interrupted save; never a valid checkpoint

    @property
    def failed(self) -> bool:
        return self._error is not None

    @property
    def busy(self) -> bool:
        """A background save is still writing (the next save waits for it first)."""
        return self._pending is not None and self._pending.is_alive()

    def raise_failure(self) -> None:
        """Called on every rank once any rank reported `failed`."""
        if self.write:
            self.wait()
        raise CheckpointWriteError("the rank that writes checkpoints could not write one; see its error")

    def save(self, step: int, make_state: Callable[[], dict[str, Any]]) -> None:
        """Every rank calls this (gathering a sharded model's state is collective); rank 0 writes."""
        if self.write:
            self.wait()  # before the next state exists: at most one snapshot besides the live state
        state = make_state()
        if not self.write:
            return
        if not self.asynchronous:
            self._write(step, state)
            return
        snapshot = cpu_copy(state) if self.copy_state else state
        self._pending = threading.Thread(target=self._write_in_background, args=(step, snapshot),
                                         name=f"checkpoint-{step}")
        self._pending.start()

    def wait(self) -> None:
        """Until the save in flight is durable and registered; raises its error if it failed."""
        if self._pending is not None:
            self._pending.join()
            self._pending = None
        if self._error is not None:
            error, self._error = self._error, None
            raise error

    def newest_healthy(self, distrust: int | None) -> dict[str, Any] | None:
        """The state of the run's newest healthy checkpoint, loaded on every rank (collective), or None.
        `distrust`: a step the run already rolled back to and diverged from again; it is marked unhealthy
        and an older one is taken. A file that fails its sha256 or does not load is marked and passed over."""
        from gptctl.engine.distributed import broadcast_object
        from gptctl.registry import files, queries

        path = None
        if self.write:
            self.wait()  # a save in flight may be the newest healthy checkpoint
            db = self.connect()
            while (row := files.newest_verified_checkpoint(db, self.run_id, _warn, healthy=True)) is not None:
                if row["step"] == distrust:
                    queries.mark_unhealthy(db, row["id"], "the run diverged again after rolling back to it")
                    continue
                try:
                    load(Path(row["path"]), mmap=True)
                except (UnsafeCheckpoint, OSError) as exc:
                    queries.mark_checkpoint(db, row["id"], "corrupt", only_if="valid", sha256=row["sha256"])
                    _warn(f"checkpoint step {row['step']} does not load ({exc}); marked corrupt")
                    continue
                path = row["path"]
                break
        path = broadcast_object(path)
        return None if path is None else load(Path(path))

    def _write_in_background(self, step: int, state: dict[str, Any]) -> None:
        try:
            self._write(step, state)
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def _write(self, step: int, state: dict[str, Any]) -> None:
        from gptctl.registry import files, queries, retention

        path = self.directory / checkpoint_name(step)
        began = time.perf_counter()
        try:
            size, sha = save_atomic(state, path)
        except OSError as exc:
            raise CheckpointWriteError(
                f"could not write the checkpoint of step {step} in {self.directory}: {exc.strerror or exc}; "
                f"earlier checkpoints are intact; fix this (e.g. free disk space), then `gptctl resume {self.run_id}`"
            ) from exc
        db = self.connect()  # sqlite connections belong to the thread that opened them
        # The sha256 was computed from the very bytes written: retention's verification of this newest
        # checkpoint is then a stat, not a second read of the file.
        queries.register_checkpoint(db, self.run_id, step, path, size, sha, pinned=step in self.permanent,
                                    verified=files.stat_key(path))
        self.write_seconds = time.perf_counter() - began
        self.note(f"step {step}: checkpoint saved ({path.name}, {size / 1e6:,.1f} MB, {self.write_seconds:.1f} s)")
        run = queries.get_run(db, self.run_id)
        retention.delete(db, retention.plan(db, run, self.keep_last, _warn), _warn)


def _warn(message: str) -> None:
    print(f"warning: {message}", flush=True)  # rank 0's stdout: the launcher shows it on stderr
