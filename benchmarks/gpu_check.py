"""The GPU check: is gptctl's engine fast and correct on this GPU? One command, sized for at most 8 minutes on one
H100/H200 (most of it torch.compile; not yet run on a GPU: no task so far was lent one):

    python benchmarks/gpu_check.py                       # gpt2 124M, T=1024, bf16, B=16/32/64 × compile off/on
    python benchmarks/gpu_check.py --json gpu_check.json
    python benchmarks/gpu_check.py --smoke               # the same code, tiny, on CPU, in seconds (a test runs it)

For each micro-batch × compile setting, two sides run interleaved in this one process, the order
alternating, each with a fresh model from the same seed:

* engine: gptctl's own training step, not a copy of it: GPT (chunked loss, --activation-checkpointing),
  make_optimizer (fused AdamW on CUDA), parallel.wrap (torch.compile), autocast_for, and
  gptctl.engine.trainer.Trainer itself, fed device-resident batches (data loading is measured elsewhere:
  benchmarks/data_loading.py);
* bare: a build-nanogpt-style loop written here: its own GPT with the whole-logits loss,
  fused AdamW, clipping, loss.item() and torch.cuda.synchronize() once per step.

Per side: median step time after --warmup steps, tokens/s, MFU (gptctl.estimate's FLOPs per token
over the GPU's dense bf16 peak from gptctl.gpus) and peak CUDA memory; the figure is engine/bare.
Then: the first-step loss of both sides from the same weights and batch (the chunked loss against
F.cross_entropy on whole logits); host-device syncs per engine step, counted with
torch.cuda.set_sync_debug_mode("warn") between two steps' metrics callbacks (the target is one: the
loss/flags all-reduce's .tolist()); and the checkpoint stall from CUDA: how long
CheckpointManager.save blocks the loop, synchronous and asynchronous, for the worker's full state
(parallel.full_state). It prints tables and, with --json, writes every figure.
"""

import argparse
import gc
import json
import math
import time
import warnings
from pathlib import Path

from _common import DATE, print_footer, print_header, print_table, scratch_dir

SEED = 1337
LR = 6e-4


def build_bare_model(shape):
    """build-nanogpt's GPT (Karpathy), condensed: the same parameter names, loss on whole logits."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_attn, self.c_proj = nn.Linear(shape.n_embd, 3 * shape.n_embd), nn.Linear(shape.n_embd, shape.n_embd)

        def forward(self, x):
            B, T, C = x.size()
            q, k, v = (t.view(B, T, shape.n_head, C // shape.n_head).transpose(1, 2)
                       for t in self.c_attn(x).split(C, dim=2))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.gelu = nn.Linear(shape.n_embd, 4 * shape.n_embd), nn.GELU(approximate="tanh")
            self.c_proj = nn.Linear(4 * shape.n_embd, shape.n_embd)

        def forward(self, x):
            return self.c_proj(self.gelu(self.c_fc(x)))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln_1, self.attn = nn.LayerNorm(shape.n_embd), Attention()
            self.ln_2, self.mlp = nn.LayerNorm(shape.n_embd), MLP()

        def forward(self, x):
            x = x + self.attn(self.ln_1(x))
            return x + self.mlp(self.ln_2(x))

    class BareGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.transformer = nn.ModuleDict(dict(
                wte=nn.Embedding(shape.vocab_size, shape.n_embd), wpe=nn.Embedding(shape.block_size, shape.n_embd),
                h=nn.ModuleList([Block() for _ in range(shape.n_layer)]), ln_f=nn.LayerNorm(shape.n_embd)))
            self.lm_head = nn.Linear(shape.n_embd, shape.vocab_size, bias=False)
            self.transformer.wte.weight = self.lm_head.weight

        def forward(self, idx, targets):
            pos = torch.arange(0, idx.size(1), dtype=torch.long, device=idx.device)
            x = self.transformer.wte(idx) + self.transformer.wpe(pos)
            for block in self.transformer.h:
                x = block(x)
            logits = self.lm_head(self.transformer.ln_f(x))
            return logits, F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1))

    return BareGPT()


class DeviceBatches:
    """The same fixed random batches for both sides, already on the device."""

    def __init__(self, batch: int, seq_len: int, device, count: int = 4):
        import torch

        g = torch.Generator().manual_seed(SEED)
        bufs = [torch.randint(0, 50257, (batch, seq_len + 1), generator=g) for _ in range(count)]
        self.data = [(b[:, :-1].contiguous().to(device), b[:, 1:].contiguous().to(device)) for b in bufs]

    def batch(self, step: int, micro: int):
        return self.data[(step + micro) % len(self.data)]

    def scale(self, step: int, micro: int) -> float:
        return 1.0


def engine_model(shape, device, checkpointing="none"):
    import torch

    from gptctl.engine.model import GPT

    torch.manual_seed(SEED)
    return GPT(shape, checkpointing).to(device)


def engine_rows(shape, seq_len, batch, steps, compile_, device, dtype, on_row=None) -> list[dict]:
    """`steps` steps of gptctl's own Trainer (its model, optimizer, compile and loop) on device-resident batches."""
    from gptctl.engine.distributed import Dist
    from gptctl.engine.trainer import Metrics, Trainer
    from gptctl.settings import TrainSettings

    settings = TrainSettings(n_layer=shape.n_layer, n_head=shape.n_head, n_embd=shape.n_embd, seq_len=seq_len,
                             batch_size=batch, total_batch_size=None, max_steps=steps, warmup_steps=2, max_lr=LR,
                             min_lr=LR / 10, eval_interval=10**9, eval_steps=1, checkpoint_interval=10**9,
                             compile=compile_, device=device.type, dtype=str(dtype).removeprefix("torch."), seed=SEED)
    batches = DeviceBatches(batch, seq_len, device)
    rows = []

    class Collect(Metrics):
        def log(self, row):
            rows.append(row)
            if on_row:
                on_row(row)

    trainer = Trainer(settings, Dist(0, 0, 1, device), loaders=(batches, batches), metrics=Collect())
    trainer.train()
    return rows


def bare_rows(shape, seq_len, batch, steps, compile_, device, dtype) -> list[dict]:
    """The build-nanogpt loop: one loss.item() and torch.cuda.synchronize() per step."""
    import torch

    from gptctl.schedule import Schedule

    bare = build_bare_model(shape).to(device)
    bare.load_state_dict(engine_model(shape, device).state_dict())  # the same initial weights as the engine
    params = [p for p in bare.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": 0.1},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=LR, betas=(0.9, 0.95), eps=1e-8, fused=device.type == "cuda")
    model = torch.compile(bare) if compile_ else bare
    schedule = Schedule("cosine", LR, LR / 10, 2, steps)
    batches = DeviceBatches(batch, seq_len, device)
    rows = []
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        x, y = batches.batch(step, 0)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(bare.parameters(), 1.0)
        for group in optimizer.param_groups:
            group["lr"] = schedule.at(step)
        optimizer.step()
        value = loss.item()
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        rows.append({"step": step, "loss": value, "tokens_per_s": batch * seq_len / dt})
    return rows


def measure_side(side, shape, seq_len, batch, steps, warmup, compile_, device, dtype, peak_flops) -> dict:
    import torch

    from gptctl.estimate import flops_per_token

    torch._dynamo.reset()  # each side compiles its own graphs from scratch, with static shapes
    gc.collect()  # the previous side's model and optimizer are gone before the peak is reset
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    fn = engine_rows if side == "engine" else bare_rows
    try:
        rows = fn(shape, seq_len, batch, steps, compile_, device, dtype)
    except torch.cuda.OutOfMemoryError:  # e.g. the bare loop's whole logits at B=64 on an 80 GB card
        torch.cuda.empty_cache()
        return {"side": side, "batch": batch, "compile": compile_, "oom": True, "first_loss": math.nan,
                "tokens_per_s": math.nan, "step_s": math.nan, "mfu": None,
                "peak_memory_bytes": torch.cuda.max_memory_allocated(), "compile_and_warmup_s": None}
    timed = sorted(r["tokens_per_s"] for r in rows[warmup:-1] or rows[-1:])  # the last step evaluates
    tokens_per_s = timed[len(timed) // 2]
    fpt = flops_per_token(shape, seq_len)
    return {
        "side": side, "batch": batch, "compile": compile_, "first_loss": rows[0]["loss"],
        "tokens_per_s": tokens_per_s, "step_s": batch * seq_len / tokens_per_s,
        "mfu": fpt * tokens_per_s / peak_flops if peak_flops else None,
        "peak_memory_bytes": torch.cuda.max_memory_allocated() if device.type == "cuda" else None,
        "compile_and_warmup_s": sum(batch * seq_len / r["tokens_per_s"] for r in rows[:warmup]),
    }


def syncs_per_step(shape, seq_len, batch, device, dtype) -> dict:
    """Host-device syncs between the metrics rows of consecutive engine steps, and where they happen."""
    import torch

    if device.type != "cuda":
        return {"syncs_per_step": None, "where": "n/a: torch.cuda.set_sync_debug_mode needs CUDA"}
    marks = []

    def syncs(caught):
        return [w for w in caught if "synchroniz" in str(w.message)]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            engine_rows(shape, seq_len, batch, 6, False, device, dtype,
                        on_row=lambda row: marks.append(len(syncs(caught))))
        finally:
            torch.cuda.set_sync_debug_mode(0)
        found = syncs(caught)
    counts = [b - a for a, b in zip(marks[2:-2], marks[3:-1])]  # steady steps, not the first or the final one
    spots = sorted({f"{Path(w.filename).name}:{w.lineno}" for w in found[marks[2]:marks[3]]}) if len(marks) > 3 else []
    return {"syncs_per_step": max(counts) if counts else None, "per_step": counts, "where": ", ".join(spots),
            "all_syncs": len(found)}


def checkpoint_stall(shape, device, work: Path) -> dict:
    """Seconds CheckpointManager.save blocks for the worker's full state, synchronous and asynchronous."""
    import torch

    from checkpoint_stall import make_manager
    from gptctl.engine import parallel
    from gptctl.engine.optim import make_optimizer

    model = engine_model(shape, device)
    optimizer = make_optimizer(model, 0.1, LR, device.type)
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    optimizer.step()  # both AdamW moments exist, as in a real checkpoint
    managers = make_manager(work / "home", "gpt2")
    managers.asynchronous.copy_state = device.type != "cuda"  # as the worker: full_state from CUDA is already a copy

    def state():
        model_state, optimizer_state = parallel.full_state(model, optimizer)
        return {"model": model_state, "optimizer": optimizer_state, "step": 1}

    out = {}
    for step, (name, manager) in enumerate([("synchronous", managers.synchronous), ("asynchronous", managers.asynchronous),
                                            ("synchronous", managers.synchronous), ("asynchronous", managers.asynchronous)]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        manager.save(step + 1, state)
        blocked = time.perf_counter() - t0
        manager.wait()
        out[name] = min(blocked, out.get(name, math.inf))
    out["asynchronous_over_synchronous"] = out["asynchronous"] / out["synchronous"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="Tiny model on CPU, compile off: the code path in seconds.")
    parser.add_argument("--batches", default=None, help="Micro-batch sizes. (default: 16,32,64; smoke: 2,4)")
    parser.add_argument("--compile", default=None, help="Compile settings to run: off,on. (default: off,on; smoke: off)")
    parser.add_argument("--steps", type=int, default=None, help="Steps per side. (default: 12; smoke: 4)")
    parser.add_argument("--warmup", type=int, default=None, help="Steps left out of the timing. (default: 4; smoke: 1)")
    parser.add_argument("--json", type=Path, default=None, help="Write every figure here.")
    args = parser.parse_args()

    import torch

    from gptctl.gpus import match_gpu, peak_flops
    from gptctl.presets import PRESETS, ModelShape

    smoke = args.smoke
    device = torch.device("cpu" if smoke or not torch.cuda.is_available() else "cuda")
    if not smoke and device.type != "cuda":
        parser.error("no CUDA device: run with --smoke for the CPU rehearsal")
    seq_len = 32 if smoke else 1024
    shape = ModelShape(2, 2, 64, block_size=seq_len) if smoke else PRESETS["gpt2"]
    batches = [int(b) for b in (args.batches or ("2,4" if smoke else "16,32,64")).split(",")]
    compiles = [c == "on" for c in (args.compile or ("off" if smoke else "off,on")).split(",")]
    steps, warmup = args.steps or (4 if smoke else 12), args.warmup or (1 if smoke else 4)
    dtype = torch.bfloat16
    if device.type == "cuda":  # what the worker sets on CUDA
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    key = match_gpu(name)
    peak = peak_flops(key, "bfloat16") if key else None
    print_header("gpu check" + (" (smoke)" if smoke else ""), "python benchmarks/gpu_check.py" + (" --smoke" if smoke else ""))
    print(f"device: {name} (table key {key}, bf16 peak {peak / 1e12 if peak else '?'} TFLOPS), torch {torch.__version__}")
    started = time.perf_counter()

    results, rows = [], []
    order = 0
    for batch in batches:
        for compile_ in compiles:
            pair = {}
            for side in (("engine", "bare") if order % 2 == 0 else ("bare", "engine")):
                pair[side] = measure_side(side, shape, seq_len, batch, steps, warmup, compile_, device, dtype, peak)
                results.append(pair[side])
            order += 1
            e, b = pair["engine"], pair["bare"]
            mem = lambda r: r["peak_memory_bytes"] / 2**30 if r["peak_memory_bytes"] is not None else "-"  # noqa: E731
            pct = lambda r: f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"  # noqa: E731
            tps = lambda r: "OOM" if r.get("oom") else r["tokens_per_s"]  # noqa: E731
            ratio = "-" if e.get("oom") or b.get("oom") else f"{e['tokens_per_s'] / b['tokens_per_s']:.3f}"
            rows.append([batch, "on" if compile_ else "off", tps(e), tps(b), ratio, pct(e), pct(b), 1000 * e["step_s"],
                         1000 * b["step_s"], mem(e), mem(b), f"{e['first_loss']:.4f}/{b['first_loss']:.4f}"])
            print(f"  B={batch} compile={compile_}: {rows[-1][2:5]} ({time.perf_counter() - started:.0f} s)", flush=True)
    print_table(f"throughput, {'tiny' if smoke else 'gpt2 124M'}, T={seq_len}, bf16 (median step after {warmup} warm-up)",
                ["B", "compile", "engine tok/s", "bare tok/s", "engine/bare", "engine MFU", "bare MFU", "engine ms",
                 "bare ms", "engine GiB", "bare GiB", "first loss e/b"], rows)

    try:  # the throughput figures above are kept whatever happens below
        syncs = syncs_per_step(shape, seq_len, batches[0], device, dtype)
        print(f"\nhost-device syncs per engine step: {syncs['syncs_per_step']} ({syncs['where']})")
    except Exception as exc:  # noqa: BLE001
        syncs = {"error": repr(exc)}
        print(f"\nhost-device sync check failed: {exc!r}")
    try:
        with scratch_dir() as work:
            stall = checkpoint_stall(shape, device, work)
        print(f"checkpoint stall from {device.type}: synchronous {stall['synchronous']:.3f} s, asynchronous "
              f"{stall['asynchronous']:.3f} s (ratio {stall['asynchronous_over_synchronous']:.2f})")
    except Exception as exc:  # noqa: BLE001
        stall = {"error": repr(exc)}
        print(f"checkpoint stall check failed: {exc!r}")
    total = time.perf_counter() - started
    print(f"total {total:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"date": DATE, "device": name, "gpu_key": key, "torch": torch.__version__,
                                         "seq_len": seq_len, "smoke": smoke, "throughput": results,
                                         "syncs": syncs, "checkpoint_stall": stall, "total_s": total}, indent=2))
    print_footer()


if __name__ == "__main__":
    main()
