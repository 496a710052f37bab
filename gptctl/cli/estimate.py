"""`gptctl estimate`: time, memory and disk of a run before starting it. Pure Python: never imports torch."""

from __future__ import annotations

import json

import typer

from gptctl.cli import app
from gptctl.errors import UserError
from gptctl.settings import FINETUNE_DEFAULTS, TrainSettings

DEFAULT_GPU = "rtx3090"  # the single consumer card most nanoGPT users train GPT-2 124M on


def _default(name: str, finetune: bool):
    """The value `gptctl pretrain` (or `finetune`) would use: one source of defaults for both commands."""
    if finetune and name in FINETUNE_DEFAULTS:
        return FINETUNE_DEFAULTS[name]
    return TrainSettings.model_fields[name].default


def _help(name: str) -> str:
    """The training option's own help, with its defaults for pretrain and finetune."""
    text = (TrainSettings.model_fields[name].description or "").split(" (default:")[0]
    pretrain, finetune = _default(name, False), _default(name, True)
    finetune = "one micro-step per GPU" if finetune is None else finetune
    default = f"{pretrain}" if pretrain == finetune else f"{pretrain}; {finetune} with --finetune"
    return f"{text} (default: {default})" if pretrain is not None else text


def _parse_steps(value: str | None) -> list[int]:
    if not value:
        return []
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise UserError(f"--permanent-checkpoints: expected positive step numbers separated by commas, got {value!r}")
    return [int(p) for p in parts]


@app.command("estimate")
def estimate_cmd(
    gpu: str = typer.Option(DEFAULT_GPU, "--gpu", help="GPU kind (see --list-gpus)."),
    num_gpus: int = typer.Option(1, "--num-gpus", help="GPUs training together (DDP)."),
    model: str = typer.Option(None, "--model", help=_help("model"), show_default=False),
    n_layer: int = typer.Option(None, "--n-layer", help=_help("n_layer")),
    n_head: int = typer.Option(None, "--n-head", help=_help("n_head")),
    n_embd: int = typer.Option(None, "--n-embd", help=_help("n_embd")),
    seq_len: int = typer.Option(None, "--seq-len", help=_help("seq_len"), show_default=False),
    batch_size: int = typer.Option(None, "--batch-size", help=_help("batch_size"), show_default=False),
    total_batch_size: int = typer.Option(None, "--total-batch-size", help=_help("total_batch_size"),
                                         show_default=False),
    max_steps: int = typer.Option(None, "--max-steps", help=_help("max_steps"), show_default=False),
    dtype: str = typer.Option(None, "--dtype", help=_help("dtype"), show_default=False),
    mfu: float = typer.Option(
        None, "--mfu", help="Assumed model FLOPs utilisation in (0, 1]. (default: the median of registry runs on this GPU, else a per-GPU "
        "figure)"
    ),
    finetune: bool = typer.Option(False, "--finetune", help="Estimate a finetune: its defaults, as each option says."),
    keep_last_n_checkpoints: int = typer.Option(None, "--keep-last-n-checkpoints", help=_help("keep_last_n_checkpoints"),
                                                show_default=False),
    permanent_checkpoints: str = typer.Option(None, "--permanent-checkpoints", help="Steps never deleted, e.g. 10000,20000,30000."),
    interconnect: str = typer.Option(
        None, "--interconnect", help="pcie3, pcie4, pcie5, nvlink-bridge, nvlink2, nvlink3, nvlink4. (default: the GPU's usual one)"
    ),
    activation_checkpointing: str = typer.Option(
        None, "--activation-checkpointing", help=_help("activation_checkpointing")
        + " Every mode's memory and largest micro-batch are shown either way.", show_default=False),
    list_gpus: bool = typer.Option(False, "--list-gpus", help="Show the known GPUs and exit."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Estimate FLOPs, training time, GPU memory, checkpoint disk and communication of a run."""
    from gptctl import estimate as est

    if list_gpus:
        rows = est.gpu_table()
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
        else:
            _print_gpus(rows)
        return

    given = {"model": model, "n_layer": n_layer, "n_head": n_head, "n_embd": n_embd, "seq_len": seq_len,
             "batch_size": batch_size, "total_batch_size": total_batch_size, "max_steps": max_steps, "dtype": dtype,
             "keep_last_n_checkpoints": keep_last_n_checkpoints, "activation_checkpointing": activation_checkpointing}
    inp = est.EstimateInputs(
        gpu=gpu, num_gpus=num_gpus, mfu=mfu, permanent_checkpoints=_parse_steps(permanent_checkpoints),
        interconnect=interconnect,
        **{name: _default(name, finetune) if value is None else value for name, value in given.items()},
    )
    est.validate(inp)
    runs = est.registry_runs() if mfu is None else []
    result = est.estimate(inp, runs)
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
        ("model", f"L={m['n_layer']} H={m['n_head']} d={m['n_embd']} T={m['seq_len']} ({m['params'] / 1e6:.1f}M params)"),
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
