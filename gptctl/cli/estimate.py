"""`gptctl estimate`: time, memory and disk of a run before starting it. Pure Python: never imports torch."""

from __future__ import annotations

import json

import typer

from gptctl.cli import app
from gptctl.cli.settings_options import GROUPS, with_settings_options
from gptctl.gpus import DEFAULT_GPU
from gptctl.settings import FINETUNE_DEFAULTS, TrainSettings, build_settings

# The training settings an estimate depends on: the same options, parsing, checks and defaults as
# `gptctl pretrain` (FINETUNE_DEFAULTS with --finetune), so an estimate is of the run training would make.
ESTIMATED = frozenset({"recipe", "arch", "model", "n_layer", "n_head", "n_embd", "seq_len", "batch_size", "total_batch_size",
                       "max_steps", "warmup_steps", "dtype", "keep_last_n_checkpoints", "permanent_checkpoints",
                       "activation_checkpointing", "optimizer"})


def _default_help(name: str) -> str:
    pretrain = TrainSettings.model_fields[name].default
    if name not in FINETUNE_DEFAULTS:
        return str(pretrain)
    finetune = FINETUNE_DEFAULTS[name]
    return f"{pretrain}; {'one micro-step per GPU' if finetune is None else finetune} with --finetune"


@app.command("estimate")
@with_settings_options("pretrain", groups=GROUPS[:-1], only=ESTIMATED,
                       defaults={name: _default_help(name) for name in ESTIMATED if name in FINETUNE_DEFAULTS})
def estimate_cmd(
    values: dict,
    gpu: str = typer.Option(DEFAULT_GPU, "--gpu", help="GPU kind (see --list-gpus)."),
    num_gpus: int = typer.Option(1, "--num-gpus", help="GPUs training together (DDP)."),
    mfu: float = typer.Option(
        None, "--mfu", help="Assumed model FLOPs utilisation in (0, 1]. (default: the median of registry runs on this GPU, else a per-GPU "
        "figure)"
    ),
    finetune: bool = typer.Option(False, "--finetune", help="Estimate a finetune: its defaults, as each option says."),
    interconnect: str = typer.Option(
        None, "--interconnect", help="pcie3, pcie4, pcie5, nvlink-bridge, nvlink2, nvlink3, nvlink4. (default: the GPU's usual one)"
    ),
    list_gpus: bool = typer.Option(False, "--list-gpus", help="Show the known GPUs and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Estimate FLOPs, training time, GPU memory, checkpoint disk and communication of a run.

    Every mode of --activation-checkpointing is shown with its memory and largest micro-batch either way.
    """
    from gptctl import estimate as est

    if list_gpus:
        rows = est.gpu_table()
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            _print_gpus(rows)
        return

    settings, _ = build_settings(values, defaults=FINETUNE_DEFAULTS if finetune else None)
    hardware = est.Hardware(gpu=gpu, num_gpus=num_gpus, mfu=mfu, interconnect=interconnect)
    from gptctl.paths import home_dir, registry_path

    runs = est.registry_runs(registry_path(home_dir())) if mfu is None else []
    result = est.estimate(settings, hardware, runs)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
    else:
        _print_estimate(result)


def _print_gpus(rows) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("key", "name", "memory GiB", "bf16 TFLOPS", "fp16 TFLOPS", "fp32/tf32 TFLOPS", "interconnect", "default MFU")
    for r in rows:
        table.add_row(r["key"], r["name"], f"{r['memory_gib']:g}", "-" if r["bf16_tflops"] is None else f"{r['bf16_tflops']:g}",
                      f"{r['fp16_tflops']:g}", f"{r['fp32_tflops']:g}", r["interconnect"], f"{r['default_mfu']:.2f}")
    Console().print(table)


def _print_estimate(r) -> None:
    from rich.console import Console
    from rich.table import Table

    from gptctl.estimate import human_bytes as hb

    m, mem = r["model"], r["memory"]
    table = Table("quantity", "value", title=f"{r['num_gpus']}× {r['gpu_name']} ({r['dtype']})")
    rows = [
        ("model", f"{m['arch']} L={m['n_layer']} H={m['n_head']} d={m['n_embd']} T={m['seq_len']} ({m['params'] / 1e6:.1f}M params)"),
        ("batch", f"{r['batch_size']} × {m['seq_len']} × {r['num_gpus']} GPU × {r['grad_accum_steps']} accum = {r['total_batch_size']:,} tokens/step"),
        ("FLOPs per token", f"{r['flops_per_token']:.4g}"),
        ("FLOPs per step", f"{r['flops_per_step']:.4g}"),
        ("peak FLOP/s per GPU", f"{r['peak_flops'] / 1e12:g} TFLOPS"),
        ("MFU assumed", f"{r['mfu_assumed']:.3f} ({r['mfu_source']})"),
        ("tokens per second", f"{r['tokens_per_second']:,.0f}"),
        ("seconds per step", f"{r['seconds_per_step']:.3f}"),
        ("total time", f"{r['total_human']} for {r['max_steps']:,} steps"),
    ]
    if r["num_gpus"] > 1:
        rows += [
            ("allreduce per step", f"{r['allreduce_seconds_per_step']:.3f} s over {r['interconnect_description']}"),
            ("scaling efficiency", f"{100 * r['scaling_efficiency']:.1f}%"),
        ]
    rows += [
        ("memory: weights (fp32)", hb(mem["weights_bytes"])),
        ("memory: gradients (fp32)", hb(mem["gradients_bytes"])),
        ("memory: AdamW moments (fp32)", hb(mem["adam_moments_bytes"])),
        *([("memory: Muon momentum (fp32)", hb(mem["muon_momentum_bytes"]))] if r["optimizer"] == "muon" else []),
        ("memory: autocast cache + CUDA", hb(mem["other_bytes"])),
        (f"memory: activations (1 micro-batch, checkpointing {r['activation_checkpointing']})",
         hb(mem["activations_bytes"])),
        ("memory: peak per GPU", f"{hb(mem['total_bytes'])} of {hb(mem['gpu_memory_bytes'])}"),
        ("fits", ("yes" if r["fits"] else "[red]no[/red]") + f" (max micro-batch {r['max_micro_batch']})"),
        ("checkpoint (weights)", hb(r["checkpoint_bytes"])),
        ("checkpoint (+ optimizer)", hb(r["checkpoint_bytes_with_optimizer"])),
        ("disk for retention", f"{hb(r['disk_for_retention'])} ({r['checkpoints_retained']} checkpoints)"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console = Console()
    console.print(table)
    modes = Table("--activation-checkpointing", "loss", f"peak at micro-batch {r['batch_size']}", "fits",
                  "largest micro-batch", title="memory per GPU by setting")
    for row in r["memory_by_mode"]:
        modes.add_row(row["activation_checkpointing"], "chunked" if row["chunked_loss"] else "whole logits (before)",
                      hb(row["total_bytes"]), "yes" if row["fits"] else "no", str(row["max_micro_batch"]))
    console.print(modes)
    console.print(r["fit_advice"][0].upper() + r["fit_advice"][1:] + ".")
    for line in r["assumptions"]:
        console.print(f"[dim]• {line}[/dim]")
