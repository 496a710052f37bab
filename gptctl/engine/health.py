"""Is the run still healthy? Judged on the host from each step's all-reduced loss, with no extra sync.

A spike is a loss above `spike_factor` times its exponential moving average (α = 0.05, about the
last 20 steps), judged from the second step on: at the start the loss falls fast and the average
lags above it, so a falling loss is never a spike, while a blow-up (a far too high learning rate
takes 10.8 to 10^8 in one step) is caught at once. A non-finite step (NaN or inf loss or
gradient norm) is skipped by the trainer; `streak` of them in a row is divergence. Pure Python, so
its state goes into checkpoints as plain numbers and a resumed run judges as the uninterrupted one.
"""

from dataclasses import asdict, dataclass

ALPHA = 0.05
WARMUP = 1  # steps fed into the average before spikes are judged


@dataclass
class Health:
    spike_factor: float
    streak: int
    ema: float | None = None
    seen: int = 0  # finite steps fed into the average
    nonfinite_run: int = 0  # consecutive non-finite steps up to now
    skipped: int = 0  # non-finite steps skipped over the run

    def observe(self, loss: float, finite: bool) -> str | None:
        """Feed one step; a sentence saying why the run diverged, or None."""
        if not finite:
            self.nonfinite_run += 1
            self.skipped += 1
            if self.nonfinite_run >= self.streak:
                return f"{self.nonfinite_run} non-finite steps in a row"
            return None
        self.nonfinite_run = 0
        if self.seen >= WARMUP and loss > self.spike_factor * self.ema:
            return f"loss {loss:.4f} spiked above {self.spike_factor:g}× its moving average {self.ema:.4f}"
        self.ema = loss if self.ema is None else (1 - ALPHA) * self.ema + ALPHA * loss
        self.seen += 1
        return None

    def state_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in ("spike_factor", "streak")}

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)
