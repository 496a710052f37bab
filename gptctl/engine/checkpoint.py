"""The trainer's checkpointing: a save from training state, written (in the background), registered
and pruned through the checkpoint store, and the rollback's load of the newest healthy checkpoint.
The file format and the store are gptctl/checkpoints/."""

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from gptctl.atomic import TMP_PREFIX
from gptctl.checkpoints import retention, store
from gptctl.checkpoints.files import checkpoint_name, load, save_atomic
from gptctl.registry import queries
from gptctl.settings import CheckpointSettings


class CheckpointWriteError(Exception):
    """A checkpoint could not be written (disk full, I/O error); earlier checkpoints are untouched."""


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
        self.rules = config  # which steps are permanent (pinned at registration), how many retention keeps
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

        path = None
        if self.write:
            self.wait()  # a save in flight may be the newest healthy checkpoint
            row = store.newest_good(self.connect(), self.run_id, _warn, healthy=True, loads=True, distrust=distrust)
            path = row and row["path"]
        path = broadcast_object(path)
        return None if path is None else load(Path(path))

    def _write_in_background(self, step: int, state: dict[str, Any]) -> None:
        try:
            self._write(step, state)
        except BaseException as exc:  # handed to the training thread by wait()
            self._error = exc

    def _write(self, step: int, state: dict[str, Any]) -> None:
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
        store.register(db, self.run_id, step, path, size, sha, self.rules, verified=store.stat_key(path))
        self.write_seconds = time.perf_counter() - began
        self.note(f"step {step}: checkpoint saved ({path.name}, {size / 1e6:,.1f} MB, {self.write_seconds:.1f} s)")
        run = queries.get_run(db, self.run_id)
        retention.delete(db, retention.plan(db, run, self.rules.keep_last_n_checkpoints, _warn), _warn)


def _warn(message: str) -> None:
    print(f"warning: {message}", flush=True)  # rank 0's stdout: the launcher shows it on stderr
