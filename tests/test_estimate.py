"""`gptctl estimate`, gptctl.estimate and gptctl.gpus: formulas against hand-computed values, errors, calibration."""

import json
import os
import subprocess
import sys
import uuid

import pytest

from helpers import add_run

import gptctl.cli.estimate  # noqa: F401  (registers the command even if gptctl.cli does not list it yet)
from gptctl.cli import app
from gptctl.estimate import (
    activation_bytes,
    estimate,
    flop_params,
    flops_per_token,
    measured_mfus,
    total_params,
)
from gptctl.errors import UserError
from gptctl.gpus import GPUS, match_gpu, peak_flops
from gptctl.presets import PRESETS, ModelShape
from gptctl.settings import TrainSettings


GPT2 = PRESETS["gpt2"]
ODD = ModelShape(n_layer=3, n_head=3, n_embd=96, block_size=128)

# Hand-computed (V = 50304):
# GPT-2 124M, d=768, L=12: per block 12d² + 13d = 7,087,872; ×12 + ln_f 2d = 85,056,000;
#   + wte V·d = 38,633,472 -> N = 123,689,472; + wpe 1024·768 = 786,432 -> P = 124,475,904.
#   FLOPs/token = 6·123,689,472 + 12·12·768·1024 = 742,136,832 + 113,246,208 = 855,383,040.
GPT2_N, GPT2_P, GPT2_FPT = 123_689_472, 124_475_904, 855_383_040
# L=3, H=3, d=96, T=128: per block 12·9216 + 13·96 = 111,840; ×3 + 192 = 335,712; + V·96 = 4,829,184
#   -> N = 5,164,896; + wpe 128·96 = 12,288 -> P = 5,177,184.
#   FLOPs/token = 6·5,164,896 + 12·3·96·128 = 30,989,376 + 442,368 = 31,431,744.
ODD_N, ODD_P, ODD_FPT = 5_164_896, 5_177_184, 31_431_744


def est(runner, *args):
    return runner.invoke(app, ["estimate", *map(str, args)])


def est_json(runner, *args):
    result = est(runner, *args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(autouse=True)
def empty_home(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTCTL_HOME", str(tmp_path / "home"))


# ---- formulas ---------------------------------------------------------------------------------


def test_flops_per_token_gpt2():
    assert flop_params(GPT2) == GPT2_N
    assert total_params(GPT2, 1024) == GPT2_P
    assert flops_per_token(GPT2, 1024) == GPT2_FPT


def test_flops_per_token_odd_shape():
    assert flop_params(ODD) == ODD_N
    assert total_params(ODD, 128) == ODD_P
    assert flops_per_token(ODD, 128) == ODD_FPT


def test_activation_bytes_odd_shape():
    # s·b·h = 128·2·96 = 24,576 (256 rows). bf16 autocast: a block keeps 38 bytes per s·b·h = 933,888, ×3 =
    # 2,801,664; ln_f input 4·24,576 = 98,304; chunked loss: head-input gradient 98,304 + head-weight
    # gradient 4·50304·96 = 19,316,736 + 256 rows of logits × 50304 × (4 + 2) = 77,266,944.
    loss = 98_304 + 19_316_736 + 77_266_944
    assert activation_bytes(ODD, 128, 2, "bfloat16") == 2_801_664 + 98_304 + loss == 99_581_952
    # fp32: 68 bytes per s·b·h per block (×3 = 5,013,504), 4 bytes per logit in the chunk (51,511,296)
    assert activation_bytes(ODD, 128, 2, "float32") == 5_013_504 + 98_304 + 98_304 + 19_316_736 + 51_511_296
    # full: every block keeps its fp32 input (4·24,576 each) + one block rebuilt in backward
    assert activation_bytes(ODD, 128, 2, "bfloat16", "full") == 3 * 98_304 + 933_888 + 98_304 + loss == 98_009_088
    # selective: blocks 0 and 2 recomputed, block 1 kept whole
    assert activation_bytes(ODD, 128, 2, "bfloat16", "selective") == 933_888 + 2 * 98_304 + 933_888 + 98_304 + loss
    # the whole-logits loss it replaced: s·b·V·(2 + 12) = 180,289,536
    assert activation_bytes(ODD, 128, 2, "bfloat16", "none", chunked_loss=False) == 2_801_664 + 98_304 + 180_289_536


def test_engine_and_estimate_agree_on_the_loss_chunk():
    from gptctl.engine import model
    from gptctl.estimate import CHECKPOINTING_MODES, LOSS_CHUNK_ROWS

    assert LOSS_CHUNK_ROWS == model.LOSS_CHUNK_ROWS and CHECKPOINTING_MODES == model.CHECKPOINTING_MODES


def test_gpt2_rtx3090_defaults(runner):
    r = est_json(runner)
    assert r["gpu"] == "rtx3090" and r["num_gpus"] == 1 and r["dtype"] == "bfloat16"
    assert r["flops_per_token"] == GPT2_FPT
    assert r["flops_per_step"] == GPT2_FPT * 524288
    assert r["peak_flops"] == 71e12
    assert r["mfu_assumed"] == 0.35 and r["mfu_source"] == "default for rtx3090"
    assert r["tokens_per_second"] == pytest.approx(0.35 * 71e12 / GPT2_FPT)
    assert r["seconds_per_step"] == pytest.approx(524288 / (0.35 * 71e12 / GPT2_FPT))
    assert r["total_seconds"] == pytest.approx(40000 * r["seconds_per_step"])
    assert r["grad_accum_steps"] == 32
    mem = r["memory"]
    assert mem["weights_bytes"] == 4 * GPT2_P
    assert mem["gradients_bytes"] == 4 * GPT2_P
    assert mem["adam_moments_bytes"] == 8 * GPT2_P
    assert mem["other_bytes"] == 2 * GPT2_P + 1024**3
    # 12 layers × 38·1024·16·768, ln_f input and head-input gradient 2 × 4·1024·16·768, head-weight
    # gradient 4·50304·768, 2048 rows of logits × 50304 × 6
    per_sample = 12 * 38 * 1024 * 768 + 8 * 1024 * 768
    fixed = 4 * 50304 * 768 + 2048 * 50304 * 6
    assert mem["activations_bytes"] == 16 * per_sample + fixed
    # gradients (4P) come while activations go: the peak holds the larger (here the activations)
    assert mem["total_bytes"] == 14 * GPT2_P + 1024**3 + mem["activations_bytes"]
    assert mem["gpu_memory_bytes"] == 24 * 1024**3
    assert r["fits"] is True
    assert r["max_micro_batch"] == (24 * 1024**3 - 14 * GPT2_P - 1024**3 - fixed) // per_sample == 60
    assert r["fit_advice"].startswith("fits on one NVIDIA GeForce RTX 3090 at micro-batch 16")
    assert r["checkpoint_bytes"] == 4 * GPT2_P == 497_903_616
    assert r["checkpoint_bytes_with_optimizer"] == 12 * GPT2_P
    assert r["disk_for_retention"] == 3 * 12 * GPT2_P
    assert "allreduce_seconds_per_step" not in r


def test_json_keys(runner):
    r = est_json(runner, "--num-gpus", 2)
    for key in ["flops_per_token", "flops_per_step", "peak_flops", "mfu_assumed", "mfu_source", "tokens_per_second",
                "seconds_per_step", "total_seconds", "total_human", "grad_accum_steps", "memory", "fits",
                "max_micro_batch", "checkpoint_bytes", "checkpoint_bytes_with_optimizer", "disk_for_retention",
                "allreduce_seconds_per_step", "scaling_efficiency", "interconnect", "assumptions"]:
        assert key in r, key
    for key in ["weights_bytes", "gradients_bytes", "adam_moments_bytes", "activations_bytes", "total_bytes"]:
        assert key in r["memory"], key


def test_odd_shape_custom_and_permanent_checkpoints(runner):
    r = est_json(runner, "--n-layer", 3, "--n-head", 3, "--n-embd", 96, "--seq-len", 128, "--batch-size", 2,
                 "--total-batch-size", 2048, "--max-steps", 100, "--warmup-steps", 10, "--mfu", 0.5, "--gpu", "a100-40gb",
                 "--keep-last-n-checkpoints", 2, "--permanent-checkpoints", "50,100,200")
    assert r["flops_per_token"] == ODD_FPT
    assert r["grad_accum_steps"] == 8
    assert r["mfu_source"] == "--mfu"
    assert r["tokens_per_second"] == pytest.approx(0.5 * 312e12 / ODD_FPT)
    assert r["memory"]["activations_bytes"] == 99_581_952  # test_activation_bytes_odd_shape
    assert r["checkpoint_bytes"] == 4 * ODD_P
    # permanent steps beyond --max-steps are never written: 2 + 2 checkpoints
    assert r["checkpoints_retained"] == 4
    assert r["disk_for_retention"] == 4 * 12 * ODD_P


def test_gpt2_large_on_rtx3090_says_how_it_fits(runner):
    r = est_json(runner, "--gpu", "rtx3090", "--model", "gpt2-large")
    P, h, L = 774_090_240, 1280, 36  # 36·(12·1280² + 13·1280) + 2·1280 + 50304·1280 + 1024·1280
    assert r["model"]["params"] == P
    rows = {(m["activation_checkpointing"], m["chunked_loss"]): m for m in r["memory_by_mode"]}
    static = 14 * P + 1024**3 + 4 * 50304 * h + 2048 * 50304 * 6  # weights, AdamW, autocast copy, CUDA; loss
    capacity = 24 * 1024**3
    per_sample = {  # bytes per sequence of 1024 tokens: blocks kept, + ln_f input and head-input gradient
        "none": L * 38 * 1024 * h + 8 * 1024 * h,
        "selective": 18 * 38 * 1024 * h + 18 * 4 * 1024 * h + 38 * 1024 * h + 8 * 1024 * h,
        "full": L * 4 * 1024 * h + 38 * 1024 * h + 8 * 1024 * h,
    }
    for mode, per in per_sample.items():
        assert rows[(mode, True)]["total_bytes"] == static + 16 * per
        assert rows[(mode, True)]["max_micro_batch"] == (capacity - static) // per
    assert [rows[(m, True)]["max_micro_batch"] for m in per_sample] == [7, 12, 52]
    assert [rows[(m, True)]["fits"] for m in per_sample] == [False, False, True]
    assert rows[("none", False)]["max_micro_batch"] < 7  # the whole-logits loss fit even less
    assert r["fits"] is False
    assert r["fit_advice"] == (
        "does not fit on one NVIDIA GeForce RTX 3090 at micro-batch 16 with --activation-checkpointing none; it fits "
        "with --activation-checkpointing full (up to micro-batch 52); or --activation-checkpointing none --batch-size 7, "
        "--activation-checkpointing selective --batch-size 12 (the same --total-batch-size, in more accumulation steps)")
    chosen = est_json(runner, "--gpu", "rtx3090", "--model", "gpt2-large", "--activation-checkpointing", "full")
    assert chosen["fits"] is True and chosen["max_micro_batch"] == 52
    assert chosen["memory"]["total_bytes"] == rows[("full", True)]["total_bytes"]
    table = est(runner, "--gpu", "rtx3090", "--model", "gpt2-large")
    assert table.exit_code == 0 and "memory per GPU by setting" in table.output and "52" in table.output


def test_a_model_too_large_for_any_setting_is_told_to_shard(runner):
    r = est_json(runner, "--gpu", "rtx3090", "--model", "gpt2-xl")
    assert all(m["max_micro_batch"] == 0 for m in r["memory_by_mode"])
    assert "--model-parallel" in r["fit_advice"]


def test_unknown_activation_checkpointing_mode_exits_2(runner):
    result = est(runner, "--activation-checkpointing", "half")
    assert result.exit_code == 2 and "--activation-checkpointing" in result.output


def test_multi_gpu_allreduce(runner):
    r = est_json(runner, "--num-gpus", 2, "--batch-size", 16, "--interconnect", "pcie4")
    # ring: 2(n-1)/n × 4P / 32e9 = 1 × 497,903,616 / 32e9
    assert r["allreduce_seconds_per_step"] == pytest.approx(497_903_616 / 32e9)
    compute = 524288 / (2 * 0.35 * 71e12 / GPT2_FPT)
    assert r["seconds_per_step"] == pytest.approx(compute + 497_903_616 / 32e9)
    assert r["scaling_efficiency"] == pytest.approx(compute / (compute + 497_903_616 / 32e9))
    assert r["grad_accum_steps"] == 16
    r = est_json(runner, "--num-gpus", 8, "--gpu", "h100")
    assert r["interconnect"] == "nvlink4"
    assert r["allreduce_seconds_per_step"] == pytest.approx(2 * 7 / 8 * 4 * GPT2_P / 450e9)


def test_finetune_defaults(runner):
    r = est_json(runner, "--finetune")
    # as `gptctl finetune` trains: one micro-step per GPU unless --total-batch-size says otherwise
    assert r["max_steps"] == 1750 and r["batch_size"] == 8 and r["grad_accum_steps"] == 1
    assert r["total_batch_size"] == 8 * 1024
    r = est_json(runner, "--finetune", "--max-steps", 10, "--warmup-steps", 2)  # checked as `finetune` checks them
    assert r["max_steps"] == 10


def test_dtype_auto_picks_what_training_would(runner):
    """--dtype auto (training's default): bfloat16 where the card has it, float32 on a T4 or V100."""
    assert est_json(runner)["dtype"] == "bfloat16"
    assert est_json(runner, "--gpu", "t4")["dtype"] == "float32"


def test_dtypes_and_no_bf16(runner):
    assert est_json(runner, "--dtype", "float32")["peak_flops"] == 35.6e12
    # 64: with the chunked loss gpt2 at micro-batch 32 now fits in a T4's 15 GiB (it did not before)
    r = est_json(runner, "--gpu", "t4", "--dtype", "float16", "--batch-size", 64)
    assert r["peak_flops"] == 65e12
    assert r["fits"] is False and 0 < r["max_micro_batch"] < 64


def test_table_output_and_list_gpus(runner):
    result = est(runner)
    assert result.exit_code == 0, result.output
    assert "RTX 3090" in result.stdout and "fits" in result.stdout
    result = est(runner, "--list-gpus")
    assert result.exit_code == 0 and "h200" in result.stdout
    rows = est_json(runner, "--list-gpus")
    assert {r["key"] for r in rows} == set(GPUS)
    assert {"rtx3060", "rtx3090", "rtx4090", "a10g", "l4", "t4", "v100", "a100-40gb", "a100-80gb", "h100", "h200"} <= set(GPUS)


# ---- gpus ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name,key", [
    ("NVIDIA GeForce RTX 3090", "rtx3090"),
    ("NVIDIA GeForce RTX 3060", "rtx3060"),
    ("NVIDIA GeForce RTX 4090", "rtx4090"),
    ("NVIDIA A100-SXM4-80GB", "a100-80gb"),
    ("NVIDIA A100-SXM4-40GB", "a100-40gb"),
    ("NVIDIA A100 80GB PCIe", "a100-80gb"),
    ("NVIDIA H100 80GB HBM3", "h100"),
    ("NVIDIA H200", "h200"),
    ("NVIDIA A10G", "a10g"),
    ("NVIDIA L4", "l4"),
    ("Tesla T4", "t4"),
    ("Tesla V100-SXM2-16GB", "v100"),
    ("cpu", None),
    ("", None),
    ("NVIDIA RTX A6000", None),
])
def test_match_gpu(name, key):
    assert match_gpu(name) == key


def test_peak_flops():
    assert peak_flops("rtx3090", "bfloat16") == 71e12
    assert peak_flops("rtx3090", "torch.bfloat16") == 71e12
    assert peak_flops("a100-80gb", "float32") == 156e12
    assert peak_flops("h100", "float16") == 989.4e12
    with pytest.raises(UserError):
        peak_flops("v100", "bfloat16")
    with pytest.raises(UserError):
        peak_flops("nope", "float32")


# ---- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize("args,option", [
    (["--gpu", "gtx1080"], "--gpu"),
    (["--num-gpus", "0"], "--num-gpus"),
    (["--batch-size", "0"], "--batch-size"),
    (["--seq-len=-1"], "--seq-len"),
    (["--max-steps", "0"], "--max-steps"),
    (["--total-batch-size", "0"], "--total-batch-size"),
    (["--n-layer", "0"], "--n-layer"),
    (["--n-embd", "100", "--n-head", "3"], "--n-embd"),
    (["--total-batch-size", "1000"], "--total-batch-size"),
    (["--num-gpus", "3"], "--total-batch-size"),
    (["--mfu", "0"], "--mfu"),
    (["--mfu", "1.5"], "--mfu"),
    (["--model", "gpt5"], "--model"),
    (["--gpu", "v100", "--dtype", "bfloat16"], "--dtype"),
    (["--dtype", "int8"], "--dtype"),
    (["--num-gpus", "2", "--interconnect", "carrier-pigeon"], "--interconnect"),
    (["--permanent-checkpoints", "10,x"], "--permanent-checkpoints"),
])
def test_invalid_input_exits_2(runner, args, option):
    result = est(runner, *args)
    assert result.exit_code == 2, result.output
    assert result.stderr.startswith("Error: ")
    assert option in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.output


def test_unknown_gpu_lists_known(runner):
    result = est(runner, "--gpu", "gtx1080")
    assert "rtx3090" in result.stderr and "h100" in result.stderr


# ---- calibration ----------------------------------------------------------------------------


def _insert_run(db, device_name, tokens_per_s, world_size=1, dtype="bfloat16", **settings):
    settings = {"model": "gpt2", "n_layer": None, "n_head": None, "n_embd": None, "seq_len": 1024,
                "batch_size": 16, **settings}
    add_run(db, uuid.uuid4().hex[:12], name="pretrain", status="completed", settings=json.dumps(settings),
            run_dir="/tmp/x", created_at="2024-01-01T00:00:00", device_name=device_name, dtype=dtype,
            world_size=world_size, tokens_per_s=tokens_per_s, mfu=None)


def test_calibration_from_registry(runner, tmp_path, monkeypatch):
    from gptctl.registry import open_registry

    monkeypatch.setenv("GPTCTL_HOME", str(tmp_path))
    db = open_registry()
    per_gpu = lambda mfu, fpt=GPT2_FPT: mfu * 71e12 / fpt  # noqa: E731
    _insert_run(db, "NVIDIA GeForce RTX 3090", per_gpu(0.30))
    _insert_run(db, "NVIDIA GeForce RTX 3090", 2 * per_gpu(0.50), world_size=2)  # all ranks together
    _insert_run(db, "NVIDIA GeForce RTX 3090", per_gpu(0.60, ODD_FPT), n_layer=3, n_head=3, n_embd=96, seq_len=128)
    _insert_run(db, "NVIDIA A100-SXM4-80GB", 1e9)  # another GPU: ignored
    _insert_run(db, "NVIDIA GeForce RTX 3090", None)  # no throughput: ignored
    _insert_run(db, "cpu", 1e3)  # ignored
    db.conn.close()

    r = est_json(runner)
    assert r["mfu_source"] == "calibrated from 3 runs in the registry"
    assert r["mfu_assumed"] == pytest.approx(0.50)
    assert r["tokens_per_second"] == pytest.approx(0.50 * 71e12 / GPT2_FPT)
    # --mfu overrides the calibration; other GPUs keep their default
    assert est_json(runner, "--mfu", 0.2)["mfu_source"] == "--mfu"
    assert est_json(runner, "--gpu", "h100")["mfu_source"] == "default for h100"
    assert est_json(runner, "--gpu", "a100-80gb")["mfu_source"] == "calibrated from 1 runs in the registry"


def test_measured_mfus_pure():
    row = {"device_name": "NVIDIA GeForce RTX 3090", "tokens_per_s": 0.4 * 71e12 / GPT2_FPT, "world_size": 1,
           "dtype": "bfloat16", "settings": json.dumps({"model": "gpt2", "seq_len": 1024})}
    assert measured_mfus([row], "rtx3090") == [pytest.approx(0.4)]
    assert measured_mfus([row], "a100-80gb") == []


def test_estimate_function_direct():
    r = estimate(TrainSettings(model="tiny", seq_len=256, batch_size=4, total_batch_size=1024, max_steps=10,
                                warmup_steps=0))
    assert r["grad_accum_steps"] == 1 and r["fits"] is True
    # The verdict turns where the memory runs out, for the tiny model too: it fits at the largest
    # micro-batch the estimate names, and not at one more.
    top = r["max_micro_batch"]
    edge = [estimate(TrainSettings(model="tiny", seq_len=256, batch_size=b, total_batch_size=b * 256, max_steps=10,
                                   warmup_steps=0))
            for b in (top, top + 1)]
    assert 4 < top and [e["fits"] for e in edge] == [True, False]
    assert edge[0]["memory"]["total_bytes"] <= edge[0]["memory"]["gpu_memory_bytes"] < edge[1]["memory"]["total_bytes"]


# ---- no heavy imports ---------------------------------------------------------------------------

HEAVY = ("torch", "numpy", "tiktoken", "datasets")


def _heavy_imports(stderr: str) -> set[str]:
    found = set()
    for line in stderr.splitlines():
        if not line.startswith("import time:"):
            continue
        module = line.rsplit("|", 1)[-1].strip()
        if module.split(".")[0] in HEAVY:
            found.add(module.split(".")[0])
    return found


def test_estimate_module_imports_nothing_heavy(tmp_path):
    # gptctl.estimate and gptctl.gpus themselves, including the registry read for calibration
    code = ("from gptctl.estimate import estimate, registry_runs; from gptctl.settings import TrainSettings; "
            "estimate(TrainSettings(), runs=registry_runs())")
    env = {**os.environ, "GPTCTL_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _heavy_imports(proc.stderr) == set()


def test_cli_estimate_imports_nothing_heavy(tmp_path):
    env = {**os.environ, "GPTCTL_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "gptctl", "estimate", "--gpu", "rtx3090"],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert _heavy_imports(proc.stderr) == set()
