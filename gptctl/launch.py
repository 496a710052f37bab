"""Builds the torchrun command for a run, starts it, streams its output and forwards signals."""

import ctypes
import os
import signal
import subprocess
import sys
from pathlib import Path

from gptctl.settings import TrainSettings

ENGINE_MODULE = "gptctl.engine.worker"


def world_size(settings: TrainSettings) -> int:
    return processes_per_node(settings) * settings.nnodes


def processes_per_node(settings: TrainSettings) -> int:
    if settings.nproc_per_node != "gpu":
        return int(settings.nproc_per_node)
    import torch  # only to count GPUs; the light commands never get here

    return max(torch.cuda.device_count(), 1)


# Set by gptctl's launcher, which holds the run lock itself; workers started by a bare torchrun
# (e.g. from `--print-command` in a job script) take the lock on global rank 0 instead.
LAUNCHED_ENV = "GPTCTL_LAUNCHED"


def torchrun_command(settings: TrainSettings, home: Path, run_id: str | None, job_script: bool = False) -> list[str]:
    """The torchrun command line; `run_id` is None on nodes other than node 0, whose workers learn
    the run from node 0's once the process group is up. For a job script, `--nproc-per-node gpu`
    stays "gpu": the GPUs are counted on the node that runs it, not on the one that submits it."""
    nproc = "gpu" if job_script and settings.nproc_per_node == "gpu" else processes_per_node(settings)
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    if settings.nnodes == 1:
        cmd.append("--standalone")
    else:
        cmd.append(f"--nnodes={settings.nnodes}")
        if settings.rdzv_endpoint:  # c10d: ranks in arrival order; the workers elect node 0's as main
            rdzv_id = settings.rdzv_id or settings.run_name or settings.kind
            cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint={settings.rdzv_endpoint}", f"--rdzv-id={rdzv_id}"]
        else:
            cmd += [f"--node-rank={settings.node_rank}", f"--master-addr={settings.master_addr}",
                    f"--master-port={settings.master_port}"]
    if settings.max_restarts:
        cmd.append(f"--max-restarts={settings.max_restarts}")
    cmd += ["-m", ENGINE_MODULE, "--home", str(home)]
    return cmd + (["--run-id", run_id] if run_id else ["--settings", settings.model_dump_json()])


def die_with_parent() -> None:
    """Linux: be SIGKILLed when the parent dies. Launcher → torchrun → workers each set it, so killing
    the launcher leaves no orphan training without the run lock."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def run_workers(cmd: list[str], env: dict[str, str] | None = None) -> tuple[int, int | None]:
    """Run torchrun to completion. Returns (exit code, signal forwarded or None).

    torchrun runs in its own session so a terminal's Ctrl-C reaches it once, through us; it passes
    the signal on to the workers, which finish the step, checkpoint and exit.
    """
    proc = subprocess.Popen(
        cmd,
        env={**os.environ, LAUNCHED_ENV: "1", **(env or {})},
        stdout=2,  # worker logs and progress go to stderr: stdout is kept for results (--json)
        start_new_session=True,
        preexec_fn=die_with_parent,
    )
    received: list[int] = []

    def forward(signum, _frame):
        received.append(signum)
        try:
            proc.send_signal(signum)
        except ProcessLookupError:
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        code = proc.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return code, (received[0] if received else None)
