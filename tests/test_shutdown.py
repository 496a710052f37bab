"""Stopping a run: gptctl, not torchrun, owns the shutdown.

A stop signal reaches the workers, which finish the step and the save however long it takes (torchrun,
left to itself, SIGKILLs them 30 s after forwarding a signal); a second signal or the stop timeout kills
them at once; each event is one line, with no torchrun traceback. The launcher is tested against a fake
torchrun (real processes, real signals, seconds instead of minutes), then end to end once.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from helpers import TINY_RUN, cli, gptctl, only_run_id, Terminal, wait_until
from gptctl.launch import ready_to_stop

REPO = Path(__file__).resolve().parents[1]

# Like torchrun: each worker in a session of its own; on a signal, pass it on and SIGKILL the workers
# KILL_AFTER seconds later (torchrun's 30 s). Records the signals it gets; exits 1 if a worker failed.
FAKE_TORCHRUN = textwrap.dedent("""
    import os, signal, subprocess, sys, time
    out, workers, kill_after, worker_code = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
    procs = [subprocess.Popen([sys.executable, "-c", worker_code, out, str(i)], start_new_session=True)
             for i in range(workers)]
    def forward(signum, frame):
        open(os.path.join(out, "torchrun-signalled"), "a").write(f"{signum}\\n")
        for p in procs:
            os.killpg(p.pid, signum)
        time.sleep(kill_after)
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)
    for s in (signal.SIGINT, signal.SIGTERM):
        signal.signal(s, forward)
    sys.exit(max(p.wait() != 0 for p in procs))
""")

# Like a worker: installs its stop handler after a slow start, then "trains" until asked to stop, then
# "saves" for SAVE_SECONDS and exits 0.
FAKE_WORKER = textwrap.dedent("""
    import os, sys, time
    from gptctl.engine.startup import StopFlag
    out, rank = sys.argv[1], sys.argv[2]
    mark = lambda what: open(os.path.join(out, f"{what}-{rank}"), "w").close()
    time.sleep(float(os.environ["START_SECONDS"]))
    stop = StopFlag()
    stop.install()
    mark("ready")
    while not stop.requested:
        time.sleep(0.01)
    mark("saving")
    time.sleep(float(os.environ["SAVE_SECONDS"]))
    mark("saved")
""")


def launch(tmp_path: Path, stop_timeout: float, start_s: float, save_s: float, workers: int = 2,
           torchrun_kill_after: float = 0.5) -> subprocess.Popen:
    """gptctl's launcher (launch.run_workers) over the fake torchrun, in a process of its own."""
    code = ("import sys; from gptctl.launch import run_workers; "
            f"print(run_workers(sys.argv[1:], {stop_timeout}))")
    cmd = [sys.executable, "-c", FAKE_TORCHRUN, str(tmp_path), str(workers), str(torchrun_kill_after), FAKE_WORKER]
    env = {**os.environ, "PYTHONPATH": str(REPO), "START_SECONDS": str(start_s), "SAVE_SECONDS": str(save_s)}
    return subprocess.Popen([sys.executable, "-c", code, *cmd], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 60) -> None:
    wait_until(path.exists, path.name, timeout, proc=proc, interval=0.02, details=lambda: output_of(proc))


def output_of(proc: subprocess.Popen) -> tuple[str, str] | str:
    """For a failure's message: a launcher that died of a signal leaves its fake workers holding its pipes."""
    try:
        return proc.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        return f"launcher exit code {proc.poll()}, its output held open by orphaned workers"


def finish(proc: subprocess.Popen, timeout: float = 60) -> tuple[str, list[str]]:
    out, err = proc.communicate(timeout=timeout)
    return out.strip(), [line for line in err.splitlines() if line.strip()]


# SIGUSR1: SLURM's time-limit warning; SIGHUP: the terminal went away (ssh dropped, the window closed)
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP])
def test_a_stop_signal_goes_to_the_workers_who_save_however_long_it_takes(tmp_path, signum):
    # The signal comes before the workers can take it (still starting up): they get it once they can.
    # Their "save" takes 3 s, six times the grace this torchrun would give them: it never gets the signal.
    proc = launch(tmp_path, stop_timeout=60, start_s=2.0, save_s=3.0)
    while not ready_to_stop(proc.pid):  # the launcher's own handler is in place
        time.sleep(0.01)
    proc.send_signal(signum)
    assert not list(tmp_path.glob("ready-*"))
    out, err = finish(proc)
    assert out == f"(0, {int(signum)})"  # torchrun ended normally; the launcher knows why
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ready-0", "ready-1", "saved-0", "saved-1",
                                                          "saving-0", "saving-1"]  # no torchrun-signalled
    assert err == ["stopping: finishing the current step and saving a checkpoint (Ctrl-C again to stop now without saving)"]


@pytest.mark.parametrize("first, second", [(signal.SIGINT, signal.SIGINT), (signal.SIGHUP, signal.SIGTERM)])
def test_a_second_signal_stops_at_once_without_saving(tmp_path, first, second):
    proc = launch(tmp_path, stop_timeout=600, start_s=0.0, save_s=600, torchrun_kill_after=600)
    wait_for_file(tmp_path / "ready-1", proc)
    proc.send_signal(first)
    wait_for_file(tmp_path / "saving-0", proc)
    t0 = time.time()
    proc.send_signal(second)
    out, err = finish(proc)
    assert time.time() - t0 < 10
    assert out == f"(-9, {int(first)})"  # torchrun was killed
    assert err[1] == "stopped now without saving: the workers were killed; the run resumes from its newest checkpoint"
    assert len(err) == 2 and not list(tmp_path.glob("saved-*")) and not (tmp_path / "torchrun-signalled").exists()


def test_a_second_hangup_does_not_hurry_the_save(tmp_path):
    # A closed terminal may send two SIGHUPs (the shell passes its own on, the kernel sends another as
    # the shell exits): nobody asked to stop now, so the save goes on to its end.
    proc = launch(tmp_path, stop_timeout=600, start_s=0.0, save_s=2.0, torchrun_kill_after=600)
    wait_for_file(tmp_path / "ready-1", proc)
    proc.send_signal(signal.SIGHUP)
    wait_for_file(tmp_path / "saving-0", proc)
    proc.send_signal(signal.SIGHUP)
    out, err = finish(proc)
    assert out == f"(0, {int(signal.SIGHUP)})"
    assert sorted(p.name for p in tmp_path.glob("saved-*")) == ["saved-0", "saved-1"]
    assert err == ["stopping: finishing the current step and saving a checkpoint (Ctrl-C again to stop now without saving)"]


def test_the_stop_timeout_bounds_the_wait(tmp_path):
    proc = launch(tmp_path, stop_timeout=1.5, start_s=0.0, save_s=600, workers=1, torchrun_kill_after=600)
    wait_for_file(tmp_path / "ready-0", proc)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    out, err = finish(proc)
    assert 1.5 <= time.time() - t0 < 10 and out == f"(-9, {int(signal.SIGTERM)})"
    assert err[1] == ("the workers did not stop within --stop-timeout 1.5 s and were killed; "
                      "the run resumes from its newest checkpoint")
    assert (tmp_path / "saving-0").exists() and not (tmp_path / "saved-0").exists()


@pytest.mark.parametrize("value", ["inf", "0", "-5"])
def test_stop_timeout_is_validated(value, gptctl_home, tmp_path):
    proc = gptctl("pretrain", "--stop-timeout", value, "--data-root", str(tmp_path), home=gptctl_home, check=False)
    lines = [line for line in (proc.stdout + proc.stderr).splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "--stop-timeout" in lines[0], lines
    assert not gptctl_home.exists() or not any(gptctl_home.iterdir())


# End to end: real torchrun, real workers, a real slow checkpoint save.

def _start(home: Path, log: Path, *args: str, **env: str) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", "gptctl", "pretrain", *TINY_RUN, *args], stdout=out,
                                stderr=out, start_new_session=True, env={**os.environ, "GPTCTL_HOME": str(home), **env})


def _wait_for_step(home: Path, step: int, proc: subprocess.Popen, log: Path, timeout: float = 120) -> Path:
    """The run directory, once its train.log shows `step` (the worker writes it line by line)."""
    return wait_until(lambda: next((p.parent for p in home.glob("*/train.log") if f"step {step}/" in p.read_text()), None),
                      f"step {step}", timeout, proc=proc, details=lambda: log.read_text()[-3000:])


@pytest.mark.slow
def test_sigterm_during_a_save_longer_than_torchruns_grace_keeps_the_checkpoint(shakespeare, gptctl_home, tmp_path):
    # torchrun's own grace is 1 s here (it reads TORCH_ELASTIC_SHUTDOWN_TIMEOUT); the final save takes 5 s.
    log = tmp_path / "run.log"
    proc = _start(gptctl_home, log, "--data-root", str(shakespeare), "--max-steps", "400", "--checkpoint-interval",
                  "1000", "--permanent-checkpoints", "1", "--run-name", "slow", GPTCTL_TEST_SLOW_SAVE="5",
                  GPTCTL_TEST_FAULT_FROM_STEP="2", TORCH_ELASTIC_SHUTDOWN_TIMEOUT="1")
    run_dir = _wait_for_step(gptctl_home, 2, proc, log)
    proc.send_signal(signal.SIGTERM)  # what a cluster scheduler sends on preemption
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    output = log.read_text()
    shown = json.loads(cli("runs", "show", only_run_id(gptctl_home), "--json", home=gptctl_home).stdout)
    stopped_at = shown["last_step"]
    assert shown["status"] == "interrupted" and shown["exit_code"] == 128 + signal.SIGTERM
    # Step 1 is permanent though not a multiple of the interval; the stop's save took its 5 s and is whole.
    assert {c["step"]: c["state"] for c in shown["checkpoints"]} == {1: "valid", stopped_at: "valid"}
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["model_00001.pt", f"model_{stopped_at:05d}.pt"]
    for line in ("stopping: finishing the current step and saving a checkpoint",
                 f"step {stopped_at} finished: saving its checkpoint before stopping",
                 f"stopped at step {stopped_at}, checkpoint saved"):
        assert output.count(line) == 1, output
    for noise in ("Traceback", "SignalException", "ChildFailedError", "death signal"):
        assert noise not in output, output
    verified = json.loads(cli("ckpt", "verify", "--run", "slow", "--json", home=gptctl_home).stdout)
    assert [r["state"] for r in verified] == ["valid", "valid"]


@pytest.mark.slow
def test_second_ctrl_c_during_the_final_save_stops_now_and_leaves_no_valid_looking_file(shakespeare, gptctl_home,
                                                                                       tmp_path):
    log = tmp_path / "run.log"
    proc = _start(gptctl_home, log, "--data-root", str(shakespeare), "--max-steps", "400", "--checkpoint-interval",
                  "1000", "--permanent-checkpoints", "1", "--run-name", "impatient", GPTCTL_TEST_SLOW_SAVE="600",
                  GPTCTL_TEST_FAULT_FROM_STEP="2")
    run_dir = _wait_for_step(gptctl_home, 2, proc, log)
    proc.send_signal(signal.SIGINT)
    # The final save has begun, and stalls (not step 1's, which a loaded machine may still be writing).
    wait_until(lambda: [p for p in (run_dir / "checkpoints").glob(".tmp-*") if not p.name.startswith(".tmp-model_00001")],
               "the final save", 60, proc=proc, details=lambda: log.read_text()[-3000:])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == 128 + signal.SIGINT
    output = log.read_text()
    assert output.count("stopped now without saving") == 1 and "Traceback" not in output, output
    run_id = only_run_id(gptctl_home)
    shown = json.loads(cli("runs", "show", run_id, "--json", home=gptctl_home).stdout)
    assert shown["status"] == "interrupted"
    assert {c["step"]: c["state"] for c in shown["checkpoints"]} == {1: "valid"}  # the run resumes from step 1
    names = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert names[0].startswith(".tmp-model_") and names[1:] == ["model_00001.pt"]  # the cut-off file has no name


@pytest.mark.slow
def test_a_closed_terminal_stops_the_run_with_its_checkpoint_and_it_resumes_bit_exact(shakespeare, gptctl_home,
                                                                                      tmp_path):
    """The ssh connection drops while step 2's checkpoint is being saved (slowed to 2 s): the run finishes
    that save and its step, saves that step, stops with exit code 128+SIGHUP, and what the terminal
    would have shown since is in the run's launcher.log. Resumed, it matches an undisturbed run to the bit."""
    from helpers import losses, train_in_process

    layout = ["--max-steps", "400", "--lr-decay-steps", "400", "--checkpoint-interval", "1000",
              "--permanent-checkpoints", "2"]
    command = [sys.executable, "-m", "gptctl", "pretrain", *TINY_RUN, "--data-root", str(shakespeare), *layout,
               "--run-name", "hup"]
    terminal = Terminal(command, {**os.environ, "GPTCTL_HOME": str(gptctl_home), "GPTCTL_TEST_SLOW_SAVE": "2",
                                  "GPTCTL_TEST_FAULT_FROM_STEP": "2"})
    wait_until(lambda: list(gptctl_home.glob("hup-*/checkpoints/.tmp-model_00002*")), "the save of step 2 to begin",
               proc=terminal.proc, interval=0.02, details=lambda: terminal.shown.decode(errors="replace"))
    terminal.hang_up()
    assert terminal.proc.wait(timeout=120) == 128 + signal.SIGHUP
    run_id = only_run_id(gptctl_home, "hup")
    shown = json.loads(cli("runs", "show", run_id, "--json", home=gptctl_home).stdout)
    stopped_at = shown["last_step"]
    assert shown["status"] == "interrupted" and shown["exit_code"] == 128 + signal.SIGHUP and stopped_at > 2
    assert {c["step"]: c["state"] for c in shown["checkpoints"]} == {2: "valid", stopped_at: "valid"}
    log = (Path(shown["run_dir"]) / "launcher.log").read_text()
    for line in ("stopping: finishing the current step and saving a checkpoint",
                 f"step {stopped_at} finished: saving its checkpoint before stopping",
                 f"stopped at step {stopped_at}, checkpoint saved",
                 f"run {run_id} interrupted at step {stopped_at}/400"):  # the command's summary, printed after
        assert log.count(line) == 1, log
    for noise in ("Traceback", "ChildFailedError", "\x1b["):  # nor the progress bar's redraws
        assert noise not in log, log

    cli("resume", run_id, "--max-steps", str(stopped_at + 2), home=gptctl_home)
    reference, _ = train_in_process(shakespeare, tmp_path / "reference", max_steps=stopped_at + 2, lr_decay_steps=400,
                                    checkpoint_interval=1000)
    assert losses(gptctl_home, run_id) == reference  # every step's loss and val loss, to the last bit


# Which steps the loop saves (in process: a tiny model, batches of random tokens, a recording saver).

class _RandomTokens:
    def __init__(self, vocab: int, stop, stop_during: int | None):
        self.vocab, self.stop, self.stop_during = vocab, stop, stop_during

    def batch(self, step: int, micro: int):
        import torch

        if step == self.stop_during:  # as a signal handler would, in the middle of the step
            self.stop.requested = True
        g = torch.Generator().manual_seed(step * 100 + micro)
        x = torch.randint(0, self.vocab, (2, 8), generator=g)
        return x, torch.roll(x, -1, dims=1)

    def scale(self, step: int, micro: int) -> float:
        return 1.0


def _train_tiny(max_steps: int, interval: int, permanent: set[int], stop_at: int | None = None,
                on_metrics=lambda row: None, accumulation: int = 1, evals: dict | None = None,
                saved: list[int] | None = None) -> list[int]:
    """The steps a Trainer saves (also into `saved`, should training raise), driven in-process with a
    recording checkpointer; `evals` besides the val loss, as Trainer.evals."""
    import torch

    from gptctl.engine.distributed import Dist
    from gptctl.engine.startup import StopFlag
    from gptctl.engine.trainer import Metrics, Trainer
    from gptctl.settings import TrainSettings
    from helpers import RecordingCheckpointer

    class Rows(Metrics):
        def log(self, row):
            on_metrics(row)

    settings = TrainSettings(model="tiny", n_layer=1, n_head=2, n_embd=16, seq_len=8, batch_size=2,
                             total_batch_size=None, grad_accumulation_steps=accumulation, max_steps=max_steps,
                             warmup_steps=0, lr_scheduler="constant", max_lr=1e-3, eval_interval=1000, eval_steps=1,
                             checkpoint_interval=interval, permanent_checkpoints=sorted(permanent), device="cpu")
    stop = StopFlag()
    trainer = Trainer(settings, Dist(0, 0, 1, torch.device("cpu")), stop=stop,
                      loaders=(_RandomTokens(64, stop, stop_at),) * 2,
                      checkpointer=RecordingCheckpointer(steps=saved), metrics=Rows())
    trainer.evals.update(evals or {})
    trainer.train()
    return trainer.checkpointer.steps


def test_permanent_steps_are_saved_even_off_the_checkpoint_interval():
    assert _train_tiny(12, 5, {3, 5, 11}) == [3, 5, 10, 11, 12]
    assert _train_tiny(12, 5, set(), stop_at=7) == [5, 7]  # a stop saves the step it finished


def test_the_last_checkpoint_carries_the_last_steps_evals(shakespeare, tmp_path):
    """Issue 27: the last step was saved before its evals, so its checkpoint (and a registry rebuilt
    from it) lacked the run's final val loss and HellaSwag accuracy. Step 6 evaluates only for being last."""
    import torch

    from helpers import train_in_process
    from test_eval import write_items

    rows, saved = train_in_process(shakespeare, tmp_path / "run", fields=("val_loss", "hellaswag_acc"), max_steps=6,
                                   checkpoint_interval=6, hellaswag_interval=4,
                                   hellaswag_file=write_items(tmp_path / "hellaswag.jsonl"))
    assert sorted(saved) == [6] and None not in rows[6]
    last = torch.load(saved[6], weights_only=True)["metrics"][-1]
    assert (last["step"], last.get("val_loss"), last.get("hellaswag_acc")) == (6, *rows[6])


def test_an_eval_that_fails_never_costs_the_steps_checkpoint():
    def out_of_memory():
        raise RuntimeError("CUDA out of memory (as an eval may run out)")

    saved = []
    with pytest.raises(RuntimeError, match="out of memory"):
        _train_tiny(6, 4, set(), evals={"boom": (5, out_of_memory)}, saved=saved)  # fails at step 5 and the last
    assert saved == [4]  # step 5 is not one to save: nothing more
    saved = []
    with pytest.raises(RuntimeError, match="out of memory"):
        _train_tiny(6, 4, set(), evals={"boom": (1000, out_of_memory)}, saved=saved)  # the last step's only
    assert saved == [4, 6]


def test_a_training_step_reads_the_device_once(monkeypatch):
    """Issue 14: one host-device sync per step. On CPU, count what would sync on CUDA when gptctl's engine
    does it: every read of a tensor's value into Python (tolist, item, float, int, bool) and every tensor
    built from host values, between the metrics rows of consecutive steps. (torch's own reads, such as
    AdamW's step counter, which lives on the host, are torch's; benchmarks/gpu_check.py counts real CUDA
    syncs of the whole step.)"""
    import sys

    import torch

    counts, rows = {"reads": 0, "host_tensors": 0}, []

    def by_engine() -> bool:
        return "/gptctl/engine/" in sys._getframe(2).f_code.co_filename.replace("\\", "/")

    def counting(name, key):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            counts[key] += by_engine()
            return original(self, *args, **kwargs)
        monkeypatch.setattr(torch.Tensor, name, wrapper)

    for name in ("tolist", "item", "__float__", "__int__", "__bool__"):
        counting(name, "reads")
    real_tensor = torch.tensor

    def host_tensor(*args, **kwargs):
        counts["host_tensors"] += by_engine()
        return real_tensor(*args, **kwargs)
    monkeypatch.setattr(torch, "tensor", host_tensor)

    def on_metrics(row):
        rows.append(dict(counts))
        assert isinstance(row["grad_norm"], float) and isinstance(row["loss"], float)

    _train_tiny(6, 100, set(), on_metrics=on_metrics, accumulation=2)
    per_step = [{k: b[k] - a[k] for k in b} for a, b in zip(rows, rows[1:])]
    assert per_step[:-1] and all(step == {"reads": 1, "host_tensors": 0} for step in per_step[:-1]), per_step
    assert per_step[-1] == {"reads": 2, "host_tensors": 0}  # the last step also evaluates: one read more
