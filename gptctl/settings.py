"""All training settings as pydantic models in groups: defaults < --config file < command line.

Every invalid combination is caught here, before a run directory or registry row exists.
"""

import re
import typing
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, ClassVar, Iterable, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from gptctl.deadline import DEFAULT_MARGIN, parse_deadline
from gptctl.errors import UserError
from gptctl.presets import ARCHS, CHECKPOINTING_MODES, PRESETS, RECIPES, ModelShape
from gptctl.schedule import Schedule

_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")  # always fullmatch: `$` would let "name\n" through
# Every integer setting must fit the registry's (and torch's) 64-bit integers; seeds also numpy's 32 bits.
INT64_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1

# Each setting's rules stand beside it, as metadata of its pydantic field (`**rules(...)`): what reads
# a rule asks the fields (is_option, SHAPE_OPTIONS, CHANGEABLE_ON_RESUME, unused_options), never a list
# of names. They are json_schema_extra, the one place pydantic keeps free-form metadata per field, so
# `TrainSettings.model_json_schema()` shows them too. (Launch-only is a group, not a marker: LaunchSettings
# holds every setting of one launch, never stored with the run; LAUNCH_FIELDS is read off it.)
# Settings that only one kind of run has as command-line options: a finetune takes its model
# from the pretrained checkpoint, a pretrain reads token shards rather than an instruction set.
PRETRAIN_ONLY = {"only": "pretrain"}
FINETUNE_ONLY = {"only": "finetune"}
NOT_AN_OPTION = {"cli": False}
# The options that set the model's shape: its checkpoints hold weights of that shape, and a run started
# from weights (a finetune, --init-from) takes them from there.
SHAPE = {"shape": True}
# What a resume may change without --override-settings: how the run is checkpointed, evaluated, logged
# and guarded, and how its steps are computed, not what they compute. Any other setting, changed, would
# silently make another run (data, batch, optimizer, schedule, seed, dtype).
MAY_CHANGE_ON_RESUME = {"on_resume": "may change"}
# Options that mean something only when another setting has a value: given otherwise, they are refused.
NEEDS_MUON = {"needs": ("optimizer", "muon")}
NEEDS_MODERN = {"needs": ("arch", "modern")}
# An option that does nothing when these settings all have these values (engine/optim.py's groups): given then, refused.
UNUSED_BY_MODERN_MUON = {"unused_with": {"arch": "modern", "optimizer": "muon"}, "why": (
    "AdamW then has only the embedding, the head and the gains, which take no weight decay; Muon's block matrices "
    "take --muon-weight-decay")}


def rules(*markers: dict[str, Any], **more: Any) -> dict[str, Any]:
    """A setting's rules (the markers above, and e.g. aliases=[...]) as keyword arguments of its Field."""
    return {"json_schema_extra": {key: value for marker in (*markers, more) for key, value in marker.items()}}


# Settings of earlier versions that TrainSettings still reads (as --lr-scheduler): stored runs,
# checkpoints and config files written by them keep loading.
RENAMED_SETTINGS = frozenset({"decay_lr"})

# What `gptctl finetune` changes from the pretraining defaults (the old finetune_dolly script's).
FINETUNE_DEFAULTS = {"max_lr": 3e-5, "max_steps": 1750, "warmup_steps": 100, "batch_size": 8, "eval_interval": 50,
                     "total_batch_size": None}


Device = Literal["auto", "cuda", "cpu", "mps"]
DEVICES = typing.get_args(Device)  # also what sample, eval and export accept


class _Settings(BaseModel):
    # allow_inf_nan=False: inf and nan are never meaningful settings (and JSON would store them as null).
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @field_validator("*")
    @classmethod
    def _fits_64_bits(cls, value: Any) -> Any:
        """Every integer, whatever its field: the registry stores them as SQLite's 64-bit integers."""
        for number in value if isinstance(value, list) else [value]:
            if isinstance(number, int) and not isinstance(number, bool) and not -INT64_MAX <= number <= INT64_MAX:
                raise ValueError(f"{number} is too large; at most {INT64_MAX} (2**63-1)")
        return value

    @field_validator("*")
    @classmethod
    def _absolute_paths(cls, value: Any) -> Any:
        """Every path a run records is absolute: a resume run from another directory means the same files."""
        return value.expanduser().resolve() if isinstance(value, Path) else value


class LaunchSettings(_Settings):
    """How one launch spreads a run over processes and nodes, and how it stops. They belong to the launch,
    not to the run: a run resumed or requeued elsewhere (another node list, more GPUs) takes new ones.
    Never stored with the run or in its checkpoints; the workers never see them."""

    nproc_per_node: str = Field("1", description="Processes per node: a number, or 'gpu' for one per GPU.")
    nnodes: int = Field(1, gt=0, description="Number of nodes.")
    node_rank: int = Field(0, ge=0, description="This node's rank.")
    master_addr: str = Field("127.0.0.1", description="Address of node 0 (multi-node).")
    master_port: int = Field(29500, gt=0, lt=65536, description="Port on node 0 (multi-node).")
    rdzv_endpoint: str | None = Field(None, description="HOST:PORT of a c10d rendezvous, instead of the static "
                                      "--master-addr/--master-port (nodes may then join in any order).")
    rdzv_id: str | None = Field(None, description="Rendezvous id shared by the nodes of one job. (default: the run name)")
    max_restarts: int = Field(0, ge=0, description="Times torchrun restarts failed workers; they continue from the "
                              "newest valid checkpoint.")
    stop_timeout: float = Field(1800, gt=0, allow_inf_nan=False, description="Seconds the workers get after Ctrl-C "
                                "or SIGTERM to finish their step and save a checkpoint; then they are killed.")

    deadline: str | None = Field(None, description="Stop cleanly before this: a duration (90m, 2h30m, 1d), a time "
                                 "of day (06:00) or a date and time (2026-12-04T06:00). Inside SLURM the job's end "
                                 "time counts too. The run saves and exits with code 124; resume it later.")
    deadline_margin: float = Field(DEFAULT_MARGIN, ge=0, allow_inf_nan=False, description="Seconds kept free before the "
                                   "deadline, besides the measured time of one step and one save.")

    @field_validator("deadline")
    @classmethod
    def _deadline(cls, value: str | None) -> str | None:
        """Made absolute when given (a duration counts from now), so every reader sees the same instant."""
        if value is None:
            return value
        return datetime.fromtimestamp(parse_deadline(value), timezone.utc).isoformat(timespec="seconds")

    @property
    def deadline_at(self) -> float | None:
        return datetime.fromisoformat(self.deadline).timestamp() if self.deadline else None

    @field_validator("master_addr", "rdzv_endpoint")
    @classmethod
    def _address(cls, value: str | None, info: ValidationInfo) -> str | None:
        """A host (and for --rdzv-endpoint an optional :PORT) that torchrun can read: a typo fails here, not there."""
        if value is None:
            return value
        if not value or any(c.isspace() for c in value):
            raise ValueError(f"expected a host name or address without spaces, got {value!r}")
        host, colon, port = value.rpartition(":")
        if info.field_name == "rdzv_endpoint" and colon and not value.endswith("]") and not (
                host and port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"expected HOST or HOST:PORT with a port from 1 to 65535, got {value!r}")
        return value

    @field_validator("nproc_per_node", mode="before")  # a number is fine too (`nproc_per_node = 2` in TOML)
    @classmethod
    def _nproc(cls, value: str) -> str:
        value = str(value)
        if value != "gpu" and not (value.isdigit() and int(value) > 0):
            raise ValueError("expected a positive number or 'gpu'")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> "LaunchSettings":
        if self.node_rank >= self.nnodes:
            raise ValueError(f"--node-rank ({self.node_rank}) must be smaller than --nnodes ({self.nnodes})")
        return self


LAUNCH_FIELDS = frozenset(LaunchSettings.model_fields)


# The run's settings in groups (torchtitan's nested configs, litgpt's TrainArgs/EvalArgs): each group
# declares its fields, checks what it can check alone and derives its own values; a component's
# signature names the group it reads. On the command line, in --config files, in the registry and in
# checkpoints the settings stay flat (a name belongs to exactly one group), so runs stored by any
# earlier version load unchanged. TrainSettings joins the groups and checks what spans several.


class ModelSettings(_Settings):
    """Model: the preset and what overrides it."""
    panel: ClassVar[str] = "Model"

    recipe: Literal[tuple(RECIPES)] = Field(
        "classic", description="Training recipe: classic (GPT-2's: --arch gpt2, AdamW, cosine) or speedrun (--arch "
        "modern, Muon, wsd and the speedruns' learning rates: GPT-2's loss in a fraction of the tokens). Options "
        "given explicitly override the recipe's.", **rules(PRETRAIN_ONLY))
    arch: Literal[ARCHS] = Field(
        "gpt2", description="Architecture: gpt2 (learned positions, LayerNorm, GELU, tied head) or modern (RoPE, "
        "RMSNorm, QK-norm, SwiGLU, no biases, untied head; exports as Qwen3).", **rules(SHAPE, PRETRAIN_ONLY))
    model: str = Field("gpt2", description="Model preset: " + ", ".join(PRESETS), **rules(SHAPE, PRETRAIN_ONLY))
    n_layer: int | None = Field(None, gt=0, description="Override the preset's number of layers.",
                                **rules(SHAPE, PRETRAIN_ONLY))
    n_head: int | None = Field(None, gt=0, description="Override the preset's number of heads.",
                               **rules(SHAPE, PRETRAIN_ONLY))
    n_embd: int | None = Field(None, gt=0, description="Override the preset's embedding width.",
                               **rules(SHAPE, PRETRAIN_ONLY))
    block_size: int | None = Field(None, gt=0, **rules(NOT_AN_OPTION))  # the model's context when it exceeds seq_len (finetunes)

    @field_validator("model")
    @classmethod
    def _preset(cls, value: str) -> str:
        if value not in PRESETS:
            raise ValueError(f"unknown preset {value!r}; choose one of {', '.join(PRESETS)}")
        return value


class DataSettings(_Settings):
    """Data: where tokens or instruction examples come from, and how they are read."""
    panel: ClassVar[str] = "Data"

    data_root: Path | None = Field(None, description="Directory of prepared token shards (gptctl data prepare); default: "
                                 "$GPTCTL_DATA_ROOT, else ./data.", **rules(MAY_CHANGE_ON_RESUME, PRETRAIN_ONLY))
    pretrained_checkpoint: str | None = Field(None, **rules(NOT_AN_OPTION))  # a finetune's parent, as a resolved path
    # What the data root held when the run was made (data/shards.py fingerprint): a resume compares it,
    # since the same path may hold other data (re-prepared with --force).
    data_fingerprint: str | None = Field(None, **rules(NOT_AN_OPTION))
    dataset_path: Path | None = Field(
        None, description="Instruction data: a JSONL file in Dolly's schema (instruction, context, response). "
        "(default: databricks/databricks-dolly-15k from the Hugging Face hub)", **rules(FINETUNE_ONLY))
    val_fraction: float = Field(0.05, gt=0, lt=1, description="Share of the instruction examples held out for val loss.",
                                **rules(FINETUNE_ONLY))
    num_workers: int = Field(0, ge=0, le=64, description="Background threads reading the next N micro-batches while "
                             "the model computes (0: read in the training thread; on CPU that is faster).",
                             **rules(MAY_CHANGE_ON_RESUME))


class BatchSettings(_Settings):
    """Batch: sequence length, micro-batch and tokens per optimizer step."""
    panel: ClassVar[str] = "Batch"

    seq_len: int = Field(1024, gt=0, description="Tokens per sequence (context length).",
                         **rules(aliases=["--max-seq-length"]))
    dynamic_seq_length: bool = Field(False, description="Sequence-length warmup: start at --min-seq-length and double "
                                     "in equal stages over --seq-len-warmup-steps up to --seq-len; tokens per step stay "
                                     "the same (more, shorter rows early).", **rules(PRETRAIN_ONLY))
    min_seq_length: int = Field(128, gt=0, description="First sequence length of --dynamic-seq-length.",
                                **rules(PRETRAIN_ONLY))
    seq_len_warmup_steps: int | None = Field(None, ge=0, description="Steps until sequences reach --seq-len. "
                                             "(default: --warmup-steps)", **rules(PRETRAIN_ONLY))
    batch_size: int = Field(16, gt=0, description="Micro-batch size per process.", **rules(MAY_CHANGE_ON_RESUME))
    total_batch_size: int | None = Field(
        524288, gt=0, description="Tokens per optimizer step, all processes together.")
    grad_accumulation_steps: int | None = Field(
        None, gt=0, description="Micro-steps per optimizer step. (default: derived from the total batch)"
    )

    @model_validator(mode="after")
    def _consistent_batch(self) -> "BatchSettings":
        if self.dynamic_seq_length:
            ratio = self.seq_len // self.min_seq_length
            if self.seq_len % self.min_seq_length or ratio < 2 or ratio & (ratio - 1):
                raise ValueError(f"--min-seq-length ({self.min_seq_length}) must be --seq-len ({self.seq_len}) divided "
                                 "by a power of two, e.g. 128 for 1024")
        return self

    def resolved_accumulation(self, world_size: int, processes: str = "processes") -> int:
        """Micro-steps per optimizer step for this world size; the total batch must split evenly. `processes`:
        what the user calls the world size where it comes from (`gptctl estimate`: --num-gpus)."""
        per_micro_step = self.batch_size * self.seq_len * world_size
        if self.total_batch_size is None:
            return self.grad_accumulation_steps or 1
        if self.total_batch_size % per_micro_step:
            raise ValueError(
                f"--total-batch-size ({self.total_batch_size}) must be divisible by "
                f"--batch-size × --seq-len × {processes} ({self.batch_size}×{self.seq_len}×{world_size}"
                f" = {per_micro_step})"
            )
        accum = self.total_batch_size // per_micro_step
        if self.grad_accumulation_steps is not None and self.grad_accumulation_steps != accum:
            raise ValueError(
                f"--grad-accumulation-steps ({self.grad_accumulation_steps}) disagrees with the total batch: "
                f"{self.total_batch_size} tokens / ({per_micro_step} per micro-step) = {accum}"
            )
        return accum

    def tokens_per_step(self, world_size: int) -> int:
        return self.batch_size * self.seq_len * world_size * self.resolved_accumulation(world_size)


class OptimizerSettings(_Settings):
    """Optimizer: which one, and everything but the learning rate's course over the steps."""
    panel: ClassVar[str] = "Optimizer"

    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="adamw (GPT-2's recipe) or muon: torch.optim.Muon for the weight matrices inside the "
        "blocks, AdamW (at --max-lr) for embeddings and every 1-D parameter.")
    weight_decay: float = Field(0.1, ge=0, description="AdamW weight decay (2-D weights only; none with --arch modern "
                                "--optimizer muon, whose AdamW has no matrix).", **rules(UNUSED_BY_MODERN_MUON))
    grad_clip: float = Field(1.0, ge=0, description="Clip the global gradient norm (0 disables).")
    muon_lr: float = Field(0.02, gt=0, description="--optimizer muon: peak LR of the block matrices (scaled by "
                           "√max(1, rows/cols) per matrix; follows the same schedule).", **rules(NEEDS_MUON))
    muon_momentum: float = Field(0.95, ge=0, lt=1, description="--optimizer muon: momentum (Nesterov).",
                                 **rules(NEEDS_MUON))
    muon_weight_decay: float = Field(0.0, ge=0, description="--optimizer muon: decoupled weight decay of the "
                                     "block matrices.", **rules(NEEDS_MUON))
    embedding_lr: float | None = Field(None, gt=0, description="--arch modern: peak LR of the token embedding "
                                       "(AdamW). (default: --max-lr)", **rules(NEEDS_MODERN))
    head_lr: float | None = Field(None, gt=0, description="--arch modern: peak LR of the untied head (AdamW). "
                                  "(default: --max-lr)", **rules(NEEDS_MODERN))
    scalar_lr: float | None = Field(None, gt=0, description="--arch modern: peak LR of the RMSNorm gains (AdamW). "
                                    "(default: --max-lr)", **rules(NEEDS_MODERN))


class ScheduleSettings(_Settings):
    """LR schedule: how long the run is and how the learning rate moves over it."""
    panel: ClassVar[str] = "Steps and LR schedule"

    max_steps: int = Field(40000, gt=0, description="Optimizer steps to train for.")
    max_lr: float = Field(6e-4, gt=0, description="Peak learning rate.")
    min_lr: float | None = Field(None, ge=0, description="Final learning rate. (default: max_lr/10)")
    warmup_steps: int = Field(2000, ge=0, description="Linear warmup steps.")
    lr_scheduler: Literal["cosine", "cosine_with_restarts", "linear", "constant", "wsd"] = Field(
        "cosine", description="Learning rate after warmup: cosine, cosine_with_restarts, linear, constant or wsd "
        "(warmup-stable-decay: max_lr, then straight down over the last --decay-fraction of the steps).")
    decay_fraction: float = Field(0.2, gt=0, le=1, description="wsd: the share of the steps that decay the LR.")
    lr_decay_steps: int | None = Field(None, gt=0, description="Step where the LR schedule ends; after it, the final "
                                       "LR. (default: --max-steps when the run starts; `resume --max-steps` keeps it, "
                                       "except a wsd run not yet decaying, whose decay moves to the new end)")
    lr_restarts: int = Field(0, ge=0, description="Restarts for cosine_with_restarts: the decay runs as K+1 cycles.")

    @model_validator(mode="after")
    def _consistent_schedule(self) -> "ScheduleSettings":
        if self.lr_restarts and self.lr_scheduler != "cosine_with_restarts":
            raise ValueError("--lr-restarts needs --lr-scheduler cosine_with_restarts")
        if self.lr_restarts and self.lr_restarts >= self.max_steps - self.warmup_steps:
            raise ValueError(f"--lr-restarts ({self.lr_restarts}) makes cycles shorter than a step: at most "
                             f"--max-steps - --warmup-steps - 1 ({self.max_steps - self.warmup_steps - 1})")
        if self.min_lr is not None and self.min_lr > self.max_lr:
            raise ValueError(f"--min-lr ({self.min_lr}) must not exceed --max-lr ({self.max_lr})")
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"--warmup-steps ({self.warmup_steps}) must be smaller than --max-steps ({self.max_steps})")
        if self.lr_decay_steps is not None and self.warmup_steps >= self.lr_decay_steps:
            raise ValueError(f"--warmup-steps ({self.warmup_steps}) must be smaller than --lr-decay-steps "
                             f"({self.lr_decay_steps})")
        return self

    @property
    def schedule_steps(self) -> int:
        """Where the LR schedule ends."""
        return self.lr_decay_steps or self.max_steps

    def schedule(self, end: int | None = None) -> Schedule:
        """The LR schedule, ending at `end` (default: where this run's ends)."""
        return Schedule(self.lr_scheduler, self.max_lr, self.final_lr, self.warmup_steps, end or self.schedule_steps,
                        self.lr_restarts, self.decay_fraction)

    @property
    def final_lr(self) -> float:
        return self.max_lr / 10 if self.min_lr is None else self.min_lr


class RuntimeSettings(_Settings):
    """Hardware, parallelism, precision and memory; the seed and exactness."""
    panel: ClassVar[str] = "Hardware and parallelism"

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Autocast dtype: auto = bfloat16 where CUDA supports it, else float32."
    )
    device: Device = Field("auto", description="Device: auto, cuda, cpu or mps.", **rules(MAY_CHANGE_ON_RESUME))
    compile: bool = Field(False, description="torch.compile the model.", **rules(MAY_CHANGE_ON_RESUME))
    model_parallel: bool = Field(False, description="Shard parameters, gradients and optimizer state with FSDP2 "
                                 "instead of replicating the model (DDP).", **rules(MAY_CHANGE_ON_RESUME))
    model_parallel_size: int | None = Field(None, gt=0, description="Processes that share one copy of the model; "
                                            "groups replicate each other (HSDP). (default: all processes)",
                                            **rules(MAY_CHANGE_ON_RESUME))
    activation_checkpointing: Literal[CHECKPOINTING_MODES] = Field(
        "none", description="Recompute transformer blocks in backward instead of keeping their activations: "
        "none, selective (every other block: about half the activation memory) or full (every block: only "
        "block inputs kept, about a third more compute). Losses are the same; `gptctl estimate` shows what fits.",
        **rules(MAY_CHANGE_ON_RESUME))
    seed: int = Field(1337, ge=0, le=SEED_MAX, description="Random seed for initialisation (0 to 2**32-1).")
    deterministic: bool = Field(False, description="Deterministic algorithms only (torch.use_deterministic_algorithms; "
                                "on GPU also CUBLAS_WORKSPACE_CONFIG=:4096:8): bit-identical runs on GPU too, slower.",
                                **rules(MAY_CHANGE_ON_RESUME))

    @model_validator(mode="after")
    def _consistent_runtime(self) -> "RuntimeSettings":
        if self.model_parallel_size is not None and not self.model_parallel:
            raise ValueError("--model-parallel-size needs --model-parallel")
        return self

    def mesh_shape(self, world_size: int) -> tuple[int, int]:
        """(replicas, processes sharing one model copy) for --model-parallel."""
        shards = self.model_parallel_size or world_size
        if world_size % shards:
            raise ValueError(f"--model-parallel-size ({shards}) must divide the number of processes ({world_size})")
        return world_size // shards, shards


class CheckpointSettings(_Settings):
    """Checkpoints: how often, how, and which are kept."""
    panel: ClassVar[str] = "Checkpoints"

    checkpoint_interval: int = Field(1000, gt=0, description="Steps between checkpoints.",
                                     **rules(MAY_CHANGE_ON_RESUME))
    async_checkpoint: bool = Field(True, description="Write checkpoints in a background thread; training waits "
                                   "only for a copy of the state in CPU memory.", **rules(MAY_CHANGE_ON_RESUME))
    keep_last_n_checkpoints: int = Field(3, ge=1, description="Checkpoints kept besides permanent ones.",
                                         **rules(MAY_CHANGE_ON_RESUME))
    permanent_checkpoints: list[Annotated[int, Field(gt=0)]] = Field(
        default_factory=list, description="Steps never deleted, e.g. 10000,20000,30000.", **rules(MAY_CHANGE_ON_RESUME))

    def is_save_step(self, step: int, last_step: int) -> bool:
        """Whether a run that ends at `last_step` saves after `step`."""
        return step % self.checkpoint_interval == 0 or step == last_step or step in self.permanent_checkpoints

    @field_validator("permanent_checkpoints", mode="before")
    @classmethod
    def _parse_steps(cls, value: Any) -> Any:
        if isinstance(value, str):
            parts = [p.strip() for p in value.split(",") if p.strip()]
            if not all(p.isdigit() and int(p) > 0 for p in parts):
                raise ValueError(f"expected positive step numbers separated by commas, e.g. 10000,20000; got {value!r}")
            return [int(p) for p in parts]
        return value


class EvalSettings(_Settings):
    """Evaluation during training."""
    panel: ClassVar[str] = "Evaluation"

    eval_interval: int = Field(250, gt=0, description="Steps between validation-loss evaluations.",
                               **rules(MAY_CHANGE_ON_RESUME))
    eval_steps: int = Field(20, gt=0, description="Micro-batches per validation evaluation.",
                            **rules(MAY_CHANGE_ON_RESUME))
    hellaswag_interval: int = Field(0, ge=0, description="Steps between HellaSwag evaluations during training (0 = never).",
                                    **rules(MAY_CHANGE_ON_RESUME, PRETRAIN_ONLY))
    hellaswag_file: Path | None = Field(None, description="HellaSwag items (JSONL) for --hellaswag-interval. "
                                        "(default: the validation set, downloaded once)",
                                        **rules(MAY_CHANGE_ON_RESUME, PRETRAIN_ONLY))

    def is_eval_step(self, step: int, last_step: int) -> bool:
        """Whether a run that ends at `last_step` measures its val loss after `step`."""
        return step % self.eval_interval == 0 or step == last_step


class LogSettings(_Settings):
    """Naming and logging: the run's name, its log, and where else metrics go."""
    panel: ClassVar[str] = "Logging"

    run_name: str | None = Field(None, description="Run name; auto-resume looks runs up by it. (default: the kind)")
    log_dir: Path | None = Field(None, description="Where logs go. (default: the run directory)",
                                 **rules(MAY_CHANGE_ON_RESUME))
    log_level: Literal["debug", "info", "warning", "error"] = Field("info", description="Log verbosity.",
                                                                    **rules(MAY_CHANGE_ON_RESUME))
    log_gradients: int = Field(0, ge=0, description="Every N steps, log per-parameter gradient norms and "
                               "update/weight ratios (0 = never).", **rules(MAY_CHANGE_ON_RESUME))
    wandb_log: bool = Field(False, description="Log metrics to Weights & Biases (pip install 'gptctl[wandb]'; "
                            "WANDB_MODE=offline works without network).", **rules(MAY_CHANGE_ON_RESUME))
    wandb_project: str = Field("gptctl", description="W&B project.", **rules(MAY_CHANGE_ON_RESUME))
    wandb_run_name: str | None = Field(None, description="W&B run name. (default: the run name)",
                                       **rules(MAY_CHANGE_ON_RESUME))
    tensorboard: bool = Field(False, description="Write TensorBoard event files to RUN_DIR/tensorboard "
                              "(pip install 'gptctl[tensorboard]').", **rules(MAY_CHANGE_ON_RESUME))

    @field_validator("run_name")
    @classmethod
    def _safe_name(cls, value: str | None) -> str | None:
        if value is not None and not _RUN_NAME.fullmatch(value):
            raise ValueError("use letters, digits, '.', '_' and '-' (no path separators, no leading dot), at most 64")
        return value


class HealthSettings(_Settings):
    """Divergence: what counts as one and what the run does then."""
    panel: ClassVar[str] = "Divergence"

    on_divergence: Literal["rollback", "stop"] = Field(
        "rollback", description="When the loss spikes or stays non-finite: rollback (to the newest healthy "
        "checkpoint, skipping the data that led there) or stop (status diverged).", **rules(MAY_CHANGE_ON_RESUME))
    spike_factor: float = Field(2.0, gt=1, description="A step whose loss exceeds this multiple of its moving average "
                                "(EMA over ~20 steps) is a spike.", **rules(MAY_CHANGE_ON_RESUME))
    nonfinite_streak: int = Field(3, gt=0, description="Consecutive non-finite steps (each skipped: it never reaches "
                                  "the weights) that count as divergence.", **rules(MAY_CHANGE_ON_RESUME))
    max_rollbacks: int = Field(3, ge=0, description="Rollbacks a run may make; at the next divergence it stops "
                               "with status diverged.", **rules(MAY_CHANGE_ON_RESUME))


# The groups in the order --help and model_dump show them (pydantic takes fields from the last base first).
TRAIN_GROUPS = (ModelSettings, DataSettings, BatchSettings, OptimizerSettings, ScheduleSettings, RuntimeSettings,
                CheckpointSettings, EvalSettings, LogSettings, HealthSettings)


class TrainSettings(*reversed(TRAIN_GROUPS)):
    """What makes the run: stored with it and in every checkpoint."""

    kind: Literal["pretrain", "finetune"] = Field("pretrain", **rules(NOT_AN_OPTION))

    @model_validator(mode="before")
    @classmethod
    def _renamed_settings(cls, values: Any) -> Any:  # RENAMED_SETTINGS
        """Settings stored by earlier versions (runs, checkpoints, config files) still load."""
        if isinstance(values, dict) and "decay_lr" in values:
            values = dict(values)
            decay = values.pop("decay_lr")
            values.setdefault("lr_scheduler", "cosine" if decay else "constant")
        if isinstance(values, dict) and LAUNCH_FIELDS & values.keys():  # stored with the run before launches had their own
            values = {k: v for k, v in values.items() if k not in LAUNCH_FIELDS}
        return values

    @model_validator(mode="after")
    def _consistent(self) -> "TrainSettings":
        shape = self.shape
        if shape.n_embd % shape.n_head:
            raise ValueError(f"--n-embd ({shape.n_embd}) must be divisible by --n-head ({shape.n_head})")
        if self.block_size is not None and self.seq_len > self.block_size:
            raise ValueError(f"--seq-len ({self.seq_len}) must not exceed the model's context of {self.block_size} tokens")
        if self.optimizer == "muon" and self.model_parallel:
            which = " (the speedrun recipe's)" if self.recipe == "speedrun" else ""
            raise ValueError(f"--optimizer muon{which}: Muon orthogonalises whole matrices, which --model-parallel "
                             "shards across processes; drop --model-parallel (DDP) or use --optimizer adamw")
        if shape.arch == "modern" and shape.head_dim % 2:
            raise ValueError(f"--arch modern: rotary embeddings need an even head size; --n-embd / --n-head is "
                             f"{shape.head_dim}")
        return self

    @property
    def shape(self) -> ModelShape:
        preset = PRESETS[self.model]
        return ModelShape(
            n_layer=self.n_layer or preset.n_layer,
            n_head=self.n_head or preset.n_head,
            n_embd=self.n_embd or preset.n_embd,
            block_size=self.block_size or self.seq_len,
            arch=self.arch,
        )

    def unused_options(self, given: Iterable[str]) -> list[tuple[str, dict[str, Any]]]:
        """(option, {setting: value} of these settings that leave it unused) for the options among `given` (set by
        the user, not by default) that these settings ignore, at a value of their own: stored settings and saved
        config files carry every field at its default (or the recipe's), so only what was given, and differs,
        tells a user's mistake."""
        unused = []
        for name in given:
            needs, unused_with = _needs(name), rules_of(name).get("unused_with", {})
            if not (needs or unused_with) or getattr(self, name) == RECIPES.get(self.recipe, {}).get(
                    name, TrainSettings.model_fields[name].default):
                continue  # not one of these options (a launch's, a renamed one), or at the value it would have anyway
            if needs and getattr(self, needs[0]) != needs[1]:
                unused.append((name, {needs[0]: getattr(self, needs[0])}))
            elif unused_with and all(getattr(self, k) == v for k, v in unused_with.items()):
                unused.append((name, unused_with))
        return unused

    def check_world(self, world_size: int) -> None:
        """Raise ValueError when the batch or the sharding does not split over `world_size` processes."""
        tokens = self.tokens_per_step(world_size)
        if tokens * self.max_steps > INT64_MAX:  # the registry counts tokens seen in a 64-bit integer
            raise ValueError(f"--max-steps ({self.max_steps}) × {tokens} tokens per step is more tokens than the "
                             f"registry can count (2**63-1); lower --max-steps")
        if self.model_parallel:
            self.mesh_shape(world_size)

    def seq_len_at(self, step: int) -> int:
        """Sequence length at optimizer step `step` (1-based); --seq-len unless --dynamic-seq-length."""
        if not self.dynamic_seq_length:
            return self.seq_len
        stages = (self.seq_len // self.min_seq_length).bit_length()  # 128→1024: 128, 256, 512, 1024
        warmup = self.warmup_steps if self.seq_len_warmup_steps is None else self.seq_len_warmup_steps
        stage = stages - 1 if warmup == 0 else min((step - 1) * stages // warmup, stages - 1)
        return self.min_seq_length << stage


def rules_of(name: str) -> dict[str, Any]:
    """The rules of setting `name` (see `rules`); {} for none, or for a name that is no setting."""
    field = setting_field(name)
    extra = field.json_schema_extra if field is not None else None
    return extra if isinstance(extra, dict) else {}


def marked(marker: dict[str, Any]) -> tuple[str, ...]:
    """The run's settings whose rules include `marker` (e.g. SHAPE), in the order --help lists them."""
    return tuple(name for name in TrainSettings.model_fields
                 if all(rules_of(name).get(key) == value for key, value in marker.items()))


def _needs(name: str) -> tuple[str, str] | None:
    """(setting, value) that option `name` needs to mean anything (NEEDS_MUON, NEEDS_MODERN), or None."""
    return rules_of(name).get("needs")


def refuse_unused(settings: TrainSettings, given: Iterable[str], fixed: Iterable[str] = (), origin: str = "") -> None:
    """UserError for the first option among `given` that `settings` leave unused (TrainSettings.unused_options).
    `fixed`: the settings the user cannot change here, and `origin` where their values come from, with {} for
    them (a resumed run's: "run X was started with {}"): then the fix is to drop the option, not to add one."""
    for name, cause in settings.unused_options(sorted(given)):
        needs, why = _needs(name), rules_of(name).get("why")
        spell = lambda values: " and ".join(f"{option_name(k)} {v}" for k, v in values.items())  # noqa: E731
        when = f"applies only with {spell(dict([needs]))}" if needs else f"does nothing with {spell(cause)} ({why})"
        if held := {k: v for k, v in cause.items() if k in fixed}:
            raise UserError(f"{option_name(name)}: {when}, and {origin.format(spell(held))}; drop the option")
        fix = f"add {spell(dict([needs]))}, or drop the option" if needs else "drop the option"
        raise UserError(f"{option_name(name)}: {when}; {fix} (from the command line or the --config file)")


def recipe_values(chosen: dict[str, Any]) -> dict[str, Any]:
    """The settings of the recipe `chosen` names that stand: those the user (or the parent checkpoint)
    did not choose, less those that need what was chosen otherwise (speedrun's embedding LR on --arch
    gpt2). An unknown recipe gives nothing here; validation names it."""
    preset = {k: v for k, v in RECIPES.get(chosen.get("recipe", "classic"), {}).items() if k not in chosen}
    merged = {**preset, **chosen}
    unmet = lambda k: (n := _needs(k)) and merged.get(n[0], TrainSettings.model_fields[n[0]].default) != n[1]  # noqa: E731
    return {k: v for k, v in preset.items() if not unmet(k)}


def option_name(field: str) -> str:
    return "--" + field.replace("_", "-")


def setting_field(name: str):
    """The pydantic field of a setting, whichever group it belongs to (names are unique across them)."""
    return TrainSettings.model_fields.get(name) or LaunchSettings.model_fields.get(name)


def panel_of(name: str) -> str:
    """The `--help` heading a setting is listed under ("Run" for what no group holds: kind, recipe)."""
    return next((group.panel for group in TRAIN_GROUPS if name in group.model_fields), "Run")


def grouped_settings(stored: dict[str, Any]) -> dict[str, list[tuple[str, Any, bool]]]:
    """A run's stored settings as `--help` groups them: {panel: [(--option, value, is the default)]},
    in each panel the ones that differ from the defaults (of the run's kind) first; what no panel
    holds (kind, recipe) under "Run"."""
    kind = stored.get("kind", "pretrain")
    defaults = {**{name: f.get_default(call_default_factory=True) for name, f in TrainSettings.model_fields.items()},
                **(FINETUNE_DEFAULTS if kind == "finetune" else {})}
    out: dict[str, list[tuple[str, Any, bool]]] = {}
    for name, value in stored.items():
        out.setdefault(panel_of(name), []).append((option_name(name), value, value == defaults.get(name)))
    return {panel: sorted(rows, key=lambda row: row[2]) for panel, rows in sorted(out.items(), key=lambda kv: kv[0] != "Run")}


def is_option(field: str, kind: str) -> bool:
    """Whether `gptctl KIND` takes this setting as a command-line option (and so in its --config file).
    `gptctl resume` takes every option of either kind: it judges them against the run's own settings."""
    extra = rules_of(field)
    return extra.get("cli") is not False and (kind == "resume" or extra.get("only", kind) == kind)


# The rules' lists, read off the fields' metadata (never written out by name)
SHAPE_OPTIONS = marked(SHAPE)  # arch, model, n_layer, n_head, n_embd
CHANGEABLE_ON_RESUME = frozenset(marked(MAY_CHANGE_ON_RESUME))

# What `gptctl finetune` takes from its parent checkpoint, not from options: given on its command line or in
# its --config file, refused with this reason.
FINETUNE_FROM_PARENT = {
    **dict.fromkeys(SHAPE_OPTIONS,
                    "a finetune takes its parent's architecture and shape (from --pretrained-checkpoint)"),
    "recipe": "a finetune takes its parent's architecture (from --pretrained-checkpoint), and a recipe is for "
              "pretraining from scratch; set a finetune's optimizer and learning rates with their own options",
}


def build_settings(given: dict[str, Any], defaults: dict[str, Any] | None = None,
                   continues: TrainSettings | None = None, **fixed: Any) -> tuple[TrainSettings, LaunchSettings]:
    """Merge `defaults` < what the user set (`settings_files.given_settings`) < `fixed` into the run's validated
    settings and this launch's, or raise UserError. Options are flat: each name belongs to one group.

    `continues`: the settings of the run --auto-resume continues. They stand in for the defaults and the
    recipe (chosen when that run started), so what is given is judged against the run it changes, as
    `gptctl resume` judges it (resume_changes, which also says which options it refuses)."""
    given = {k: v for k, v in given.items() if v is not None}
    start = continues.model_dump() if continues is not None else recipe_values({**given, **fixed})
    values = {**(defaults or {}), **start, **given, **fixed}
    launch = {k: values.pop(k) for k in list(values) if k in LAUNCH_FIELDS}
    try:
        settings, launch_settings = TrainSettings(**values), LaunchSettings(**launch)
    except ValidationError as exc:
        raise UserError(describe(exc)) from None
    if continues is None:
        # A parent checkpoint's model settings (finetune, --init-from) are `fixed`: the user cannot add --arch there.
        parent = "pretrained_checkpoint" in fixed
        refuse_unused(settings, given, fixed=fixed if parent else (),
                      origin="the parent checkpoint is an {} model, whose architecture the run takes")
    return settings, launch_settings


def build_launch(overrides: dict[str, Any], defaults: dict[str, Any] | None = None) -> LaunchSettings:
    """A launch of an existing run (resume): `defaults` (e.g. a SLURM allocation's) < command line."""
    values = {**(defaults or {}), **{k: v for k, v in overrides.items() if v is not None}}
    try:
        return LaunchSettings(**values)
    except ValidationError as exc:
        raise UserError(describe(exc)) from None


def describe(exc: ValidationError) -> str:
    """One line naming the option: pydantic's first error, in the user's terms."""
    err = exc.errors()[0]
    msg = str(err["msg"]).removeprefix("Value error, ")
    if err["loc"]:
        field = str(err["loc"][0])
        if err["type"] == "extra_forbidden":
            return f"unknown setting {field!r} in the config file"
        return f"{option_name(field)}: {msg}"
    return msg
