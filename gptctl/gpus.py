"""Known GPUs: dense peak throughput per training dtype, memory, default interconnect. Pure Python.

Peak numbers are *dense* (no 2:4 sparsity) tensor-core FLOP/s from NVIDIA's datasheets and
architecture whitepapers, in the mode training actually uses:

* bfloat16 / float16: tensor cores with **fp32 accumulate** (what PyTorch autocast matmuls use).
  On GeForce cards that is half the "FP16 Tensor TFLOPS with FP16 accumulate" headline
  (e.g. RTX 3090: 142 with fp16 accumulate, 71 with fp32 accumulate).
* float32: gptctl enables TF32 matmuls (torch.backends.cuda.matmul.allow_tf32), so this is the
  dense TF32 tensor-core peak where the GPU has TF32 (Ampere and later), else the plain FP32 peak
  (T4, V100).

T4 and V100 (Turing/Volta) have no bfloat16 tensor cores: `peak_flops(key, "bfloat16")` raises
UserError on them (it does not silently fall back); use float16 or float32 there.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from gptctl.errors import UserError

TFLOPS = 1e12


@dataclass(frozen=True)
class GpuSpec:
    key: str
    name: str
    memory_gib: float
    bf16_tflops: float | None  # None: no bfloat16 support
    fp16_tflops: float
    fp32_tflops: float  # TF32 tensor-core where available, else FP32
    interconnect: str  # default interconnect between GPUs of this kind, a key of INTERCONNECTS
    default_mfu: float
    source: str


# Default MFU (model FLOPs utilisation, with the 6N + 12·L·d·T accounting) of a nanoGPT-style GPT-2
# run with torch.compile and flash attention. Datacenter cards: nanoGPT/llm.c report ~40-50% on
# A100/H100 for GPT-2 124M; we assume 0.40 (H100/H200 a little lower, 0.38: their peak grows
# faster than memory bandwidth, so the non-matmul work weighs more). Consumer/inference cards
# (GeForce, A10G, L4, T4) are assumed 0.35 (V100: 0.30, its fp16 peak is hard to reach).
# These are guesses; `--mfu` overrides them and registry runs on the same GPU replace them.
DATACENTER_MFU = 0.40
CONSUMER_MFU = 0.35
DEFAULT_GPU = "rtx3090"  # what `gptctl estimate` assumes: the consumer card most nanoGPT users train GPT-2 124M on

GPUS: dict[str, GpuSpec] = {
    spec.key: spec
    for spec in [
        # GA106 (RTX 3060): NVIDIA Ampere GA102 whitepaper appendix / RTX 3060 specs:
        # FP16 tensor w/ FP32 acc 25.6 (51.2 w/ FP16 acc), TF32 12.7, FP32 12.7.
        GpuSpec("rtx3060", "NVIDIA GeForce RTX 3060", 12, 25.6, 25.6, 12.7, "pcie4", CONSUMER_MFU,
                "NVIDIA Ampere GA102 whitepaper (GA106 figures)"),
        # GA102 whitepaper, Table 9: RTX 3090 FP16/BF16 tensor w/ FP32 acc 71 (142 w/ FP16 acc), TF32 35.6.
        GpuSpec("rtx3090", "NVIDIA GeForce RTX 3090", 24, 71.0, 71.0, 35.6, "pcie4", CONSUMER_MFU,
                "NVIDIA Ampere GA102 GPU architecture whitepaper"),
        # Ada AD102 whitepaper: RTX 4090 FP16/BF16 tensor w/ FP32 acc 165.2 (330.3 w/ FP16 acc), TF32 82.6.
        GpuSpec("rtx4090", "NVIDIA GeForce RTX 4090", 24, 165.2, 165.2, 82.6, "pcie4", CONSUMER_MFU,
                "NVIDIA Ada Lovelace architecture whitepaper"),
        # AWS's A10 variant (g5 instances); no NVIDIA datasheet. Commonly quoted: BF16 tensor 70,
        # TF32 35, FP32 35 (the A10 datasheet's 125 BF16 does not apply to the A10G).
        GpuSpec("a10g", "NVIDIA A10G", 24, 70.0, 70.0, 35.0, "pcie4", CONSUMER_MFU,
                "AWS G5 / published A10 vs A10G comparisons"),
        # L4 datasheet: BF16/FP16 242 and TF32 120 *with sparsity* -> 121 / 60 dense.
        GpuSpec("l4", "NVIDIA L4", 24, 121.0, 121.0, 60.0, "pcie4", CONSUMER_MFU, "NVIDIA L4 datasheet"),
        # T4 datasheet: mixed-precision FP16/FP32 65, FP32 8.1; Turing has no BF16 and no TF32.
        # 16 GB nominal, 15 GiB visible to CUDA (15360 MiB in nvidia-smi).
        GpuSpec("t4", "NVIDIA Tesla T4", 15, None, 65.0, 8.1, "pcie3", CONSUMER_MFU, "NVIDIA T4 datasheet"),
        # V100 SXM2 datasheet: tensor (FP16, FP32 acc) 125, FP32 15.7; Volta has no BF16 and no TF32.
        # Memory: the 16 GB model (cloud p3 instances); the 32 GB model matches too and is underestimated.
        GpuSpec("v100", "NVIDIA Tesla V100 SXM2", 16, None, 125.0, 15.7, "nvlink2", 0.30,
                "NVIDIA V100 datasheet"),
        # A100 datasheet: BF16/FP16 tensor 312, TF32 156 (dense).
        GpuSpec("a100-40gb", "NVIDIA A100 40GB", 40, 312.0, 312.0, 156.0, "nvlink3", DATACENTER_MFU,
                "NVIDIA A100 datasheet"),
        GpuSpec("a100-80gb", "NVIDIA A100 80GB", 80, 312.0, 312.0, 156.0, "nvlink3", DATACENTER_MFU,
                "NVIDIA A100 datasheet"),
        # H100 SXM datasheet: BF16/FP16 1979 and TF32 989 *with sparsity* -> 989.4 / 494.7 dense.
        GpuSpec("h100", "NVIDIA H100 SXM 80GB", 80, 989.4, 989.4, 494.7, "nvlink4", 0.38,
                "NVIDIA H100 datasheet (SXM)"),
        # H200 datasheet: same compute as H100 SXM, 141 GB HBM3e.
        GpuSpec("h200", "NVIDIA H200 141GB", 141, 989.4, 989.4, 494.7, "nvlink4", 0.38,
                "NVIDIA H200 datasheet"),
    ]
}

# Nominal per-direction GPU-to-GPU bandwidth in bytes/s (what a ring allreduce is bound by).
# Real NCCL bus bandwidth is typically 70-90% of these.
INTERCONNECTS: dict[str, tuple[float, str]] = {
    "pcie3": (16e9, "PCIe 3.0 x16, 16 GB/s per direction"),
    "pcie4": (32e9, "PCIe 4.0 x16, 32 GB/s per direction"),
    "pcie5": (64e9, "PCIe 5.0 x16, 64 GB/s per direction"),
    "nvlink-bridge": (56.25e9, "NVLink bridge (RTX 3090/A10), 56.25 GB/s per direction"),
    "nvlink2": (150e9, "NVLink 2 (V100 SXM2), 150 GB/s per direction"),
    "nvlink3": (300e9, "NVLink 3 (A100 SXM4), 300 GB/s per direction"),
    "nvlink4": (450e9, "NVLink 4 (H100/H200 SXM), 450 GB/s per direction"),
}

_DTYPES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "tf32": "float32", "float": "float32",
}

# (pattern on the lower-cased torch.cuda.get_device_name(), key); first match wins.
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"rtx 3060", "rtx3060"),
    (r"rtx 3090", "rtx3090"),
    (r"rtx 4090", "rtx4090"),
    (r"\ba10g\b", "a10g"),
    (r"\bl4\b", "l4"),
    (r"\bt4\b", "t4"),
    (r"\bv100", "v100"),
    (r"\ba100\b.*80\s*gb", "a100-80gb"),
    (r"\ba100\b", "a100-40gb"),
    (r"\bh200\b", "h200"),
    (r"\bh100\b", "h100"),
]


def normalize_dtype(dtype: str) -> str:
    """'bfloat16', 'float16' or 'float32' for any usual spelling (torch.bfloat16, bf16, fp32...)."""
    name = str(dtype).lower().removeprefix("torch.")
    if name not in _DTYPES:
        raise UserError(f"--dtype: unknown dtype {dtype!r}; choose bfloat16, float16 or float32")
    return _DTYPES[name]


def get_gpu(key: str) -> GpuSpec:
    """The spec of a table key (case-insensitive); UserError naming --gpu and the known keys otherwise."""
    spec = GPUS.get(str(key).lower())
    if spec is None:
        raise UserError(f"--gpu: unknown GPU {key!r}; known: {', '.join(GPUS)}")
    return spec


def match_gpu(device_name: str) -> str | None:
    """Table key for a torch.cuda.get_device_name() string, e.g. 'NVIDIA A100-SXM4-80GB' -> 'a100-80gb'.

    Also accepts a table key itself. None for CPUs and GPUs not in the table.
    """
    if not device_name:
        return None
    name = str(device_name).strip().lower()
    if name in GPUS:
        return name
    name = name.replace("-", " ").replace("_", " ")
    for pattern, key in _NAME_PATTERNS:
        if re.search(pattern, name):
            return key
    return None


def peak_flops(key: str, dtype: str) -> float:
    """Dense peak FLOP/s of one GPU of table key `key` for training in `dtype`.

    `dtype` is bfloat16/float16/float32 (also bf16, fp16, fp32, torch.bfloat16). Raises UserError
    for an unknown key, an unknown dtype, or bfloat16 on a GPU without it (T4, V100).
    """
    spec = get_gpu(key)
    dt = normalize_dtype(dtype)
    if dt == "bfloat16":
        if spec.bf16_tflops is None:
            raise UserError(
                f"--dtype: {spec.name} ({spec.key}) has no bfloat16 support; use --dtype float16 or float32"
            )
        return spec.bf16_tflops * TFLOPS
    if dt == "float16":
        return spec.fp16_tflops * TFLOPS
    return spec.fp32_tflops * TFLOPS
