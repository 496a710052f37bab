"""Checkpointing: how long the training loop is blocked per checkpoint, gptctl against a plain torch.save.

Reproduce:

    python benchmarks/checkpoint_stall.py --presets small,gpt2 --repeats 3

The state is what the worker saves (gptctl.engine.trainer's Trainer.state_dict): full model and AdamW state
(both moments, created by one optimizer step) gathered by parallel.full_state, the step, settings,
RNG states and --metrics-rows rows of metric history; built on the CPU. Every mode writes that same
state into the same directory (--dir, default a temporary directory on /tmp's disk); dirty pages of
earlier writes are flushed (os.sync) before each timed save, so no mode pays for another's
write-back. The baseline is `torch.save(state, path)`: no hash, no fsync, no rename, so it returns once
the bytes are in the page cache. Rows in between show where gptctl's extra time goes.

To compare another save path (e.g. an asynchronous one), add a function to MODES: it gets
(state, directory, step, manager) and must return once the training loop could continue.
"""

import argparse
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

from _common import median, print_footer, print_header, print_table, scratch_dir

BASELINE = "torch.save(path) (baseline)"


def plain_save(state, directory: Path, step: int, manager) -> None:
    import torch

    torch.save(state, directory / f"plain_{step:05d}.pt")


def plain_save_fsync(state, directory: Path, step: int, manager) -> None:
    import torch

    path = directory / f"fsynced_{step:05d}.pt"
    torch.save(state, path)
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # durability alone, the part of gptctl's cost a crash-safe save cannot avoid
    finally:
        os.close(fd)


def python_file_save(state, directory: Path, step: int, manager) -> None:
    import torch

    with open(directory / f"fileobj_{step:05d}.pt", "wb") as f:
        torch.save(state, f)  # through a Python file object's write(), as save_atomic's hashing writer is


def gptctl_save_atomic(state, directory: Path, step: int, manager) -> None:
    from gptctl.checkpoints.files import checkpoint_name, save_atomic

    save_atomic(state, directory / checkpoint_name(step))


def gptctl_manager_save(state, directory: Path, step: int, manager) -> None:
    manager.synchronous.save(step, lambda: state)  # save_atomic, then register, then retention, all in the loop


def gptctl_manager_save_async(state, directory: Path, step: int, manager) -> None:
    """What the loop waits for by default: the copy into CPU memory (and any save still in flight)."""
    manager.asynchronous.save(step, lambda: state)


def _settle(manager) -> None:
    """Untimed: let a background save finish before the next mode, so no mode pays for another's I/O."""
    manager.asynchronous.wait()


MODES = {
    BASELINE: plain_save,
    "torch.save(path) + fsync": plain_save_fsync,
    "torch.save(Python file object)": python_file_save,
    "gptctl save_atomic (hash, fsync, rename)": gptctl_save_atomic,
    "gptctl CheckpointManager.save, synchronous (+ registry, retention)": gptctl_manager_save,
    "gptctl CheckpointManager.save, asynchronous (the default): blocked part": gptctl_manager_save_async,
}


def build_state(preset: str, metrics_rows: int) -> tuple[dict, float]:
    """The worker's checkpoint state for `preset`, and the seconds parallel.full_state took to gather it."""
    import torch
    from gptctl.engine import parallel
    from gptctl.engine.model import GPT
    from gptctl.engine.optim import make_optimizer
    from gptctl.engine.trainer import rng_state
    from gptctl.presets import PRESETS
    from gptctl.settings import TrainSettings

    torch.manual_seed(1337)
    model = GPT(PRESETS[preset])
    optimizer = make_optimizer(model, 0.1, 6e-4, "cpu")
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # creates both AdamW moments, which a real checkpoint carries
    model.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    model_state, optimizer_state = parallel.full_state(model, optimizer)
    gather_s = time.perf_counter() - t0
    metrics = [{"step": s, "loss": 3.0, "lr": 6e-4, "grad_norm": 1.0, "tokens_per_s": 1e5, "tokens_seen": s * 524288,
                "time": 1.7e9 + s, "mfu": 0.4, **({"val_loss": 3.1} if s % 250 == 0 else {})}
               for s in range(1, metrics_rows + 1)]
    state = {"model": model_state, "optimizer": optimizer_state, "step": metrics_rows,
             "settings": TrainSettings(model=preset).model_dump(mode="json"), "rng": rng_state(), "metrics": metrics}
    return state, gather_s


def hash_seconds(state: dict) -> float:
    """sha256 of the serialized checkpoint alone, in memory: the hashing part of save_atomic's cost."""
    import hashlib
    import io

    import torch

    buffer = io.BytesIO()
    torch.save(state, buffer)
    t0 = time.perf_counter()
    hashlib.sha256(buffer.getbuffer()).hexdigest()
    return time.perf_counter() - t0


def make_manager(home: Path, preset: str):
    """A registered run with its CheckpointManagers (synchronous and asynchronous), as the worker has."""
    from gptctl.engine.checkpoint import CheckpointManager
    from gptctl.registry import open_registry, queries
    from gptctl.settings import TrainSettings

    db = open_registry(home)
    run_id = queries.new_run_id(db)
    run_dir = home / f"bench-{run_id}"
    settings = TrainSettings(model=preset, run_name="bench")
    queries.insert_run(db, {"id": run_id, "name": "bench", "kind": "pretrain", "settings": settings.model_dump_json(),
                            "run_dir": str(run_dir), "command": "checkpoint_stall.py", "max_steps": settings.max_steps})
    args = (lambda: open_registry(home), run_id, run_dir / "checkpoints")
    return SimpleNamespace(synchronous=CheckpointManager(*args, settings.model_copy(update={"async_checkpoint": False}), True),
                           asynchronous=CheckpointManager(*args, settings.model_copy(update={"async_checkpoint": True}), True))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="small,gpt2", help="Model presets. (default: small,gpt2)")
    parser.add_argument("--repeats", type=int, default=3, help="Saves per mode and preset. (default: 3)")
    parser.add_argument("--metrics-rows", type=int, default=1000, help="Metric history in the state. (default: 1000)")
    parser.add_argument("--dir", type=Path, default=None, help="Where to write (its disk is measured). (default: /tmp)")
    args = parser.parse_args()
    print_header("checkpoint stall", " ".join(["python", *sys.argv]))
    rows = []
    with scratch_dir(args.dir) as work:
        for preset in args.presets.split(","):
            state, gather_s = build_state(preset, args.metrics_rows)
            manager = make_manager(work / "home", preset)
            directory = work / preset
            directory.mkdir()
            times: dict[str, list[float]] = {mode: [] for mode in MODES}
            sizes: dict[str, int] = {}
            plain_save(state, directory, 0, manager)  # untimed: first-touch costs (allocator, page cache) paid once
            (directory / "plain_00000.pt").unlink()
            step = 0
            for repeat in range(args.repeats):
                for mode in (list(MODES) if repeat % 2 == 0 else list(reversed(MODES))):  # alternate: drift cancels
                    step += 1
                    os.sync()
                    before = _files(work)
                    t0 = time.perf_counter()
                    MODES[mode](state, directory, step, manager)
                    times[mode].append(time.perf_counter() - t0)
                    _settle(manager)
                    written = _files(work) - before
                    sizes[mode] = sum(p.stat().st_size for p in written)
                    for p in written:
                        if p.parent == directory:
                            p.unlink()  # the manager's own files are its retention's business
            base = median(times[BASELINE])
            for mode, values in times.items():
                t = median(values)
                rows.append([preset, mode, sizes[mode] / 1e6, t, sizes[mode] / 1e6 / t, t / base])
            rows.append([preset, "(state gather: parallel.full_state, before any mode)", "", gather_s, "", ""])
            rows.append([preset, "(sha256 of the same bytes in memory, part of save_atomic)", "", hash_seconds(state), "", ""])
            del state
    print_table(f"blocked seconds per checkpoint (median of {args.repeats}); ratio against {BASELINE}",
                ["preset", "mode", "MB", "s", "MB/s", "ratio"], rows)
    print_footer()


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*.pt") if p.is_file()}


if __name__ == "__main__":
    main()
