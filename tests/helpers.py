"""What the tests share that is not a fixture: paths, the tiny run's settings, ways to run gptctl (in a
subprocess as a user would, or in this process), registry rows, a poller, tiny checkpoints and in-process
training. Fixtures are in conftest.py; test modules import these with `from helpers import ...`."""
import os
import sqlite3
import subprocess
import sys
import time
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare.txt"

# A run small enough for a 2-core CPU: ~0.06 s per step after start-up. Two micro-steps of 2×32 tokens
# (gradient accumulation in every one-process run; two processes take one micro-step each); half the
# tokens per step of 4×32 took the suite from about 240 s to 210 s (the tiny model's time is its lm_head).
# One config, two spellings: TINY_SETTINGS for a Trainer driven in-process, TINY_RUN as the CLI's options.
TINY_SETTINGS = dict(model="tiny", seq_len=32, batch_size=2, total_batch_size=128, warmup_steps=2, max_lr=3e-3,
                     eval_interval=4, eval_steps=2, device="cpu")


def options(settings: dict) -> list[str]:
    """`--name value` for each setting, as `gptctl pretrain` takes them."""
    return [arg for name, value in settings.items() for arg in (f"--{name.replace('_', '-')}", str(value))]


TINY_RUN = options({name: value for name, value in TINY_SETTINGS.items() if name != "device"})  # the CLI's default device


def gptctl(*args: str, home: Path, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    """Run the installed CLI as a user would, in a subprocess."""
    env = {**os.environ, "GPTCTL_HOME": str(home)}
    proc = subprocess.run([sys.executable, "-m", "gptctl", *args], env=env, capture_output=True, text=True, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"gptctl {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def cli(*args: str, home: Path, check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`gptctl ARGS` in this process: the CLI through CliRunner, and the workers it launches through
    `worker.main` on this process instead of torchrun (one process only). Control plane, registry, locks,
    checkpoints and Trainer are the real ones; what needs real processes (torchrun, signals, DDP, FSDP,
    nodes, a second trainer) uses `gptctl`. About 5 s less per launch: no interpreter, no torch import."""
    from typer.testing import CliRunner

    from gptctl.cli import app

    argv, sys.argv = sys.argv, ["gptctl", *args]  # what the run records as its command
    try:
        with workers_in_process():
            result = CliRunner().invoke(app, list(args), env={"GPTCTL_HOME": str(home), **(env or {})},
                                        catch_exceptions=False)
    finally:
        sys.argv = argv
    proc = subprocess.CompletedProcess(["gptctl", *args], result.exit_code, result.stdout, result.stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"gptctl {' '.join(args)} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


@contextmanager
def workers_in_process():
    """While active, `launch.run_workers` runs the torchrun command's worker in this process."""
    import signal

    import torch

    from gptctl import launch
    from gptctl.engine import startup, worker

    def run_workers(cmd: list[str], stop_timeout: float, env: dict[str, str] | None = None, log=None, requests=None):
        assert "--nproc-per-node=1" in cmd and "--standalone" in cmd, f"one process only: {cmd}"
        argv = cmd[cmd.index("gptctl.engine.worker") + 1:]
        saved_env = dict(os.environ)
        handlers = {s: signal.getsignal(s) for s in startup.STOP_SIGNALS}
        stop, worker.STOP = worker.STOP, startup.StopFlag()  # a fresh one per launch, as a new process has
        worker.STOP.requests = requests  # `runs stop` reaches the in-process worker directly, not by a signal
        orphan_guard, worker.die_with_parent = worker.die_with_parent, lambda: None  # not for pytest's process
        os.environ.update({launch.LAUNCHED_ENV: "1", **(env or {})})
        try:
            with redirect_stdout(sys.stderr):  # the launcher sends the workers' output to stderr
                return worker.main(argv), None
        finally:
            worker.STOP, worker.die_with_parent = stop, orphan_guard
            os.environ.clear()
            os.environ.update(saved_env)
            for s, handler in handlers.items():
                signal.signal(s, handler)
            torch.use_deterministic_algorithms(False)  # --deterministic lasts a process

    real, launch.run_workers = launch.run_workers, run_workers
    try:
        yield
    finally:
        launch.run_workers = real


def losses(home: Path, run_id: str) -> dict[int, tuple]:
    with sqlite3.connect(home / "gptctl.db") as conn:
        rows = conn.execute("select step, loss, val_loss from metrics where run_id = ? order by step", [run_id])
        return {step: (loss, val) for step, loss, val in rows}


def only_run_id(home: Path, name: str | None = None) -> str:
    with sqlite3.connect(home / "gptctl.db") as conn:
        sql, params = "select id from runs", []
        if name:
            sql, params = sql + " where name = ?", [name]
        ids = [r[0] for r in conn.execute(sql + " order by created_at desc, rowid desc", params)]
    return ids[0]


def wait_until(condition, what: str, timeout: float = 120, proc=None, proc_may_end: bool = False,
               interval: float = 0.05, details=None):
    """condition()'s first truthy value, asked every `interval` s. Fails after `timeout` s, or once `proc` (a
    Popen the wait depends on) has ended first, unless `proc_may_end`: then None. `details()` adds to a
    failure's message (a log's tail)."""
    deadline = time.monotonic() + timeout
    while True:
        if value := condition():
            return value
        ended = proc is not None and proc.poll() is not None
        if ended and proc_may_end:
            return None
        if ended or time.monotonic() >= deadline:
            why = f"exited with {proc.returncode} before" if ended else f"timed out after {timeout:g} s waiting for"
            raise AssertionError(f"{why} {what}" + (f"\n{details()}" if details else ""))
        time.sleep(interval)


def add_run(db, id: str = "r1", **columns) -> dict:
    """A run row as `gptctl pretrain` inserts it before its first launch, for tests of what reads the registry:
    name "r", pretrain, no settings and a run directory of "/x" unless `columns` say otherwise."""
    from gptctl.registry import queries

    row = {"id": id, "name": "r", "kind": "pretrain", "settings": "{}", "run_dir": "/x", **columns}
    queries.insert_run(db, row)
    return row


def save_tiny_checkpoint(path: Path, kind: str = "pretrain", edit=None, data_root: Path | None = None,
                         batch_size: int = 16, step: int = 7, block: int = 16) -> Path:
    """A checkpoint file shaped like the worker's, of a tiny model with sharpened weights (at init the
    output hardly depends on the input); `edit(model)` may change it before saving."""
    import torch

    from gptctl.checkpoints.files import save_atomic
    from gptctl.engine.model import GPT
    from gptctl.settings import TrainSettings

    settings = TrainSettings(kind=kind, model="tiny", n_embd=32, seq_len=block, batch_size=batch_size, data_root=data_root)
    torch.manual_seed(0)
    model = GPT(settings.shape)
    with torch.no_grad():
        for weight in (p for p in model.parameters() if p.dim() == 2):
            weight.mul_(20)
    if edit:
        edit(model)
    save_atomic({"model": model.state_dict(), "settings": settings.model_dump(mode="json"), "step": step}, path)
    return path


def train_in_process(data_root: Path, directory: Path, resume_from: Path | None = None,
                     fields: tuple[str, ...] = ("loss", "val_loss"), **overrides):
    """A Trainer on one process, built and resumed as the worker does it, saving real checkpoint files
    (gptctl's format, atomically) into `directory`: ({step: (loss, val_loss)}, {step: checkpoint path}),
    or other `fields` of the metrics rows. For what needs no process of its own; the real-process tests
    cover torchrun, signals and the registry."""
    import torch

    from gptctl.engine.distributed import Dist

    return _train_as(Dist(0, 0, 1, torch.device("cpu")), data_root, directory, resume_from, fields, overrides)


def train_in_processes(nproc: int, data_root: Path, directory: Path, resume_from: Path | None = None,
                       fields: tuple[str, ...] = ("loss", "val_loss"), **overrides):
    """`train_in_process` on `nproc` processes forked from this one and joined by a gloo group, each
    set up by the worker's own `setup()` from torchrun's variables: DDP, FSDP2 and HSDP without
    torchrun, the launcher or a torch import per process (seconds each on 2 cores). Rank 0's result,
    once every rank has ended well; else every rank's failure. torchrun itself, and the worker around
    the Trainer, are the real-process tests' (DDP, FSDP2 and compile each have one)."""
    import multiprocessing
    import socket
    from multiprocessing.connection import wait

    import torch

    # A fork keeps no OpenMP thread pool: a child of a process that ran multi-threaded may hang in its first op.
    assert torch.get_num_threads() == 1, "forked ranks need OMP_NUM_THREADS=1 (conftest's default)"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    context = multiprocessing.get_context("fork")  # torch is imported already: forking skips its import
    ranks = {}
    for rank in range(nproc):
        receive, send = context.Pipe(duplex=False)
        env = {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(nproc), "LOCAL_WORLD_SIZE": str(nproc),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        process = context.Process(target=_rank_main, args=(send, env, data_root, directory, resume_from, fields, overrides))
        process.start()
        send.close()
        ranks[rank] = (process, receive)
    results, failures, running, deadline = {}, {}, dict(ranks), time.time() + 300
    try:
        while running and wait([r for _, r in running.values()] + [p.sentinel for p, _ in running.values()],
                               timeout=max(deadline - time.time(), 0)):
            for rank, (process, receive) in list(running.items()):
                message = None
                if receive.poll():  # also at end of file, where recv raises
                    try:
                        message = receive.recv()
                    except EOFError:
                        pass
                if message is not None:
                    ok, value = message
                    (results if ok else failures)[rank] = value
                if process.exitcode is not None or (message is None and receive.poll()):
                    process.join()
                    del running[rank]
                    if process.exitcode != 0 and rank not in failures:
                        failures[rank] = f"exited with code {process.exitcode}" + (
                            " after sending its result" if rank in results else " without a result")
            if failures and running:  # the others fail in their next collective, or wait in it forever
                deadline = min(deadline, time.time() + 10)
    finally:
        for process, _ in running.values():
            process.kill()
            process.join()
    for rank in running:
        failures.setdefault(rank, "still running after 300 s" if not failures else "killed: it outlived a failed rank")
    if failures:
        raise AssertionError("\n".join(f"rank {rank}: {what}" for rank, what in sorted(failures.items())))
    return results[0]


def _rank_main(send, env: dict, data_root, directory, resume_from, fields, overrides) -> None:
    """One forked rank: the worker's process-group setup, the Trainer, one message to the parent (the
    result, or the traceback); exits without running the parent's (pytest's) exit handlers."""
    import traceback

    code = 0
    try:
        from gptctl.engine.distributed import setup, teardown

        os.environ.update(env)
        d = setup("cpu")
        try:
            message = (True, _train_as(d, data_root, directory, resume_from, fields, overrides))
        finally:
            teardown()
    except BaseException:
        message, code = (False, traceback.format_exc()), 1
    try:
        send.send(message)
    except BaseException:  # a result that does not pickle
        send.send((False, traceback.format_exc()))
        code = 1
    finally:
        send.close()
        os._exit(code)


def _train_as(d, data_root: Path, directory: Path, resume_from: Path | None, fields: tuple[str, ...], overrides: dict):
    from gptctl.checkpoints import files as ckpt
    from gptctl.engine.trainer import Trainer
    from gptctl.engine.worker import pin_numerics
    from gptctl.settings import TrainSettings

    pin_numerics(deterministic=False)  # as the worker does: the same thread count, no dynamic threads
    directory.mkdir(parents=True, exist_ok=True)
    trainer = Trainer(TrainSettings(**{**TINY_SETTINGS, "data_root": data_root, **overrides}), d,
                      checkpointer=RecordingCheckpointer(directory, writes=d.is_main))  # rank 0 writes
    if resume_from is not None:
        trainer.load_state_dict(ckpt.load(resume_from))
    start = trainer.state.step
    rows = {r["step"]: tuple(r.get(f) for f in fields) for r in trainer.train().history if r["step"] > start}
    return rows, trainer.checkpointer.paths


class Terminal:
    """A pseudo-terminal as an ssh session's: `command` runs as the session's leader with it as its
    controlling terminal, and a thread reads what it shows (else its writes would block). `hang_up`
    closes our end, as sshd does when the connection drops: the kernel sends SIGHUP, and every write
    to the terminal fails from then on."""

    # Makes the terminal the controlling one (a session leader opening a terminal takes it), then
    # becomes the command: the same process, our child, whose exit status we see.
    TAKE_TERMINAL = "import os, sys; os.close(os.open(os.ttyname(0), os.O_RDWR)); os.execv(sys.argv[1], sys.argv[1:])"

    def __init__(self, command: list[str], env: dict[str, str]):
        import threading

        self.master, slave = os.openpty()
        self.proc = subprocess.Popen([sys.executable, "-c", self.TAKE_TERMINAL, *command], stdin=slave, stdout=slave,
                                     stderr=slave, start_new_session=True, env=env)
        os.close(slave)
        self.shown, self.closing = bytearray(), threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        import select

        while not self.closing.is_set():
            if select.select([self.master], [], [], 0.05)[0]:
                try:
                    self.shown += os.read(self.master, 65536)
                except OSError:
                    break
        os.close(self.master)  # here, not while a read holds it: the hangup comes with the last close

    def hang_up(self) -> None:
        self.closing.set()
        self.reader.join()


# --- recording checkpointer -----------------------------------------------------------------------------------
# (the one checkpointer that records what a Trainer saves, for tests that drive a Trainer in-process)

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
        from gptctl.checkpoints import files as ckpt

        path = self.directory / ckpt.checkpoint_name(step)
        state = make_state()
        if self.writes:
            ckpt.save_atomic(state, path)
        self.paths[step] = path

    def newest_healthy(self, distrust: int | None) -> dict | None:
        from gptctl.checkpoints import files as ckpt

        healthy = [s for s in sorted(self.paths) if s not in self.distrusted]
        if healthy and healthy[-1] == distrust:
            self.distrusted.append(healthy.pop())
        return ckpt.load(self.paths[healthy[-1]]) if healthy else None

    def wait(self) -> None:
        pass

    def raise_failure(self) -> None:
        raise AssertionError("RecordingCheckpointer never fails")
