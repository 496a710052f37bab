"""Builds the torchrun command for a run, starts it, streams its output and stops its workers on a signal."""

import ctypes
import fcntl
import math
import os
import re
import select
import shlex
import signal
import socket
import struct
import subprocess
import sys
import termios
import threading
import time
from pathlib import Path

from gptctl.engine.startup import STOP_SIGNALS, signals_noted
from gptctl.settings import LaunchSettings
from gptctl.stop_request import Watch

ENGINE_MODULE = "gptctl.engine.worker"
# The signals torchrun passes on to its workers: its own list plus SLURM's time-limit warning, which
# would otherwise kill torchrun (SIGUSR1's default action) and with it, unsaved, its workers.
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


def world_size(launch: LaunchSettings) -> int:
    return processes_per_node(launch) * launch.nnodes


def processes_per_node(launch: LaunchSettings) -> int:
    if launch.nproc_per_node != "gpu":
        return int(launch.nproc_per_node)
    import torch  # only to count GPUs; the light commands never get here

    return max(torch.cuda.device_count(), 1)


# Set by gptctl's launcher, which holds the run lock itself; workers started by a bare torchrun
# (e.g. from `--print-command` in a job script) take the lock on global rank 0 instead.
LAUNCHED_ENV = "GPTCTL_LAUNCHED"
# Set by gptctl's launcher: when the launch began (epoch seconds), so that start-up counts torchrun's too.
LAUNCH_STARTED_ENV = "GPTCTL_LAUNCH_STARTED"


def torchrun_command(launch: LaunchSettings, home: Path, run_name: str, run_id: str | None = None,
                     device: str = "auto", job_script: bool = False) -> list[str]:
    """The torchrun command line. On node 0 the workers get `run_id` and read the run's settings from the
    registry; on other nodes (`run_id` None) only the device, and they learn the run from node 0's once
    the process group is up. For a job script, `--nproc-per-node gpu` stays "gpu": the GPUs are counted
    on the node that runs it, not on the one that submits it."""
    nproc = "gpu" if job_script and launch.nproc_per_node == "gpu" else processes_per_node(launch)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if launch.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd.append(f"--nnodes={launch.nnodes}")
        if launch.rdzv_endpoint:  # c10d: ranks in arrival order; node 0's workers tell the others the run
            cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={launch.rdzv_endpoint}",
                    f"--rdzv-id={launch.rdzv_id or run_name}"]
        else:
            cmd += [f"--node-rank={launch.node_rank}", f"--master-addr={launch.master_addr}",
                    f"--master-port={launch.master_port}"]
    if launch.max_restarts:
        cmd.append(f"--max-restarts={launch.max_restarts}")
    if job_script and _torchrun_accepts("--shutdown-timeout"):
        # There torchrun itself is signalled: it must give the workers our stop timeout to save, not its 30 s.
        cmd.append(f"--shutdown-timeout={math.ceil(launch.stop_timeout)}")
    if job_script and _torchrun_accepts("--signals-to-handle"):
        cmd.append(f"--signals-to-handle={TORCHRUN_SIGNALS}")  # else SLURM's SIGUSR1 kills torchrun, and the workers
    cmd += ["-m", ENGINE_MODULE, "--home", str(home)]
    return cmd + (["--run-id", run_id] if run_id else ["--device", device])


def _torchrun_accepts(option: str) -> bool:
    """Whether the installed torchrun has `option` (read from its source: importing torch is slow)."""
    from importlib.util import find_spec

    spec = find_spec("torch")
    try:
        return option in (Path(spec.submodule_search_locations[0]) / "distributed" / "run.py").read_text()
    except (AttributeError, TypeError, OSError):
        return False


def die_with_parent() -> None:
    """Linux: be SIGKILLed when the parent dies. Launcher → torchrun → workers each set it, so killing
    the launcher leaves no orphan training without the run lock."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_workers(cmd: list[str], stop_timeout: float, env: dict[str, str] | None = None,
                log: Path | None = None, requests: Watch | None = None) -> tuple[int, int | None]:
    """Run torchrun to completion. Returns (exit code, the first stop signal received, or None).

    gptctl, not torchrun, owns the shutdown. torchrun runs in its own session, so a terminal's Ctrl-C
    reaches only us, and we never pass a signal on to it: torchrun SIGKILLs its workers 30 s after it
    forwards one, whatever they are doing (a slow final save included), and prints two tracebacks.
    We signal the workers themselves; they finish the step, save a checkpoint and exit 0 (see
    `worker.stopped_exit_code`), so torchrun ends normally. `stop_timeout` seconds later, or at a
    second signal, we kill them all without waiting for the save.

    gptctl also owns the terminal (see `Output`): the workers' output reaches it through us, and
    torchrun's own stderr goes to `log` (default: `launcher_log(cmd)`), which a failure's one line names.

    `requests`: the run's stop requests (`gptctl runs stop` from any terminal or node), each taken as a
    SIGTERM received here.
    """
    # Should torchrun get a signal all the same (a scheduler signalling every process of a job), its own
    # grace period before SIGKILL is ours where the installed torch reads this variable.
    shutdown = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(math.ceil(stop_timeout)),
                "PET_SIGNALS_TO_HANDLE": TORCHRUN_SIGNALS}  # torchrun's --signals-to-handle, where it has one
    # Noted from before torchrun starts: a signal from then on is a stop request, never our death.
    with signals_noted(STOP_SIGNALS) as received, Output(log or launcher_log(cmd), cmd) as out:
        proc = subprocess.Popen(
            cmd,
            env={**shutdown, **os.environ, LAUNCHED_ENV: "1", **(env or {})},
            stdout=out.workers,  # worker logs and progress go to our stderr: stdout is kept for results (--json)
            stderr=out.report,
            start_new_session=True,
            preexec_fn=die_with_parent,
        )
        out.started()
        return _supervise(proc, received, stop_timeout, out, requests), (received[0] if received else None)


POLL_SECONDS = 0.1


def _supervise(proc: subprocess.Popen, received: list[int], stop_timeout: float, out: "Output",
               requests: Watch | None) -> int:
    """Wait for torchrun; on a stop signal, pass it to each worker once it can take it."""
    signalled: set[int] = set()
    deadline = None
    while True:
        if requests is not None and (asked := requests.new()):
            out.say("`gptctl runs stop` asked this run to stop" + (" now" if asked > 1 or received else ""))
            received.extend([signal.SIGTERM] * asked)
        try:
            code = proc.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            code = None
        if code is not None:
            if code != 0 and out.log_path is not None:  # torchrun's report went to the log: name it
                out.say(f"the workers failed ({out.failure(code)}); the details are in {out.log_path}")
            return code
        if not received:
            continue
        if deadline is None:
            deadline = time.monotonic() + stop_timeout
            out.say("stopping: finishing the current step and saving a checkpoint "
                    "(Ctrl-C again to stop now without saving)")
        if hurried(received):
            _kill(proc)
            out.say("stopped now without saving: the workers were killed; the run resumes from its newest checkpoint")
            return proc.wait()
        if time.monotonic() > deadline:
            _kill(proc)
            out.say(f"the workers did not stop within --stop-timeout {stop_timeout:g} s and were killed; "
                    "the run resumes from its newest checkpoint")
            return proc.wait()
        for pid in workers_of(proc.pid):
            if pid not in signalled and ready_to_stop(pid):
                try:
                    os.kill(pid, received[0])
                except ProcessLookupError:
                    continue
                signalled.add(pid)  # a worker torchrun starts later (a restart) is signalled in turn


def hurried(received: list[int]) -> bool:
    """Whether a signal after the first asks to stop now. A hangup never does: one closed terminal can
    send two (the shell passes its SIGHUP on to its jobs, then the kernel sends the foreground job
    another as the shell exits), and nobody is left at it to ask for anything."""
    return any(s != signal.SIGHUP for s in received[1:])


def workers_of(pid: int) -> list[int]:
    """The children of process `pid` (torchrun's are its workers), from /proc."""
    children = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:  # exited meanwhile
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after the state, past the command name
            children.append(int(entry))
    return children


def ready_to_stop(pid: int) -> bool:
    """Whether the worker has installed its stop handler (`engine.startup.StopFlag`): before that, a signal
    would kill it (SIGTERM) or raise KeyboardInterrupt (SIGINT) in the middle of its start-up."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    caught = next((int(line.split()[1], 16) for line in status.splitlines() if line.startswith("SigCgt:")), 0)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL torchrun and each worker's process group (every worker is a session of its own)."""
    workers = workers_of(proc.pid)
    proc.kill()
    for pid in workers:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


LAUNCHER_LOG = "launcher.log"


def launcher_log(cmd: list[str]) -> Path | None:
    """Where the launch of `cmd` (torchrun_command's) logs when its caller names no log: on a node without
    the run (nodes other than node 0), launcher-HOST.log in the home. (Node 0's launcher, control.execute,
    names the run's launcher.log, beside its train.log.) None otherwise: torchrun's stderr stays ours."""
    args = dict(zip(cmd, cmd[1:]))
    if "--home" not in args or "--run-id" in args:
        return None
    return Path(args["--home"]) / f"launcher-{socket.gethostname()}.log"


class Output:
    """Where a launch's output goes. The user's terminal (our stderr) is ours alone: the workers write to
    a pipe (a pseudo-terminal of the same size when ours is a terminal, so they still draw their progress
    bar) whose output a thread copies there. torchrun's stderr, and so the workers' (tracebacks,
    warnings, torchrun's 30-line report of a failed worker), goes to the log.

    A terminal can go away under a run (ssh dropped, the window closed, the `| tee` reading us killed):
    every write to it then fails. Had the workers written to it themselves, their next line would have
    raised in the middle of the stop and lost the checkpoint. Here only a write of ours fails; from
    then on the workers' lines (as plain text, without the progress bar) and ours, including what the
    command prints after the launch, go to the log instead."""

    def __init__(self, log_path: Path | None, cmd: list[str]):
        self.log_path, self.log = log_path, _open_log(log_path)
        self.start = 0  # where this launch's part of the log begins
        if self.log is None:
            self.log_path = None
        else:
            self.start = os.lseek(self.log, 0, os.SEEK_END)
            _write_all(self.log, f"--- {time.strftime('%Y-%m-%d %H:%M:%S %z')}: {shlex.join(cmd)}\n".encode())
        self.report = self.log  # torchrun's stderr; None: ours, as when there is no log
        # Our fds that die with the terminal: stderr, and stdout when it is a terminal or the same pipe.
        self.stdio = [1, 2] if _same_terminal(1, 2) else [2]
        self.lost = False
        self.lock = threading.Lock()
        self.plain = PlainLines()
        self.source, self.workers = _terminal_like(2)
        self.thread = threading.Thread(target=self._copy, name="gptctl-output", daemon=True)
        self.resized = None

    def __enter__(self) -> "Output":
        return self

    def started(self) -> None:
        """torchrun has its end of the pipe: close ours (so that the copy ends with torchrun) and copy."""
        os.close(self.workers)
        self.workers = None
        self.thread.start()
        if os.isatty(2):  # a resized terminal: the workers' bar follows
            self.resized = signal.signal(signal.SIGWINCH, lambda _s, _f: _copy_size(2, self.source))

    def __exit__(self, *_exc) -> None:
        if self.resized is not None:
            signal.signal(signal.SIGWINCH, self.resized)
        if self.workers is not None:  # torchrun did not start
            os.close(self.workers)
        if self.thread.is_alive():
            self.thread.join(timeout=10)  # the workers' last lines come before the command's summary
        if not self.thread.is_alive():  # else a straggler holds the workers' end: leave the thread its fds
            os.close(self.source)
            if self.log is not None:
                os.close(self.log)  # once the terminal is lost, our stdio has its own copy

    def failure(self, code: int) -> str:
        """How torchrun (exit code `code`) says the first worker to fail ended, from its report in the log."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(max(self.start, os.path.getsize(self.log_path) - REPORT_BYTES))
                report = f.read().decode(errors="replace")
        except OSError:
            report = ""
        first = re.search(r"exitcode\s*:\s*(-?\d+)", report)  # the root cause comes first
        who, code = ("a worker", int(first.group(1))) if first else ("torchrun", code)
        return f"{who} was killed by {_signal_name(-code)}" if code < 0 else f"{who} exited with code {code}"

    def say(self, line: str) -> None:
        """One line of gptctl's own."""
        self._show((line + "\n").encode(), lines=True)

    def _copy(self) -> None:
        while True:
            try:
                data = os.read(self.source, 65536)
            except OSError:  # a pseudo-terminal whose other end is closed says EIO, not end of file
                data = b""
            if not data:
                return
            self._show(data)

    def _show(self, data: bytes, lines: bool = False) -> None:
        with self.lock:
            if not self.lost:
                try:
                    _write_all(2, data)
                    return
                except OSError:
                    self._lose()
            self._log(data if lines else self.plain.feed(data))

    def _log(self, data: bytes) -> None:
        if self.log is not None and data:
            try:
                _write_all(self.log, data)
            except OSError:
                pass  # a full disk: the run goes on without these lines (the copy must never stop)

    def _lose(self) -> None:
        """The terminal is gone: our stdio goes to the log (or nowhere), so that what the command prints
        after the launch (its summary) neither fails nor changes its exit code."""
        self.lost = True
        self._log(b"--- the terminal went away: what it would have shown follows\n")
        target = self.log if self.log is not None else os.open(os.devnull, os.O_WRONLY)
        for fd in self.stdio:
            os.dup2(target, fd)


class PlainLines:
    """A terminal's bytes as the lines they leave on the screen, for a log: escape sequences dropped,
    and a line that is redrawn after a carriage return (a progress bar) only once it ends."""

    CONTROL = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
    LIMIT = 1 << 16  # a partial line kept, at most

    def __init__(self):
        self.partial = b""

    def feed(self, data: bytes) -> bytes:
        *ended, partial = (self.partial + data).split(b"\n")
        self.partial = partial.rsplit(b"\r", 1)[-1][-self.LIMIT:]  # a bar redrawn forever does not grow
        shown = (self.CONTROL.sub(b"", line).rsplit(b"\r", 1)[-1] for line in ended)
        return b"".join(line + b"\n" for line in shown if line.strip())


REPORT_BYTES = 1 << 16  # how much of the log's end is searched for torchrun's report


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _open_log(path: Path | None) -> int | None:
    if path is None:
        return None
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError:
        return None


def _terminal_like(fd: int) -> tuple[int, int]:
    """(our end, the workers' end): a pseudo-terminal of `fd`'s size where `fd` is a terminal, else a pipe."""
    if os.isatty(fd):
        try:
            ours, theirs = os.openpty()
        except OSError:  # no pseudo-terminals here: the workers print plain lines
            return os.pipe()
        _copy_size(fd, theirs)
        attributes = termios.tcgetattr(theirs)
        attributes[1] &= ~termios.OPOST  # the workers' "\n" stays "\n": our own terminal adds the "\r"
        termios.tcsetattr(theirs, termios.TCSANOW, attributes)
        return ours, theirs
    return os.pipe()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view):]
        except BlockingIOError:  # a terminal left non-blocking by another program: slow, not gone
            select.select([], [fd], [])


def _same_terminal(fd: int, other: int) -> bool:
    try:
        return os.isatty(fd) or os.path.sameopenfile(fd, other)
    except OSError:
        return False


def _copy_size(tty: int, to: int) -> None:
    """The terminal's size, for the workers' pseudo-terminal: their progress bar fits ours."""
    try:
        size = fcntl.ioctl(tty, termios.TIOCGWINSZ, struct.pack("HHHH", 0, 0, 0, 0))
        fcntl.ioctl(to, termios.TIOCSWINSZ, size)
    except OSError:
        pass
