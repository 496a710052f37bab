"""--arch modern and --recipe speedrun: the architecture against a plain reference, its parameter groups,
its export to transformers' Qwen3, and the rest of gptctl (resume, DDP, finetune, sample, eval, estimate)
on it."""

import json
import math
import sqlite3

import pytest
import torch
import torch.nn.functional as F

from helpers import TINY_RUN, cli, losses, only_run_id, train_in_process, train_in_processes
from test_eval import write_items
from test_finetune import write_dolly

MODERN = dict(arch="modern", optimizer="muon", lr_scheduler="wsd", muon_lr=0.02, embedding_lr=0.1, head_lr=0.01,
              scalar_lr=0.01)


def randomised_model(arch: str = "modern", seed: int = 0):
    """A tiny model of `arch` whose every parameter is random (a fresh modern model has zero projections
    and head, which would hide most of the forward)."""
    from gptctl.engine.model import GPT, GPTConfig

    torch.manual_seed(seed)
    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, arch=arch))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.dim() == 1 else torch.randn_like(p) * p.size(-1) ** -0.5)
    return model.eval()


def reference_logits(model, idx: torch.Tensor) -> torch.Tensor:
    """The modern forward written out plainly in float64: explicit masked softmax attention, RoPE as the
    rotation of the complex number (x_i + i·x_{i+d/2}) by position × frequency, RMSNorm by its formula."""
    cfg, w = model.config, {k: v.double() for k, v in model.state_dict().items()}
    B, T = idx.shape
    H, hd, C = cfg.n_head, cfg.head_dim, cfg.n_embd

    def rms(x, gain):
        return gain * x / torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)

    freqs = 1.0 / 10000.0 ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * freqs[None]

    def rope(t):
        z = torch.complex(t[..., : hd // 2], t[..., hd // 2:]) * torch.polar(torch.ones_like(angle), angle)
        return torch.cat([z.real, z.imag], dim=-1)

    mask = torch.triu(torch.ones(T, T, dtype=torch.bool), diagonal=1)
    x = w["transformer.wte.weight"][idx]
    for i in range(cfg.n_layer):
        p = f"transformer.h.{i}."
        h = rms(x, w[p + "ln_1.weight"])
        q, k, v = ((h @ w[p + f"attn.{n}_proj.weight"].T).view(B, T, H, hd) for n in "qkv")
        q, k = rms(q, w[p + "attn.q_norm.weight"]), rms(k, w[p + "attn.k_norm.weight"])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = (rope(q) @ rope(k).transpose(-1, -2)) / math.sqrt(hd)
        y = scores.masked_fill(mask, float("-inf")).softmax(-1) @ v
        x = x + y.transpose(1, 2).reshape(B, T, C) @ w[p + "attn.o_proj.weight"].T
        h = rms(x, w[p + "ln_2.weight"])
        gate, up = h @ w[p + "mlp.gate_proj.weight"].T, h @ w[p + "mlp.up_proj.weight"].T
        x = x + (F.silu(gate) * up) @ w[p + "mlp.down_proj.weight"].T
    return rms(x, w["transformer.ln_f.weight"]) @ w["lm_head.weight"].T


def test_the_modern_forward_is_the_plain_reference():
    model = randomised_model()
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, _ = model(idx)
    expected = reference_logits(model, idx)
    assert expected.abs().max() > 1 and (ours.double() - expected).abs().max().item() < 1e-5  # fp32 against fp64
    # Positions matter (RoPE is there): the same tokens shifted by one give other logits at the same token.
    with torch.no_grad():
        shifted, _ = model(torch.cat([idx[:, :1], idx[:, :-1]], dim=1))
    assert not torch.allclose(shifted[:, 1:], ours[:, :-1])


def test_a_fresh_modern_model_starts_from_the_identity_blocks_and_a_zero_head():
    from gptctl.engine.model import GPT, GPTConfig

    model = GPT(GPTConfig(n_layer=2, n_head=2, n_embd=32, block_size=16, arch="modern"))
    for name, p in model.named_parameters():
        if name.endswith(("o_proj.weight", "down_proj.weight")) or name == "lm_head.weight":
            assert not p.any(), name
    assert model.lm_head.weight is not model.transformer.wte.weight  # untied
    assert not any(n.endswith(".bias") for n, _ in model.named_parameters())
    logits, loss = model(torch.zeros(1, 8, dtype=torch.long), torch.zeros(1, 8, dtype=torch.long))
    assert loss.item() == pytest.approx(math.log(50304), rel=1e-6)  # uniform over the padded vocabulary


@pytest.mark.parametrize("arch", ["gpt2", "modern"])
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_every_parameter_is_in_exactly_one_group_at_its_roles_lr(arch, optimizer):
    from gptctl.engine.optim import lr_scale, make_optimizers
    from gptctl.settings import TrainSettings

    extra = {k: v for k, v in MODERN.items() if k.endswith("_lr") and k != "muon_lr"} if arch == "modern" else {}
    settings = TrainSettings(model="tiny", arch=arch, optimizer=optimizer, max_lr=1e-3, **extra)
    model = randomised_model(arch)
    optimizers = make_optimizers(model, settings, "cpu")
    seen = [id(p) for o in optimizers for g in o.param_groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(seen) == len(set(seen))
    names = {id(p): n for n, p in model.named_parameters()}
    for o in optimizers:
        for g in o.param_groups:
            peak = 1e-3 * lr_scale(o, g, settings)
            for p in g["params"]:
                name = names[id(p)]
                if isinstance(o, torch.optim.Muon):
                    expected = 0.02  # the default --muon-lr
                    assert p.dim() == 2 and name.startswith("transformer.h.")
                elif arch == "gpt2":
                    expected = 1e-3
                else:
                    expected = (0.1 if name == "transformer.wte.weight" else 0.01 if name == "lm_head.weight"
                                else 0.01 if p.dim() == 1 else 1e-3)
                    assert g["weight_decay"] == (0.1 if g["role"] == "matrix" else 0.0)
                assert peak == pytest.approx(expected), name


def test_the_speedrun_recipe_is_a_preset_that_options_override():
    from gptctl.presets import RECIPES
    from gptctl.settings import build_settings

    settings, _ = build_settings({"recipe": "speedrun"})
    assert {k: getattr(settings, k) for k in RECIPES["speedrun"]} == RECIPES["speedrun"]
    settings, _ = build_settings({"recipe": "speedrun", "muon_lr": 0.05, "lr_scheduler": "cosine"})
    assert (settings.muon_lr, settings.lr_scheduler, settings.arch) == (0.05, "cosine", "modern")
    # What the chosen architecture or optimizer cannot use is not taken from the recipe (and not refused).
    settings, _ = build_settings({"recipe": "speedrun", "arch": "gpt2", "optimizer": "adamw"})
    assert (settings.embedding_lr, settings.head_lr, settings.muon_lr) == (None, None, 0.02)
    assert build_settings({})[0].recipe == "classic" and build_settings({})[0].arch == "gpt2"


@pytest.mark.parametrize("args, message", [
    (["--head-lr", "0.01"], "--head-lr: applies only with --arch modern; add --arch modern"),
    (["--arch", "modern", "--muon-lr", "0.01"], "--muon-lr: applies only with --optimizer muon"),
    (["--recipe", "fast"], "--recipe: Input should be 'classic' or 'speedrun'"),
    (["--arch", "llama"], "--arch: Input should be 'gpt2' or 'modern'"),
    (["--arch", "modern", "--n-embd", "66", "--n-head", "2"], "--arch modern: rotary embeddings need an even head"),
    (["--recipe", "speedrun", "--model-parallel"], "--optimizer muon (the speedrun recipe's): Muon orthogonalises"),
])
def test_bad_recipe_and_arch_options_exit_2_in_one_line(shakespeare, gptctl_home, args, message):
    result = cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "4", *args,
                 home=gptctl_home, check=False)
    assert result.returncode == 2 and message in result.stderr, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not gptctl_home.joinpath("gptctl.db").exists()


def test_modern_resume_is_exact_and_activation_checkpointing_changes_nothing(shakespeare, tmp_path):
    full, paths = train_in_process(shakespeare, tmp_path / "full", max_steps=8, checkpoint_interval=4, **MODERN)
    resumed, _ = train_in_process(shakespeare, tmp_path / "resumed", resume_from=paths[4], max_steps=8,
                                  checkpoint_interval=4, **MODERN)
    assert resumed == {s: full[s] for s in range(5, 9)}
    recomputed, _ = train_in_process(shakespeare, tmp_path / "ac", max_steps=4, checkpoint_interval=4,
                                     activation_checkpointing="full", **MODERN)
    assert recomputed == {s: full[s] for s in range(1, 5)}
    assert full[8][1] < full[4][1]  # it learns


@pytest.mark.slow
def test_modern_ddp_on_two_processes_matches_one(shakespeare, tmp_path):
    single, _ = train_in_process(shakespeare, tmp_path / "single", max_steps=4, checkpoint_interval=4, **MODERN)
    ddp, _ = train_in_processes(2, shakespeare, tmp_path / "ddp", max_steps=4, checkpoint_interval=4, **MODERN)
    assert sorted(ddp) == sorted(single)
    assert all(abs(ddp[s][0] - single[s][0]) < 1e-4 for s in single), (ddp, single)
    # FSDP2 takes AdamW (Muon needs whole matrices): the same for the modern block.
    adamw = {**MODERN, "optimizer": "adamw", "muon_lr": None}
    adamw = {k: v for k, v in adamw.items() if v is not None}
    single, _ = train_in_process(shakespeare, tmp_path / "s2", max_steps=4, checkpoint_interval=4, **adamw)
    sharded, _ = train_in_processes(2, shakespeare, tmp_path / "fsdp", max_steps=4, checkpoint_interval=4,
                                    model_parallel=True, **adamw)
    assert all(abs(sharded[s][0] - single[s][0]) < 1e-4 for s in single), (sharded, single)


@pytest.fixture(scope="module")
def speedrun(shakespeare, tmp_path_factory):
    """(home, run id) of a real `gptctl pretrain --recipe speedrun` of 8 steps (workers in-process)."""
    home = tmp_path_factory.mktemp("speedrun") / "home"
    cli("pretrain", *TINY_RUN, "--recipe", "speedrun", "--data-root", str(shakespeare), "--max-steps", "8",
        "--checkpoint-interval", "4", "--run-name", "fast", home=home)
    return home, only_run_id(home, "fast")


def test_runs_show_says_the_recipe_and_its_resolved_settings(speedrun):
    home, run_id = speedrun
    shown = json.loads(cli("runs", "show", run_id, "--json", home=home).stdout)
    settings = shown["settings"]
    assert (settings["recipe"], settings["arch"], settings["optimizer"], settings["lr_scheduler"]) == (
        "speedrun", "modern", "muon", "wsd")
    assert settings["max_lr"] == 3e-3  # TINY_RUN's --max-lr: an explicit option wins over the recipe
    assert "recipe speedrun" in cli("runs", "show", run_id, home=home).stdout
    metrics = losses(home, run_id)
    assert metrics[8][1] < metrics[4][1]


def test_a_resume_may_not_change_the_architecture(speedrun):
    home, run_id = speedrun
    result = cli("resume", run_id, "--arch", "gpt2", "--max-steps", "12", home=home, check=False)
    assert result.returncode == 2 and "--arch: run" in result.stderr and "'modern'" in result.stderr, result.stderr
    result = cli("pretrain", "--init-from", "fast", "--arch", "gpt2", home=home, check=False)
    assert result.returncode == 2 and "--arch: the shape comes from --init-from" in result.stderr, result.stderr


def test_export_to_qwen3_has_the_same_logits_and_greedy_text_and_imports_back(speedrun, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gptctl.engine.hf import load_hf
    from gptctl.engine.sample import Sampler

    home, run_id = speedrun
    out = tmp_path / "hf"
    cli("export", run_id, "--output", str(out), home=home)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"] and config["tie_word_embeddings"] is False
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # no trust_remote_code
    assert type(hf).__name__ == "Qwen3ForCausalLM"
    ckpt = next((home / f"fast-{run_id}" / "checkpoints").glob("*00008.pt"))
    ours = Sampler(ckpt, "cpu").model
    idx = torch.randint(0, 50257, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(idx)[0][..., :50257] - hf(idx).logits).abs().max().item()
    assert diff <= 1e-4, diff

    prompt = "ROMEO:"
    sampled = json.loads(cli("sample", run_id, "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "12",
                             "--json", home=home).stdout)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    generated = hf.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=50256)
    text = tokenizer.decode(generated[0, ids.shape[1]:])
    assert json.dumps(sampled).count(json.dumps(text)[1:-1]) >= 1, (sampled, text)

    state, model = load_hf(str(out), "--init-from")
    assert model["arch"] == "modern" and model["n_embd"] == 64
    original = ours.state_dict()
    assert all(torch.equal(state[k][:50257], original[k][:50257]) for k in original)
    # A Qwen3 that gptctl's modern block cannot compute is refused in one line, naming the field.
    config["intermediate_size"] += 64
    (out / "config.json").write_text(json.dumps(config))
    result = cli("pretrain", "--init-from", f"hf:{out}", "--data-root", "/nonexistent", home=tmp_path / "h2",
                 check=False)
    assert result.returncode == 2 and "intermediate_size=" in result.stderr and "--arch modern needs" in result.stderr


def test_finetune_sample_and_eval_run_on_a_modern_model(speedrun, tmp_path):
    home, run_id = speedrun
    data = write_dolly(tmp_path / "dolly.jsonl", n=60)
    tuned = json.loads(cli("finetune", "--pretrained-checkpoint", "fast", "--dataset-path", str(data),
                           "--max-steps", "2", "--warmup-steps", "1", "--batch-size", "2", "--eval-steps", "1",
                           "--run-name", "fast-sft", "--json", home=home).stdout)
    assert tuned["status"] == "completed"
    with sqlite3.connect(home / "gptctl.db") as conn:
        settings = json.loads(conn.execute("select settings from runs where id = ?", [tuned["run_id"]]).fetchone()[0])
    assert settings["arch"] == "modern" and settings["optimizer"] == "adamw"  # the parent's model, a finetune's optimizer
    answer = json.loads(cli("sample", "fast-sft", "--instruction", "Name a colour.", "--max-new-tokens", "4",
                            "--json", home=home).stdout)
    assert answer
    items = write_items(tmp_path / "items.jsonl")
    scored = json.loads(cli("eval", "fast", "--task", "hellaswag", "--hellaswag-file", str(items), "--json",
                            home=home).stdout)
    assert scored["total"] == 4
    # Two batches, not the whole val split (about 500 forward passes): a modern model evaluates as any other.
    val = json.loads(cli("eval", "fast", "--task", "val-loss", "--limit", "2", "--json", home=home).stdout)
    assert math.isfinite(val["val_loss"])


def test_estimate_counts_the_modern_block_by_hand():
    from gptctl.estimate import flops_per_token, muon_params, newton_schulz_flops
    from gptctl.presets import ModelShape

    d, L, T, V = 768, 12, 1024, 50304
    shape = ModelShape(n_layer=L, n_head=12, n_embd=d, block_size=T, arch="modern")
    h = 2048  # SwiGLU: 8d/3 = 2048 exactly at d = 768
    assert shape.mlp_hidden == h
    # Per token, forward: q, k, v, o (4·d² multiply-adds), gate, up, down (3·d·h), the head (V·d);
    # attention: QKᵀ and AV over T positions (2·T·d). Backward twice forward; 2 FLOPs per multiply-add.
    # As nanoGPT's 6N, N also counts the norm gains (2d + 2·64 per block, d for ln_f): 0.02 % here.
    gains = L * (2 * d + 2 * 64) + d
    forward = 2 * (L * (4 * d * d + 3 * d * h) + V * d + gains) + 2 * L * 2 * T * d
    assert flops_per_token(shape, T) == 3 * forward
    assert muon_params(shape) == L * (4 * d * d + 3 * d * h)
    # Newton-Schulz, per m×n matrix (m ≤ n) and iteration: X·Xᵀ (2m²n), A·A (2m³), B·X (2m²n).
    per_iteration = 4 * (4 * d**3 + 2 * d**3) + 3 * (4 * d * d * h + 2 * d**3)
    assert newton_schulz_flops(shape) == 5 * L * per_iteration
    from gptctl.engine.model import GPT

    with torch.device("meta"):
        assert GPT(shape).num_params() == shape.num_params() == L * (2 * d + 2 * 64 + 4 * d * d + 3 * d * h) + d + 2 * V * d


@pytest.mark.slow
def test_a_speedrun_killed_with_sigkill_resumes_bit_for_bit(shakespeare, gptctl_home, tmp_path):
    from test_faults import kill_all, newest_checkpoint, start, wait_for

    args = ["pretrain", *TINY_RUN, "--recipe", "speedrun", "--data-root", str(shakespeare), "--max-steps", "16",
            "--checkpoint-interval", "2", "--run-name", "killed"]
    reference_home = tmp_path / "reference"
    cli(*args, home=reference_home)
    reference = losses(reference_home, only_run_id(reference_home, "killed"))
    proc = start(gptctl_home, *args, log=tmp_path / "killed.log")
    assert wait_for(lambda: newest_checkpoint(gptctl_home, "killed") >= 4, proc, "a checkpoint at step 4"), \
        (tmp_path / "killed.log").read_text()[-2000:]
    kill_all(proc)
    run_id = only_run_id(gptctl_home, "killed")
    cli("resume", run_id, home=gptctl_home)
    assert losses(gptctl_home, run_id) == reference


def test_modern_trains_under_bf16_autocast_close_to_fp32(shakespeare, tmp_path):
    fp32, _ = train_in_process(shakespeare, tmp_path / "fp32", max_steps=3, checkpoint_interval=3, **MODERN)
    bf16, _ = train_in_process(shakespeare, tmp_path / "bf16", max_steps=3, checkpoint_interval=3, dtype="bfloat16",
                               **MODERN)
    assert all(abs(bf16[s][0] - fp32[s][0]) < 0.05 for s in fp32), (bf16, fp32)


@pytest.mark.slow
def test_compiled_modern_model_matches_eager():
    model = randomised_model()
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        eager, _ = model(idx)
        compiled, _ = torch.compile(model)(idx)
    assert (compiled - eager).abs().max().item() < 1e-4


# --- the break test's findings: each refusal one line, exit 2, nothing written --------------------------------

def queue_run(home, data_root, name: str, *args: str) -> dict:
    """A run created, not trained (`pretrain --print-command`: status queued), and its stored settings."""
    cli("pretrain", *TINY_RUN, "--data-root", str(data_root), "--max-steps", "8", "--run-name", name, *args,
        "--print-command", home=home)
    return stored_settings(home, name)


def stored_settings(home, name: str) -> dict:
    with sqlite3.connect(home / "gptctl.db") as conn:
        return json.loads(conn.execute("select settings from runs where name = ? order by rowid desc",
                                       [name]).fetchone()[0])


def registry_rows(home) -> list:
    with sqlite3.connect(home / "gptctl.db") as conn:
        return [conn.execute(f"select * from {table} order by rowid").fetchall() for table in ("runs", "events")]


def refused_in_one_line(result, *words: str) -> str:
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert all(word in lines[0] for word in words), (words, result.stderr)
    return lines[0]


def test_a_resume_may_not_change_the_recipe_even_with_override(shakespeare, gptctl_home):
    """It only relabelled the run: the stored values (modern, Muon, its LRs) stayed."""
    queue_run(gptctl_home, shakespeare, "fast", "--recipe", "speedrun", "--save-config")
    config = next(gptctl_home.glob("fast-*")) / "config.toml"
    before = registry_rows(gptctl_home)
    for args in (["resume", "fast", "--recipe", "classic", "--override-settings"],
                 ["resume", "fast", "--recipe", "classic"],
                 ["pretrain", "--config", str(config), "--recipe", "classic", "--auto-resume", "--override-settings",
                  "--print-command"]):
        line = refused_in_one_line(cli(*args, home=gptctl_home, check=False), "--recipe: run", "'speedrun'",
                                   "a recipe is chosen when a run starts", "--override-settings")
        assert "--max-lr" in line, line  # which explicit options can change instead
    assert registry_rows(gptctl_home) == before
    # The same recipe again (a requeued job's own command line) changes nothing, and is no refusal.
    cli("pretrain", "--config", str(config), "--auto-resume", "--print-command", home=gptctl_home)
    assert stored_settings(gptctl_home, "fast")["recipe"] == "speedrun"


def test_a_config_file_of_one_recipe_with_another_recipe_on_the_command_line(shakespeare, gptctl_home):
    """A saved config file holds its recipe's values too; the command line's --recipe replaces them (so the run
    records the recipe it trains with), while what the file chose otherwise stays (max_lr: TINY_RUN's)."""
    queue_run(gptctl_home, shakespeare, "fast", "--recipe", "speedrun", "--save-config")
    queue_run(gptctl_home, shakespeare, "plain", "--save-config")
    keys = ("recipe", "arch", "optimizer", "lr_scheduler", "weight_decay", "embedding_lr", "max_lr")
    for saved, recipe, expected in (("fast", "classic", ("classic", "gpt2", "adamw", "cosine", 0.1, None, 3e-3)),
                                    ("plain", "speedrun", ("speedrun", "modern", "muon", "wsd", 0.0, 0.3, 3e-3))):
        config = next(gptctl_home.glob(f"{saved}-*")) / "config.toml"
        cli("pretrain", "--config", str(config), "--recipe", recipe, "--run-name", f"{saved}-as-{recipe}",
            "--print-command", home=gptctl_home)
        settings = stored_settings(gptctl_home, f"{saved}-as-{recipe}")
        assert tuple(settings[k] for k in keys) == expected, settings
        # Without --recipe the file is the run it was saved from.
        cli("pretrain", "--config", str(config), "--run-name", f"{saved}-again", "--print-command", home=gptctl_home)
        again = stored_settings(gptctl_home, f"{saved}-again")
        assert {k: again[k] for k in keys} == {k: stored_settings(gptctl_home, saved)[k] for k in keys}


@pytest.mark.parametrize("args", [["--recipe", "speedrun"], ["--arch", "modern", "--optimizer", "muon"]])
def test_weight_decay_that_no_parameter_takes_is_refused(shakespeare, gptctl_home, args):
    """--arch modern with Muon: Muon has the block matrices (--muon-weight-decay); AdamW's embedding, head and
    gains take no weight decay (engine/optim.py), so --weight-decay would do nothing."""
    result = cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "4", *args,
                 "--weight-decay", "0.05", home=gptctl_home, check=False)
    refused_in_one_line(result, "--weight-decay:", "--arch modern", "--optimizer muon", "--muon-weight-decay")
    assert not gptctl_home.joinpath("gptctl.db").exists()


def test_weight_decay_where_a_parameter_takes_it(shakespeare, gptctl_home, tmp_path):
    # gpt2 with Muon: AdamW decays the embeddings; modern with AdamW: the block matrices.
    for name, args in (("gpt2-muon", ["--optimizer", "muon"]), ("modern-adamw", ["--arch", "modern"])):
        assert queue_run(gptctl_home, shakespeare, name, *args, "--weight-decay", "0.05")["weight_decay"] == 0.05
    # A speedrun's saved config carries the recipe's weight_decay (0): it reads back.
    queue_run(gptctl_home, shakespeare, "fast", "--recipe", "speedrun", "--save-config")
    config = next(gptctl_home.glob("fast-*")) / "config.toml"
    cli("pretrain", "--config", str(config), "--run-name", "fast2", "--print-command", home=gptctl_home)
    # A resume that sets it is refused too, naming the run's settings.
    before = registry_rows(gptctl_home)
    result = cli("resume", "fast", "--weight-decay", "0.2", "--override-settings", home=gptctl_home, check=False)
    refused_in_one_line(result, "--weight-decay: does nothing with --arch modern and --optimizer muon",
                        "was started with --arch modern and --optimizer muon; drop the option")
    assert registry_rows(gptctl_home) == before


def test_auto_resume_judges_options_by_the_run_it_continues(shakespeare, gptctl_home):
    """Not by a fresh run's defaults (--arch gpt2, --optimizer adamw, 2000 warmup steps)."""
    queue_run(gptctl_home, shakespeare, "fast", "--recipe", "speedrun")
    cli("pretrain", "--auto-resume", "--run-name", "fast", "--embedding-lr", "0.1", "--muon-lr", "0.03",
        "--max-steps", "12", "--override-settings", "--print-command", home=gptctl_home)
    settings = stored_settings(gptctl_home, "fast")
    assert (settings["embedding_lr"], settings["muon_lr"], settings["max_steps"]) == (0.1, 0.03, 12)
    # A gpt2 run is judged by its own settings too, with the run's words.
    queue_run(gptctl_home, shakespeare, "plain")
    before = registry_rows(gptctl_home)
    result = cli("pretrain", "--auto-resume", "--run-name", "plain", "--embedding-lr", "0.1", "--override-settings",
                 "--print-command", home=gptctl_home, check=False)
    refused_in_one_line(result, "--embedding-lr: applies only with --arch modern", "was started with --arch gpt2")
    assert registry_rows(gptctl_home) == before


def test_estimate_says_the_newton_schulz_flops_it_counts():
    from gptctl.estimate import estimate, newton_schulz_flops
    from gptctl.presets import ModelShape
    from gptctl.settings import TrainSettings

    for arch, per_block in (("gpt2", 56), ("modern", 62)):  # modern: q, k, v, o 4·6d³; gate, up, down 3·(4·8/3 + 2)d³
        shape = ModelShape(12, 12, 768, arch=arch)
        assert newton_schulz_flops(shape) == 5 * 12 * per_block * 768**3
        result = estimate(TrainSettings(model="gpt2", arch=arch, optimizer="muon"), runs=[])
        text = " ".join(result["assumptions"])
        assert f"{per_block}·d³ FLOPs per block" in text, text
