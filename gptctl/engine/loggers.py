"""Weights & Biases and TensorBoard: optional mirrors of what rank 0 records in the registry.

The W&B run id is the gptctl run id, so every restart and resume of a run continues the same
W&B run. W&B's own step must only grow, but a resumed run repeats the steps after its last
checkpoint, so gptctl logs its step as a metric ("step") and plots against it instead.
"""

import os
from pathlib import Path
from typing import Any

from gptctl.settings import TrainSettings

SKIP = {"step", "time"}


class ExternalLoggers:
    def __init__(self, settings: TrainSettings, run: dict[str, Any], run_dir: Path, start_step: int, enabled: bool):
        self.wandb_run = self.tensorboard = None
        if not enabled:
            return
        if settings.wandb_log:
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb_run = wandb.init(
                project=settings.wandb_project, name=settings.wandb_run_name or run["name"], id=run["id"],
                resume="allow", dir=str(run_dir), config=settings.model_dump(mode="json"),
            )
            self.wandb_run.define_metric("*", step_metric="step")
        if settings.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint: they are trained again.
            self.tensorboard = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start_step + 1)

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run else None

    def log(self, step: int, values: dict[str, Any], prefix: str = "train") -> None:
        scalars = {f"{prefix}/{k}": float(v) for k, v in values.items() if k not in SKIP and v is not None}
        if self.wandb_run is not None:
            self.wandb_run.log({"step": step, **scalars})
        if self.tensorboard is not None:
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.wandb_run is not None:
            self.wandb_run.finish()
        if self.tensorboard is not None:
            self.tensorboard.close()
