"""Helpers the tests share (imported as `from helpers import ...`; the tests directory is on sys.path)."""

from pathlib import Path
from typing import Callable


# recording checkpointer
class RecordingCheckpointer:
    """The checkpointer for a Trainer driven in-process (Trainer(..., checkpointer=RecordingCheckpointer())):
    records the steps it is asked to save, into `steps` when given (so that a caller keeps them should
    training raise). With `directory`, each save is also a real file (the state is gathered on every rank,
    collectively; written where `writes`), and `newest_healthy` answers the rollback lookup as the
    registry-backed checkpointer does: the newest file, less the steps distrusted (a rollback target
    asked for again is distrusted and the one before it is given)."""

    failed, busy, write_seconds = False, False, None

    def __init__(self, directory: Path | None = None, steps: list | None = None, writes: bool = True):
        self.directory, self.writes = directory, writes
        self.steps = [] if steps is None else steps
        self.paths: dict[int, Path] = {}
        self.distrusted: list[int] = []

    def save(self, step: int, make_state: Callable[[], dict]) -> None:
        self.steps.append(step)
        if self.directory is None:
            return
        from gptctl.engine import checkpoint as ckpt

        path = self.directory / ckpt.checkpoint_name(step)
        state = make_state()
        if self.writes:
            ckpt.save_atomic(state, path)
        self.paths[step] = path

    def newest_healthy(self, distrust: int | None) -> dict | None:
        from gptctl.engine import checkpoint as ckpt

        healthy = [s for s in sorted(self.paths) if s not in self.distrusted]
        if healthy and healthy[-1] == distrust:
            self.distrusted.append(healthy.pop())
        return ckpt.load(self.paths[healthy[-1]]) if healthy else None

    def wait(self) -> None:
        pass

    def raise_failure(self) -> None:
        raise AssertionError("RecordingCheckpointer never fails")
