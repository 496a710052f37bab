"""What a worker sets up before it imports torch: how it takes a stop signal, and the math libraries'
thread pools. Imports no torch, so the worker can call it first thing."""

import os
import signal
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

# SIGUSR1: what SLURM sends ahead of a job's time limit (#SBATCH --signal=USR1@120): a stop request too.
# SIGHUP: the terminal went away (ssh dropped, the window closed): stop and save rather than die unsaved.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP)


@contextmanager
def signals_noted(signums: Iterable[int]) -> Iterator[list[int]]:
    """While active, these signals are only noted, in the list it yields (in the order they came), rather
    than raised or fatal; the handlers before are back afterwards."""
    noted: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: noted.append(signum)) for s in signums}
    try:
        yield noted
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


@dataclass
class StopFlag:
    """Set by SIGINT, SIGTERM, SIGUSR1 or SIGHUP; the loop finishes the step, checkpoints and stops. Installed before the
    slow imports, so a stop asked for during start-up is kept rather than killing the worker (gptctl's
    launcher only signals a worker once this handler is in place: see `launch.ready_to_stop`)."""

    requested: bool = False
    signum: int | None = None
    requests: Any = None  # a stop_request.Watch where no gptctl launcher passes `runs stop` on as a signal
    by_request: bool = False  # the stop is a `runs stop` this process read, not a signal it received

    def asked(self) -> bool:
        """Whether to stop after this step: a signal, or a `runs stop` request (taken as a SIGTERM)."""
        if not self.requested and self.requests is not None and self.requests.new():
            self.requested, self.signum, self.by_request = True, signal.SIGTERM, True
        return self.requested

    def install(self) -> None:
        for s in STOP_SIGNALS:
            signal.signal(s, self._handle)

    def _handle(self, signum, _frame) -> None:
        if not self.requested:  # the first signal says why the run stopped
            self.requested, self.signum = True, signum


# libgomp and MKL may pick fewer threads than asked for ("dynamic" adjustment, MKL's default), and a
# reduction split over another number of threads sums in another order: the last bits of a loss change
# from run to run. Read by the libraries when torch loads them, so set before the import.
FIXED_THREAD_POOLS = {"OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE"}

# MKL's Conditional Numerical Reproducibility, which MKL's documentation lists, beside a fixed thread
# count, among the conditions for the same results from run to run: AUTO keeps MKL's usual code path
# for this CPU but with fixed cache sizes, deterministic reductions and static scheduling (with CNR
# off, none of those is promised). A default only: a user's own MKL_CBWR (COMPATIBLE: one SSE2 code
# path for every x86 CPU) is kept. MKL reads it at its first BLAS call. On the machine measured (2-core AMD
# EPYC) it cost nothing measurable and gave the same bits as CNR off (benchmarks/exactness.py).
REPRODUCIBLE_MKL = {"MKL_CBWR": "AUTO"}


def pin_thread_pools() -> None:
    for name, value in FIXED_THREAD_POOLS.items():
        os.environ[name] = value
    for name, value in REPRODUCIBLE_MKL.items():
        os.environ.setdefault(name, value)
