"""Rank 0's view of training: a rich progress line on a terminal, plain log lines otherwise."""

import sys
import time
from pathlib import Path
from typing import Callable


class TrainingProgress:
    def __init__(self, start_step: int, max_steps: int, log_file: Path | None, enabled: bool, log_level: str = "info",
                 log_every: int = 10, memory: Callable[[], int] | None = None, muon_lr_scale: float | None = None):
        self.start_step, self.max_steps, self.enabled, self.log_every = start_step, max_steps, enabled, log_every
        self.memory = memory  # peak bytes so far, for the log lines
        self.muon_lr_scale = muon_lr_scale  # --optimizer muon: Muon's LR over the row's (AdamW's), shown beside it
        # debug: every step on the terminal; info: every `log_every` steps and evals; warning/error: nothing
        self.verbosity = {"debug": 2, "info": 1}.get(log_level, 0)
        if self.verbosity == 2:
            self.log_every = 1
        self.log = open(log_file, "a", buffering=1) if (enabled and log_file) else None
        self.t0 = time.perf_counter()
        self.bar = None
        if enabled and self.verbosity and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(
                TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tok/s"),
                TimeRemainingColumn(),
            )
            self.task = self.bar.add_task("train", total=max_steps, completed=start_step, loss="-", speed="-")
            self.bar.start()

    def update(self, row: dict) -> None:
        if not self.enabled:
            return
        step = row["step"]
        muon = f" (muon {row['lr'] * self.muon_lr_scale:.3e})" if self.muon_lr_scale else ""
        line = (f"step {step}/{self.max_steps} | loss {row['loss']:.4f} | lr {row['lr']:.3e}{muon} | "
                f"norm {row['grad_norm']:.3f} | {row['tokens_per_s']:,.0f} tok/s")
        if row.get("val_loss") is not None:
            line += f" | val {row['val_loss']:.4f}"
        if row.get("hellaswag_acc") is not None:
            line += f" | hellaswag {row['hellaswag_acc']:.4f}"
        if row.get("mfu") is not None:
            line += f" | mfu {100 * row['mfu']:.1f}%"
        if self.memory is not None:
            line += f" | peak mem {self.memory() / 2**30:.2f} GiB"
        if self.log:
            self.log.write(line + "\n")
        if self.bar is not None:
            self.bar.update(self.task, completed=step, loss=f"{row['loss']:.4f}", speed=f"{row['tokens_per_s']:,.0f}")
            if row.get("val_loss") is not None:
                self.bar.console.print(line)
        elif self.verbosity and (step % self.log_every == 0 or step == self.max_steps or row.get("val_loss") is not None):
            done = step - self.start_step
            eta = (time.perf_counter() - self.t0) / done * (self.max_steps - step) if done else 0
            print(f"{line} | eta {eta:,.0f}s", flush=True)

    def message(self, text: str) -> None:
        if not (self.enabled and self.verbosity):
            return
        if self.log:
            self.log.write(text + "\n")
        (self.bar.console.print if self.bar is not None else lambda t: print(t, flush=True))(text)

    def note(self, text: str) -> None:
        """A line for the log only (`gptctl runs logs`), e.g. a checkpoint saved in the background."""
        if self.log:
            self.log.write(text + "\n")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
        if self.log:
            self.log.close()
