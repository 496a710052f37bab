"""Back-of-the-envelope cost of a training run: FLOPs, time, memory, disk, communication.

Pure Python (no torch, numpy, tiktoken or datasets): `gptctl estimate` must start instantly and
work on machines without a GPU. The training engine imports `flops_per_token` (and
gptctl.gpus.peak_flops) to log MFU, so the two agree by construction.

Assumptions (all stated in the output's `assumptions` too):

* Compute, per token of training (forward + backward), PaLM appendix B / nanoGPT estimate_mfu:
  ``6·N + 12·L·d·T`` with N = the parameters of every matmul: the blocks' and the head's, not the
  table lookups. gpt2: all parameters except the position embeddings (``wpe``): wte is tied to the
  lm_head, whose d×V matmul over every token is real work (2·V·d forward + 4·V·d backward = 6·V·d).
  This is exactly nanoGPT's ``get_num_params()`` (non_embedding=True subtracts only wpe). modern: its
  untied wte is a lookup and its lm_head the matmul, so N counts V·d once too; SwiGLU's three d×h
  matrices are in N; RoPE, RMSNorm and QK-norm are elementwise (O(d) per token, not counted, as
  LayerNorm is not). 12·L·d·T counts the attention score and value matmuls (QKᵀ and AV) without
  crediting causal masking, as PaLM/nanoGPT do.
* Memory per GPU with mixed precision (autocast bf16/fp16): parameters stay fp32 (4 bytes/param)
  and AdamW keeps two fp32 moments (8 bytes/param); the fp32 parameters *are* the master weights.
  Autocast caches a 16-bit copy of the weights that backward still holds (2 bytes/param). Gradients
  (4 bytes/param) are created during backward while the activations are being freed (the loop zeroes
  them with set_to_none), so the peak holds ``max(gradients, activations)``, not their sum. Plus
  1 GiB for CUDA context, cuBLAS workspace and allocator fragmentation. DDP: the full replica on
  every GPU (no ZeRO).
* Activations of one micro-batch, counted tensor by tensor for gptctl's block (Korthikanti et al.
  2022's method; flash attention, so no s×s term; no dropout): per layer and per s·b·h, with
  autocast, the two LayerNorm inputs of the fp32 residual stream (4 + 4 bytes), the 16-bit inputs
  of c_attn and c_fc (2 + 2), q, k, v (6), the attention output and its contiguous copy (2 + 2), the
  MLP's c_fc and GELU outputs (8 + 8): 38 bytes; in fp32 the same 17 values at 4 bytes: 68 bytes.
  modern, the same way with r = h/d = 8/3 for SwiGLU's width: the two RMSNorm inputs (4 + 4), the
  16-bit inputs of the q/k/v and MLP matmuls (2 + 2), q, k, v (6), QK-norm's fp32 inputs of q and k
  (4 + 4), the rotated q and k (2 + 2), the attention output and its copy (2 + 2), the MLP's gate,
  up, SiLU and product outputs (4 × 2r): 34 + 8r ≈ 55 bytes; in fp32 (all at 4 bytes) 52 + 16r ≈ 95.
  A recomputed block (--activation-checkpointing) keeps only its fp32 input (4 bytes) and, during
  backward, one block is rebuilt at a time (+ one block's worth). selective recomputes blocks
  0, 2, 4, …; full all of them. After the blocks: ln_f's input (4 bytes per s·b·h) and the loss.
  The chunked loss keeps the gradient of the head's input (4·s·b·h) and weight (4·V·h) and
  LOSS_CHUNK_ROWS rows of logits at a time (V·(4 + 2) bytes per row with autocast, V·4 in fp32);
  the whole-logits loss it replaced kept ``s·b·V·(act bytes + 8)``. benchmarks/memory.py measures
  these against real peaks.
* Checkpoints: model weights in fp32 (4 bytes/param; tied wte/lm_head stored once, modern's
  untied pair twice) and, with the optimizer, + 8 bytes/param of AdamW moments (--optimizer muon:
  4 bytes/param of Muon momentum for the block matrices, and AdamW moments for the rest). Muon's
  Newton-Schulz iterations add 5 × (4m²n + 2m³) FLOPs per m×n block matrix (m ≤ n) per optimizer
  step on every GPU: 5 × 56·d³ per gpt2 block (5 × 62·d³ per modern block at h = 8d/3: its SwiGLU
  has three MLP matrices), for gpt2 124M at 524,288 tokens per step about 0.3% of the step's FLOPs.
* Multi-GPU: DDP ring allreduce of the fp32 gradients once per optimizer step,
  ``2(n-1)/n × 4·P / bandwidth``, assumed *not* overlapped with compute (pessimistic; DDP overlaps
  part of it with backward). Scaling efficiency = compute time / (compute + allreduce).
"""

from __future__ import annotations

import json
import sqlite3
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gptctl.errors import UserError
from gptctl.gpus import DEFAULT_GPU, GPUS, INTERCONNECTS, get_gpu, match_gpu, normalize_dtype, peak_flops
from gptctl.paths import registry_path
from gptctl.presets import CHECKPOINTING_MODES, LOSS_CHUNK_ROWS, ModelShape
from gptctl.settings import SHAPE_OPTIONS, TrainSettings

GIB = 1024**3
CUDA_OVERHEAD_BYTES = 1 * GIB
# bytes per s·b·h one block keeps for backward, by architecture and activation bytes (see above)
BLOCK_BYTES = {"gpt2": {2: 38, 4: 68}, "modern": {2: 34 + 8 * 8 / 3, 4: 52 + 16 * 8 / 3}}
RESIDUAL_BYTES = 4  # the fp32 residual stream: all a recomputed block keeps
MAX_SEARCHED_BATCH = 1 << 20


def flop_params(shape: ModelShape) -> int:
    """N of the FLOP formula: the blocks' parameters and the head's (see module docstring)."""
    return shape.num_params(include_embeddings=False) + shape.vocab_size * shape.n_embd


def flops_per_token(shape: ModelShape, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token: 6·N + 12·L·d·T, N = params minus wpe."""
    return float(6 * flop_params(shape) + 12 * shape.n_layer * shape.n_embd * seq_len)


def total_params(shape: ModelShape, seq_len: int) -> int:
    """All parameters as the model holds them (gpt2's wpe has seq_len rows; its wte tied to lm_head, once)."""
    return ModelShape(shape.n_layer, shape.n_head, shape.n_embd, seq_len, shape.vocab_size, shape.arch).num_params()


def muon_params(shape: ModelShape) -> int:
    """Parameters --optimizer muon gives to Muon: the block matrices (engine/optim.py's split); 12·L·d²
    for gpt2 (c_attn 3d×d, attn.c_proj d×d, c_fc 4d×d, mlp.c_proj d×4d)."""
    return shape.n_layer * sum(rows * cols for rows, cols in shape.block_matrices())


MUON_NS_STEPS = 5  # engine/optim.py's Newton-Schulz steps per update


def newton_schulz_flops(shape: ModelShape) -> int:
    """FLOPs of Muon's orthogonalisation per optimizer step, on every process (DDP replicates it)."""
    return MUON_NS_STEPS * shape.n_layer * newton_schulz_block_flops(shape)


def newton_schulz_block_flops(shape: ModelShape) -> int:
    """FLOPs of one Newton-Schulz iteration over one block's matrices. For an m×n matrix (m ≤ n) it computes
    A = X·Xᵀ (2m²n), A·A (2m³) and B·X (2m²n). gpt2: 14d³ (c_attn) + 6d³ (attn.c_proj) + 18d³ (c_fc) + 18d³
    (mlp.c_proj) = 56d³. modern: 4 × 6d³ (q, k, v, o_proj) + 3 × (4d²h + 2d³) (gate, up, down_proj) = 30d³ +
    12d²h, 62d³ at h = 8d/3 (the width rounds up to a multiple of 64, so a little more at some widths)."""
    return sum(4 * min(r, c) ** 2 * max(r, c) + 2 * min(r, c) ** 3 for r, c in shape.block_matrices())


def optimizer_bytes(shape: ModelShape, seq_len: int, optimizer: str) -> dict[str, int]:
    """fp32 optimizer state: AdamW's two moments (8 B/param) for what AdamW updates; Muon's one momentum
    buffer (4 B/param) for the block matrices under --optimizer muon."""
    params = total_params(shape, seq_len)
    muon = muon_params(shape) if optimizer == "muon" else 0
    return {"adam_moments_bytes": 8 * (params - muon), "muon_momentum_bytes": 4 * muon}


def recomputed_blocks(n_layer: int, checkpointing: str) -> int:
    """Blocks that --activation-checkpointing recomputes: none, every other one (0, 2, …), or all."""
    if checkpointing not in CHECKPOINTING_MODES:
        raise UserError(f"--activation-checkpointing: unknown mode {checkpointing!r}; choose none, selective or full")
    return {"none": 0, "selective": (n_layer + 1) // 2, "full": n_layer}[checkpointing]


def activation_bytes(shape: ModelShape, seq_len: int, micro_batch: int, dtype: str,
                     checkpointing: str = "none", chunked_loss: bool = True) -> int:
    """Activation memory of one micro-batch at its peak (end of forward), see the module docstring."""
    act = 4 if normalize_dtype(dtype) == "float32" else 2
    rows, h, V = seq_len * micro_batch, shape.n_embd, shape.vocab_size
    block = round(BLOCK_BYTES[shape.arch][act] * rows * h)
    recomputed = recomputed_blocks(shape.n_layer, checkpointing)
    blocks = (shape.n_layer - recomputed) * block + recomputed * RESIDUAL_BYTES * rows * h
    if recomputed:
        blocks += block  # the one block rebuilt in backward
    if chunked_loss:
        loss = 4 * rows * h + 4 * V * h + min(LOSS_CHUNK_ROWS, rows) * V * (4 + (act if act == 2 else 0))
    else:
        loss = rows * V * (act + 12)  # logits, log-softmax, its gradient and the logits gradient
    return blocks + 4 * rows * h + loss


def memory_bytes(shape: ModelShape, seq_len: int, micro_batch: int, dtype: str, checkpointing: str = "none",
                 chunked_loss: bool = True, overhead: int = CUDA_OVERHEAD_BYTES, optimizer: str = "adamw") -> dict[str, int]:
    """Peak memory of one training process, by part (see the module docstring)."""
    params = total_params(shape, seq_len)
    activations = activation_bytes(shape, seq_len, micro_batch, dtype, checkpointing, chunked_loss)
    parts = {
        "weights_bytes": 4 * params,
        "gradients_bytes": 4 * params,
        **optimizer_bytes(shape, seq_len, optimizer),
        "other_bytes": (0 if normalize_dtype(dtype) == "float32" else 2 * params) + overhead,
        "activations_bytes": activations,
    }
    parts["total_bytes"] = (parts["weights_bytes"] + parts["adam_moments_bytes"] + parts["muon_momentum_bytes"]
                            + parts["other_bytes"] + max(parts["gradients_bytes"], activations))
    return parts


def largest_micro_batch(shape: ModelShape, seq_len: int, dtype: str, capacity: int, checkpointing: str = "none",
                        chunked_loss: bool = True, optimizer: str = "adamw") -> int:
    """The largest micro-batch whose peak fits in `capacity` bytes (0: not even one sequence)."""
    def fits(b: int) -> bool:
        return memory_bytes(shape, seq_len, b, dtype, checkpointing, chunked_loss,
                            optimizer=optimizer)["total_bytes"] <= capacity

    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= MAX_SEARCHED_BATCH and fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def human_duration(seconds: float) -> str:
    if seconds < 3600:
        return f"{seconds / 60:.1f} minutes"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} hours"
    return f"{seconds / 86400:.1f} days ({seconds / 3600:.0f} hours)"


def human_bytes(n: float) -> str:
    for unit, size in (("TiB", 1024**4), ("GiB", GIB), ("MiB", 1024**2), ("KiB", 1024)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


@dataclass(frozen=True)
class Hardware:
    """The GPUs a run is estimated on: all an estimate needs besides the run's TrainSettings."""
    gpu: str = DEFAULT_GPU
    num_gpus: int = 1
    mfu: float | None = None  # None: the median of registry runs on this GPU, else its default
    interconnect: str | None = None  # None: the GPU's usual one

    def __post_init__(self) -> None:
        if self.num_gpus <= 0:
            raise UserError(f"--num-gpus: must be a positive integer, got {self.num_gpus}")
        if self.mfu is not None and not (0 < self.mfu <= 1):
            raise UserError(f"--mfu: must be in (0, 1], got {self.mfu}")
        if self.interconnect is not None and self.interconnect not in INTERCONNECTS:
            raise UserError(f"--interconnect: unknown {self.interconnect!r}; known: {', '.join(INTERCONNECTS)}")


def resolve_dtype(dtype: str, spec) -> str:
    """What training's --dtype auto picks on this GPU (engine.distributed.resolve_dtype): bfloat16 where
    the card supports it, else float32."""
    if dtype == "auto":
        return "bfloat16" if spec.bf16_tflops is not None else "float32"
    return normalize_dtype(dtype)


def measured_mfus(runs: list[dict[str, Any]], gpu_key: str) -> list[float]:
    """Measured MFU of each registry run on `gpu_key` with a throughput: per-GPU tokens/s × FLOPs/token / peak."""
    out = []
    for row in runs:
        if row.get("tokens_per_s") is None or match_gpu(row.get("device_name") or "") != gpu_key:
            continue
        try:
            stored = json.loads(row["settings"]) if isinstance(row.get("settings"), str) else dict(row["settings"])
            # Only what the FLOPs depend on: the run's other settings may be another gptctl's, which today's
            # rules refuse. A ValidationError (no such preset) is a ValueError: not counted.
            settings = TrainSettings.model_validate(
                {name: stored[name] for name in (*SHAPE_OPTIONS, "seq_len") if stored.get(name) is not None})
            peak = peak_flops(gpu_key, row.get("dtype") or stored.get("dtype") or "float32")
        except (UserError, ValueError, TypeError, KeyError):
            continue
        world = int(row.get("world_size") or 1)
        mfu = (float(row["tokens_per_s"]) / world) * flops_per_token(settings.shape, settings.seq_len) / peak
        if mfu > 0:
            out.append(mfu)
    return out


def registry_runs(path: Path | None = None) -> list[dict[str, Any]]:
    """Runs with a measured throughput from the registry (empty when there is none).

    Read with the stdlib sqlite3, read-only: gptctl.registry uses sqlite-utils, whose import pulls
    in numpy and pandas when they are installed, and estimate must not import numpy.
    """
    path = path or registry_path()
    if not path.is_file():
        return []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
        try:
            conn.row_factory = sqlite3.Row
            rows = conn.execute(
                "select * from runs where tokens_per_s is not null and device_name is not null"
            ).fetchall()
        finally:
            conn.close()
    except sqlite3.Error:
        return []
    return [dict(r) for r in rows]


def estimate(settings: TrainSettings, hardware: Hardware = Hardware(),
             runs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Every figure of `gptctl estimate` as one JSON-able dict: of the run `settings` make (checked by
    pydantic when they were made), on `hardware`. `runs`: registry rows for calibration."""
    n = hardware.num_gpus
    try:
        grad_accum = settings.resolved_accumulation(n, "--num-gpus")  # the batch's own rule, as a launch checks it
    except ValueError as exc:
        raise UserError(str(exc)) from None
    tokens_per_step = settings.tokens_per_step(n)
    spec = get_gpu(hardware.gpu)
    dtype = resolve_dtype(settings.dtype, spec)
    shape, seq_len = settings.shape, settings.seq_len
    peak = peak_flops(spec.key, dtype)  # raises for bf16 on T4/V100

    # throughput
    if hardware.mfu is not None:
        mfu, mfu_source = hardware.mfu, "--mfu"
    else:
        measured = measured_mfus(runs or [], spec.key)
        if measured:
            mfu = statistics.median(measured)
            mfu_source = f"calibrated from {len(measured)} runs in the registry"
        else:
            mfu, mfu_source = spec.default_mfu, f"default for {spec.key}"
    fpt = flops_per_token(shape, seq_len)
    ns_flops = newton_schulz_flops(shape) if settings.optimizer == "muon" else 0  # per process, not per token
    flops_per_step = fpt * tokens_per_step + ns_flops * n
    tokens_per_second = mfu * peak * n / fpt  # compute only, all GPUs
    compute_seconds = tokens_per_step / tokens_per_second + ns_flops / (mfu * peak)

    # memory per GPU
    params = total_params(shape, seq_len)
    capacity = int(spec.memory_gib * GIB)
    memory = memory_bytes(shape, seq_len, settings.batch_size, dtype, settings.activation_checkpointing,
                          optimizer=settings.optimizer)
    by_mode = memory_by_mode(shape, seq_len, settings.batch_size, dtype, capacity, settings.optimizer)

    # disk
    ckpt = 4 * params
    ckpt_opt = ckpt + sum(optimizer_bytes(shape, seq_len, settings.optimizer).values())
    permanent = sorted({s for s in settings.permanent_checkpoints if s <= settings.max_steps})
    retained = settings.keep_last_n_checkpoints + len(permanent)

    result: dict[str, Any] = {
        "gpu": spec.key,
        "gpu_name": spec.name,
        "num_gpus": n,
        "dtype": dtype,
        "model": {
            "arch": shape.arch, "n_layer": shape.n_layer, "n_head": shape.n_head, "n_embd": shape.n_embd,
            "vocab_size": shape.vocab_size, "seq_len": seq_len,
            "params": params, "flop_params": flop_params(shape),
        },
        "batch_size": settings.batch_size,
        "total_batch_size": tokens_per_step,
        "max_steps": settings.max_steps,
        "grad_accum_steps": grad_accum,
        "flops_per_token": fpt,
        "optimizer": settings.optimizer,
        "newton_schulz_flops_per_step": ns_flops,
        "flops_per_step": flops_per_step,
        "total_flops": flops_per_step * settings.max_steps,
        "peak_flops": peak,
        "mfu_assumed": mfu,
        "mfu_source": mfu_source,
        "tokens_per_second": tokens_per_second,
        "compute_seconds_per_step": compute_seconds,
        "activation_checkpointing": settings.activation_checkpointing,
        "memory": {**memory, "gpu_memory_bytes": capacity},
        "fits": memory["total_bytes"] <= capacity,
        "max_micro_batch": largest_micro_batch(shape, seq_len, dtype, capacity, settings.activation_checkpointing,
                                               optimizer=settings.optimizer),
        "memory_by_mode": by_mode,
        "fit_advice": fit_advice(by_mode, settings.batch_size, settings.activation_checkpointing, spec.name),
        "checkpoint_bytes": ckpt,
        "checkpoint_bytes_with_optimizer": ckpt_opt,
        "checkpoints_retained": retained,
        "disk_for_retention": retained * ckpt_opt,
    }
    allreduce = 0.0
    if n > 1:
        ic = hardware.interconnect or spec.interconnect
        bandwidth, ic_desc = INTERCONNECTS[ic]
        grad_bytes = 4 * params
        allreduce = 2 * (n - 1) / n * grad_bytes / bandwidth
        result.update(
            interconnect=ic,
            interconnect_description=ic_desc,
            interconnect_bytes_per_second=bandwidth,
            allreduce_seconds_per_step=allreduce,
            scaling_efficiency=compute_seconds / (compute_seconds + allreduce),
        )
    seconds_per_step = compute_seconds + allreduce
    total_seconds = seconds_per_step * settings.max_steps
    result.update(
        seconds_per_step=seconds_per_step,
        total_seconds=total_seconds,
        total_hours=total_seconds / 3600,
        total_days=total_seconds / 86400,
        total_human=human_duration(total_seconds),
        assumptions=[
            "FLOPs/token = 6N + 12·L·d·T, N = the params of every matmul: blocks and head, not the embedding "
            "lookups (nanoGPT/PaLM)",
            ("fp32 params, grads and AdamW moments (16 B/param)" if settings.optimizer == "adamw" else
             "fp32 params and grads; AdamW moments for embeddings and 1-D params, one Muon momentum buffer "
             f"for the block matrices; Newton-Schulz: {MUON_NS_STEPS} iterations, "
             f"{newton_schulz_block_flops(shape) / shape.n_embd ** 3:.3g}·d³ FLOPs per block each, on every GPU")
            + (f"; {dtype} autocast activations + 2 B/param autocast weight cache" if dtype != "float32"
               else "; fp32 activations")
            + "; + 1 GiB CUDA overhead",
            "activations counted per tensor (Korthikanti et al. 2022's method): per layer "
            f"{BLOCK_BYTES[shape.arch][2]:.0f}·s·b·h bytes with autocast ({BLOCK_BYTES[shape.arch][4]:.0f} in fp32), "
            f"4·s·b·h for a recomputed block; chunked loss: {LOSS_CHUNK_ROWS} rows of logits at a time; "
            "gradients (4 B/param) replace activations during backward, so the peak holds the larger of the two",
            "allreduce not overlapped with compute" if n > 1 else "single GPU: no communication",
        ],
    )
    return result


def memory_by_mode(shape: ModelShape, seq_len: int, micro_batch: int, dtype: str, capacity: int,
                   optimizer: str = "adamw") -> list[dict]:
    """Peak memory, fit and largest micro-batch for each --activation-checkpointing mode (chunked loss),
    and for the whole-logits loss the engine used before, to show what chunking saves."""
    rows = []
    for mode, chunked in [("none", False)] + [(m, True) for m in CHECKPOINTING_MODES]:
        mem = memory_bytes(shape, seq_len, micro_batch, dtype, mode, chunked, optimizer=optimizer)
        rows.append({
            "activation_checkpointing": mode, "chunked_loss": chunked,
            "activations_bytes": mem["activations_bytes"], "total_bytes": mem["total_bytes"],
            "fits": mem["total_bytes"] <= capacity,
            "max_micro_batch": largest_micro_batch(shape, seq_len, dtype, capacity, mode, chunked, optimizer),
        })
    return rows


def fit_advice(by_mode: list[dict], micro_batch: int, chosen: str, gpu_name: str) -> str:
    """One sentence: whether the run fits as asked and, if not, which settings do."""
    modes = {r["activation_checkpointing"]: r for r in by_mode if r["chunked_loss"]}
    asked = modes[chosen]
    if asked["fits"]:
        return (f"fits on one {gpu_name} at micro-batch {micro_batch} with --activation-checkpointing {chosen} "
                f"(up to micro-batch {asked['max_micro_batch']})")
    text = f"does not fit on one {gpu_name} at micro-batch {micro_batch} with --activation-checkpointing {chosen}"
    fitting = [m for m in CHECKPOINTING_MODES if modes[m]["fits"]]  # cheapest recomputation first
    smaller = [m for m in CHECKPOINTING_MODES if m not in fitting and modes[m]["max_micro_batch"] > 0]
    if fitting:
        text += f"; it fits with --activation-checkpointing {fitting[0]} (up to micro-batch {modes[fitting[0]]['max_micro_batch']})"
    if smaller:
        text += ("; or " if fitting else "; it fits with ") + ", ".join(
            f"--activation-checkpointing {m} --batch-size {modes[m]['max_micro_batch']}" for m in smaller)
        text += " (the same --total-batch-size, in more accumulation steps)"
    if not fitting and not smaller:
        text += (" nor at micro-batch 1 with full activation checkpointing: the weights, gradients and AdamW state "
                 "alone are too large; shard them over several GPUs (--model-parallel) or choose a larger GPU")
    return text


def gpu_table() -> list[dict[str, Any]]:
    """The known GPUs as rows, for `gptctl estimate --list-gpus`."""
    return [
        {
            "key": s.key,
            "name": s.name,
            "memory_gib": s.memory_gib,
            "bf16_tflops": s.bf16_tflops,
            "fp16_tflops": s.fp16_tflops,
            "fp32_tflops": s.fp32_tflops,
            "interconnect": s.interconnect,
            "default_mfu": s.default_mfu,
            "source": s.source,
        }
        for s in GPUS.values()
    ]
