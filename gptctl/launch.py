"""Builds the torchrun command for a run, starts it, streams its output and stops its workers on a signal."""

import ctypes
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from gptctl.engine.startup import STOP_SIGNALS
from gptctl.settings import LaunchSettings

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


def run_workers(cmd: list[str], stop_timeout: float, env: dict[str, str] | None = None) -> tuple[int, int | None]:
    """Run torchrun to completion. Returns (exit code, the first stop signal received, or None).

    gptctl, not torchrun, owns the shutdown. torchrun runs in its own session, so a terminal's Ctrl-C
    reaches only us, and we never pass a signal on to it: torchrun SIGKILLs its workers 30 s after it
    forwards one, whatever they are doing (a slow final save included), and prints two tracebacks.
    We signal the workers themselves; they finish the step, save a checkpoint and exit 0 (see
    `worker.stopped_exit_code`), so torchrun ends normally. `stop_timeout` seconds later, or at a
    second signal, we kill them all without waiting for the save.
    """
    # Should torchrun get a signal all the same (a scheduler signalling every process of a job), its own
    # grace period before SIGKILL is ours where the installed torch reads this variable.
    shutdown = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(math.ceil(stop_timeout)),
                "PET_SIGNALS_TO_HANDLE": TORCHRUN_SIGNALS}  # torchrun's --signals-to-handle, where it has one
    proc = subprocess.Popen(
        cmd,
        env={**shutdown, **os.environ, LAUNCHED_ENV: "1", **(env or {})},
        stdout=2,  # worker logs and progress go to stderr: stdout is kept for results (--json)
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    received: list[int] = []
    previous = {s: signal.signal(s, lambda signum, _frame: received.append(signum)) for s in STOP_SIGNALS}
    try:
        return _supervise(proc, received, stop_timeout), (received[0] if received else None)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


POLL_SECONDS = 0.1


def _supervise(proc: subprocess.Popen, received: list[int], stop_timeout: float) -> int:
    """Wait for torchrun; on a stop signal, pass it to each worker once it can take it."""
    signalled: set[int] = set()
    deadline = None
    while True:
        try:
            return proc.wait(timeout=POLL_SECONDS)
        except subprocess.TimeoutExpired:
            pass
        if not received:
            continue
        if deadline is None:
            deadline = time.monotonic() + stop_timeout
            _say("stopping: finishing the current step and saving a checkpoint "
                 "(Ctrl-C again to stop now without saving)")
        if len(received) > 1:
            _kill(proc)
            _say("stopped now without saving: the workers were killed; the run resumes from its newest checkpoint")
            return proc.wait()
        if time.monotonic() > deadline:
            _kill(proc)
            _say(f"the workers did not stop within --stop-timeout {stop_timeout:g} s and were killed; "
                 "the run resumes from its newest checkpoint")
            return proc.wait()
        for pid in workers_of(proc.pid):
            if pid not in signalled and ready_to_stop(pid):
                try:
                    os.kill(pid, received[0])
                except ProcessLookupError:
                    continue
                signalled.add(pid)  # a worker torchrun starts later (a restart) is signalled in turn


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


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
