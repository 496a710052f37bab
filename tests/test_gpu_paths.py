"""The GPU code paths that a CPU can run, rehearsed on CPU: torch.compile with DDP and with FSDP2,
compiled checkpoints that resume anywhere, bf16/fp16 autocast (GradScaler) with resume, fused AdamW.

What truly needs CUDA (NCCL, TF32 flags, pinned memory) is a few lines that benchmarks/gpu_check.py
runs. Inductor compiles on CPU with the system C compiler, slowly: the compiled tests are two, tiny and
marked slow (20-40 s each on a 2-core machine with a cold inductor cache; conftest turns off SIMD
kernels, which take longest to compile)."""

import json

import pytest
import torch

from helpers import TINY_RUN, gptctl, losses, train_in_process, train_in_processes
from gptctl.checkpoints import files as ckpt
from gptctl.engine.model import GPT
from gptctl.engine.optim import make_optimizer
from gptctl.presets import PRESETS, ModelShape

SHAPE = ModelShape(n_layer=2, n_head=2, n_embd=32, block_size=16)


def tiny() -> GPT:
    torch.manual_seed(0)
    return GPT(SHAPE)


def steps(model, optimizer, n=4, autocast=None, scaler=None) -> list[float]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        idx = torch.randint(0, 50257, (2, 16), generator=g)
        optimizer.zero_grad(set_to_none=True)
        with autocast or torch.autocast("cpu", enabled=False):
            _, loss = model(idx, idx)
        if scaler is None:
            loss.backward()
            optimizer.step()
        else:
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            scaler.step(optimizer)
            scaler.update()
        out.append(loss.item())
    return out


def test_fused_adamw_is_cuda_only_by_default_and_selectable_on_cpu():
    assert not make_optimizer(tiny(), 0.1, 1e-3, "cpu").defaults["fused"]
    plain_model, fused_model = tiny(), tiny()
    fused = make_optimizer(fused_model, 0.1, 1e-3, "cpu", fused=True)
    assert fused.defaults["fused"] and len(fused.param_groups) == 2
    plain = steps(plain_model, make_optimizer(plain_model, 0.1, 1e-3, "cpu"))
    assert steps(fused_model, fused) == pytest.approx(plain, rel=1e-6)
    for a, b in zip(fused_model.parameters(), plain_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)  # biases near 0
    assert fused.state_dict()["state"][0]["exp_avg"].dtype == torch.float32  # a checkpoint like any other


def test_gradscaler_with_float16_autocast():
    # Every torch gptctl supports (>= 2.4) has CPU float16 autocast and a CPU GradScaler: a failure here
    # is a failure, never a skip.
    model = tiny()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    out = steps(model, make_optimizer(model, 0.1, 1e-3, "cpu"), 6, torch.autocast("cpu", dtype=torch.float16), scaler)
    reference = tiny()
    fp32 = steps(reference, make_optimizer(reference, 0.1, 1e-3, "cpu"), 6)
    assert out == pytest.approx(fp32, rel=2e-3)  # fp16 rounding, no skipped steps
    assert scaler.get_scale() == 2.0**16  # no inf/nan gradient: no step was skipped
    restored = torch.amp.GradScaler("cpu")
    restored.load_state_dict(scaler.state_dict())
    assert restored.get_scale() == scaler.get_scale()


# ---- real processes ---------------------------------------------------------------------------

def pretrain(home, data, name, *extra) -> dict:
    return json.loads(gptctl("pretrain", *TINY_RUN, "--data-root", str(data), "--run-name", name,
                             "--keep-last-n-checkpoints", "5", "--json", *extra, home=home).stdout)


def step_checkpoint(summary: dict, step: int) -> str:
    return next(p for p in summary["checkpoints"] if p.endswith(ckpt.checkpoint_name(step)))


def close(a: dict, b: dict, tol=2e-4) -> bool:
    return sorted(a) == sorted(b) and all(abs(a[s][0] - b[s][0]) < tol for s in a)


PLAIN_KEYS = list(GPT(PRESETS["tiny"]).state_dict())


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_autocast_training_resumes_exactly(shakespeare, tmp_path, dtype):
    """In-process Trainer; test_train_e2e resumes through real processes from a --checkpoint-path. Half the
    tokens of TINY_SETTINGS per step (CPU float16 matmuls are slow): resuming is exact at any shape."""
    args = dict(max_steps=4, checkpoint_interval=2, dtype=dtype, seq_len=16, total_batch_size=64)
    reference, saved = train_in_process(shakespeare, tmp_path / "full", **args)
    state = ckpt.load(saved[2])
    assert ("scaler" in state) == (dtype == "float16")  # the GradScaler's scale travels with a float16 run
    again, _ = train_in_process(shakespeare, tmp_path / "again", resume_from=saved[2], **args)
    assert again == {s: reference[s] for s in (3, 4)}


@pytest.mark.slow
def test_compile_with_ddp_checkpoints_without_prefixes_and_resumes_compiled_and_not(shakespeare, gptctl_home, tmp_path):
    ddp = ["--nproc-per-node", "2", "--batch-size", "2"]
    args = ["--max-steps", "4", "--checkpoint-interval", "2", "--activation-checkpointing", "selective"]
    # Eager on one process (the same tokens per step; test_train_e2e shows DDP matches it within 1e-5).
    eager, _ = train_in_process(shakespeare, tmp_path / "eager", max_steps=4, checkpoint_interval=2,
                                activation_checkpointing="selective")
    compiled_run = pretrain(gptctl_home, shakespeare, "compiled", *args, *ddp, "--compile")
    compiled = losses(gptctl_home, compiled_run["run_id"])
    assert close(compiled, eager), (compiled, eager)
    step2 = step_checkpoint(compiled_run, 2)
    state = ckpt.load(step2)
    assert list(state["model"]) == PLAIN_KEYS  # no `_orig_mod.` (compile) or checkpoint-wrapper prefixes
    assert not any("_orig_mod" in str(k) for k in state["optimizer"]["state"])
    # Into a compiled DDP run (the same Trainer on two processes forked from this one, which never compiles
    # itself: a fork inherits no compile workers; same graphs, same kernels: to the bit) and into an
    # uncompiled one.
    again, _ = train_in_processes(2, shakespeare, tmp_path / "again", resume_from=step2, max_steps=4, batch_size=2,
                                  checkpoint_interval=2, activation_checkpointing="selective", compile=True)
    assert again == {s: compiled[s] for s in (3, 4)}
    plain, _ = train_in_process(shakespeare, tmp_path / "plain", resume_from=step2, max_steps=4,
                                checkpoint_interval=2, activation_checkpointing="selective")
    assert close(plain, {s: compiled[s] for s in (3, 4)})


@pytest.mark.slow
def test_compile_with_fsdp2_and_full_activation_checkpointing_resumes_a_one_process_checkpoint(
        shakespeare, gptctl_home, tmp_path):
    """An unsharded checkpoint (one process) into a sharded, compiled run: the same losses as one process."""
    single, saved = train_in_process(shakespeare, tmp_path / "single", max_steps=4, checkpoint_interval=2)
    # Two forked processes (compile under torchrun: the DDP test above; FSDP2 under torchrun: test_sharded).
    sharded, written = train_in_processes(2, shakespeare, tmp_path / "sharded", resume_from=saved[2], max_steps=4,
                                          checkpoint_interval=4, model_parallel=True, compile=True,
                                          activation_checkpointing="full")
    assert close(sharded, {s: single[s] for s in (3, 4)})
    assert list(ckpt.load(written[4])["model"]) == PLAIN_KEYS


def test_gpu_check_smoke_runs_the_same_code_on_cpu(tmp_path):
    """benchmarks/gpu_check.py --smoke: the GPU check's code at tiny size, so that it cannot rot."""
    import subprocess
    import sys

    from helpers import REPO

    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--smoke", "--batches", "2",
                           "--steps", "3", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    result = json.loads(out.read_text())
    sides = {(r["side"], r["batch"], r["compile"]) for r in result["throughput"]}
    assert sides == {("engine", 2, False), ("bare", 2, False)}
    engine, bare = sorted(result["throughput"], key=lambda r: r["side"] != "engine")
    assert engine["tokens_per_s"] > 0 and bare["tokens_per_s"] > 0
    # Same weights and batch: the chunked loss and the whole-logits loss agree (bf16 autocast).
    assert engine["first_loss"] == pytest.approx(bare["first_loss"], rel=1e-3)
    assert result["checkpoint_stall"]["synchronous"] > 0 and result["checkpoint_stall"]["asynchronous"] > 0
    assert "engine/bare" in proc.stdout


def test_unknown_activation_checkpointing_mode_is_refused(shakespeare, gptctl_home):
    proc = gptctl("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--activation-checkpointing", "half",
                  home=gptctl_home, check=False)
    assert proc.returncode == 2 and "--activation-checkpointing" in proc.stderr and "Traceback" not in proc.stderr
    assert not gptctl_home.exists() or not any(gptctl_home.rglob("*.pt"))
