"""--optimizer muon: the parameter split, its checkpoints and resumes, its refusals, its estimate."""

import pytest
import torch

from helpers import TINY_RUN, TINY_SETTINGS, add_run, train_in_process
from gptctl.cli import app
from gptctl.checkpoints import files as ckpt
from gptctl.engine.distributed import Dist
from gptctl.engine.optim import is_muon_parameter
from gptctl.engine.trainer import Trainer
from gptctl.estimate import MUON_NS_STEPS, muon_params, newton_schulz_flops, optimizer_bytes, total_params
from gptctl.presets import PRESETS
from gptctl.settings import TrainSettings


def muon_trainer(data, **overrides) -> Trainer:
    settings = TrainSettings(**{**TINY_SETTINGS, "data_root": data, "optimizer": "muon", **overrides})
    return Trainer(settings, Dist(0, 0, 1, torch.device("cpu")))


def test_every_parameter_is_in_exactly_one_group_and_muon_has_only_block_matrices(shakespeare):
    t = muon_trainer(shakespeare)
    adamw, muon = t.optimizers
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(muon, torch.optim.Muon)
    owner = {}
    for optimizer in t.optimizers:
        for group in optimizer.param_groups:
            for p in group["params"]:
                assert id(p) not in owner  # in one group only
                owner[id(p)] = optimizer
    names = dict(t.raw_model.named_parameters())
    assert set(owner) == {id(p) for p in names.values()}  # every parameter (wte once: lm_head is tied to it)
    on_muon = sorted(n for n, p in names.items() if owner[id(p)] is muon)
    assert on_muon == sorted(f"transformer.h.{i}.{m}.weight" for i in range(2)
                             for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"))
    assert all(p.dim() == 2 for n, p in names.items() if n in on_muon)
    assert sum(p.numel() for n, p in names.items() if n in on_muon) == muon_params(PRESETS["tiny"])
    assert not is_muon_parameter("transformer.wte.weight", names["transformer.wte.weight"])


def test_both_optimizers_follow_the_schedule_at_their_own_peak(shakespeare):
    t = muon_trainer(shakespeare, max_steps=8, muon_lr=0.05)
    t.train_step()  # step 1 of 2 warmup steps: half the peak
    adamw, muon = t.optimizers
    assert all(g["lr"] == pytest.approx(3e-3 / 2) for g in adamw.param_groups)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.05 / 2)


def test_a_muon_run_resumes_bit_for_bit_from_its_checkpoint(shakespeare, tmp_path):
    whole, saved = train_in_process(shakespeare, tmp_path / "whole", optimizer="muon", max_steps=8,
                                    checkpoint_interval=4)
    state = ckpt.load(saved[4])
    assert any("momentum_buffer" in s for s in state["optimizer"]["state"].values())  # Muon's state is saved
    rest, _ = train_in_process(shakespeare, tmp_path / "part", resume_from=saved[4], optimizer="muon", max_steps=8,
                               checkpoint_interval=4)
    assert rest == {s: whole[s] for s in range(5, 9)}  # to the last bit
    adamw, _ = train_in_process(shakespeare, tmp_path / "adamw", max_steps=8, checkpoint_interval=8)
    assert adamw[8] != whole[8]  # the option changes training (at the same schedule)


def test_muon_with_sharding_is_refused_in_one_line(runner, shakespeare, gptctl_home):
    result = runner.invoke(app, ["pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--optimizer", "muon",
                                 "--model-parallel"])
    assert result.exit_code == 2 and not gptctl_home.exists()
    assert "--optimizer muon: Muon orthogonalises whole matrices, which --model-parallel shards" in result.output


@pytest.mark.parametrize("option", ["--muon-lr", "--muon-momentum", "--muon-weight-decay"])
def test_muon_options_without_muon_are_refused_in_one_line(runner, shakespeare, gptctl_home, tmp_path, option):
    """Under AdamW they would be stored with the run and do nothing (the break test found it)."""
    field = option[2:].replace("-", "_")
    for source in ("command line", "config file"):
        args = ["pretrain", *TINY_RUN, "--data-root", str(shakespeare)]
        if source == "command line":
            args += [option, "0.5"]
        else:
            (tmp_path / "c.toml").write_text(f"{field} = 0.5\n")
            args += ["--config", str(tmp_path / "c.toml")]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and not gptctl_home.exists(), (source, result.output)
        assert f"{option}: applies only with --optimizer muon" in result.output and "Traceback" not in result.output
        assert len(result.output.strip().splitlines()) == 1
    # The default value, as a saved config file carries it, says nothing wrong; with Muon the option is taken.
    from gptctl.settings import build_settings

    default = {"muon_lr": 0.02, "muon_momentum": 0.95, "muon_weight_decay": 0.0}[field]
    base = {"data_root": shakespeare, "model": "tiny"}
    assert build_settings({**base, field: default})[0].optimizer == "adamw"
    assert build_settings({**base, "optimizer": "muon", field: 0.5})[0].optimizer == "muon"


def test_the_optimizer_is_part_of_the_run_on_resume(shakespeare, gptctl_home):
    from gptctl.registry import open_registry, queries
    from gptctl.resume import resume_changes

    settings = TrainSettings(**{**TINY_SETTINGS, "data_root": shakespeare})
    db = open_registry(gptctl_home)
    add_run(db, "abc123", settings=settings.model_dump_json(), run_dir=str(gptctl_home / "r-abc123"), last_step=4)
    from gptctl.errors import UserError

    with pytest.raises(UserError, match="--optimizer: run abc123 .r. was started with 'adamw'"):
        resume_changes(queries.get_run(db, "abc123"), {"optimizer": "muon"})
    # Not even with --override-settings: the checkpoint holds AdamW's state, which Muon cannot load
    # (before, the resumed worker died with KeyError: 'param_groups.0.momentum' and the run was failed).
    with pytest.raises(UserError, match=r"hold that optimizer's state.*\(--init-from RUN\)"):
        resume_changes(queries.get_run(db, "abc123"), {"optimizer": "muon"}, override=True)
    assert resume_changes(queries.get_run(db, "abc123"), {"optimizer": "adamw"}, override=True) == {}
    # Nor are Muon's options taken by an AdamW run, even with the override: they would do nothing.
    with pytest.raises(UserError, match="--muon-lr: applies only with --optimizer muon, and run abc123 .r. was started "
                                        "with --optimizer adamw; drop the option"):
        resume_changes(queries.get_run(db, "abc123"), {"muon_lr": 0.01}, override=True)


@pytest.mark.slow
def test_a_checkpoint_resumes_only_into_its_own_optimizer(shakespeare, gptctl_home):
    """`pretrain --resume --checkpoint-path` of a Muon checkpoint without --optimizer muon created a run whose
    workers died loading Muon's state into AdamW (KeyError: 'param_groups.0.momentum'): now refused first."""
    import json

    from helpers import cli

    summary = json.loads(cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "4",
                             "--checkpoint-interval", "4", "--optimizer", "muon", "--run-name", "m", "--json",
                             home=gptctl_home).stdout)
    path = summary["checkpoints"][-1]
    proc = cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "8", "--resume",
               "--checkpoint-path", path, "--run-name", "branch", home=gptctl_home, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        f"Error: --optimizer: {path} holds the state of --optimizer muon; pass --optimizer muon to resume it, or "
        "start from its weights alone with --init-from"), proc.stderr
    assert [r["name"] for r in json.loads(cli("runs", "list", "--json", home=gptctl_home).stdout)] == ["m"]
    resumed = json.loads(cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "8", "--resume",
                             "--checkpoint-path", path, "--optimizer", "muon", "--run-name", "branch", "--json",
                             home=gptctl_home).stdout)
    assert resumed["status"] == "completed" and resumed["last_step"] == 8


def test_estimate_counts_muons_state_and_its_newton_schulz_flops(runner):
    gpt2 = PRESETS["gpt2"]
    params, matrices = total_params(gpt2, 1024), 12 * 12 * 768 ** 2
    assert muon_params(gpt2) == matrices == 84_934_656
    assert optimizer_bytes(gpt2, 1024, "muon") == {"adam_moments_bytes": 8 * (params - matrices),
                                                   "muon_momentum_bytes": 4 * matrices}
    assert optimizer_bytes(gpt2, 1024, "adamw") == {"adam_moments_bytes": 8 * params, "muon_momentum_bytes": 0}
    # per block and Newton-Schulz step: c_attn 4·d²·3d + 2d³, attn.c_proj 6d³, c_fc and mlp.c_proj 4·d²·4d + 2d³ each
    assert newton_schulz_flops(gpt2) == MUON_NS_STEPS * 12 * (14 + 6 + 18 + 18) * 768 ** 3
    import json

    r = json.loads(runner.invoke(app, ["estimate", "--optimizer", "muon", "--json"]).stdout)
    a = json.loads(runner.invoke(app, ["estimate", "--json"]).stdout)
    assert r["checkpoint_bytes_with_optimizer"] == 4 * params + 8 * (params - matrices) + 4 * matrices
    assert a["memory"]["total_bytes"] - r["memory"]["total_bytes"] == 4 * matrices  # one buffer instead of two
    assert r["flops_per_step"] == a["flops_per_step"] + newton_schulz_flops(gpt2)
    assert r["max_micro_batch"] >= a["max_micro_batch"]


def test_a_muon_trained_checkpoint_exports_to_transformers_with_the_same_logits(runner, shakespeare, tmp_path):
    transformers = pytest.importorskip("transformers")
    from gptctl.data.tokenizer import get_encoding
    from gptctl.engine.sample import Sampler
    from gptctl.presets import GPT2_VOCAB_SIZE

    _, saved = train_in_process(shakespeare, tmp_path / "muon", optimizer="muon", max_steps=4, checkpoint_interval=4)
    out = tmp_path / "hf"
    result = runner.invoke(app, ["export", str(saved[4]), "-o", str(out)])
    assert result.exit_code == 0, result.output
    idx = torch.tensor([get_encoding().encode_ordinary("First Citizen: Before we proceed any further")])
    with torch.no_grad():
        ours = Sampler(saved[4], "cpu").model.eval()(idx)[0][..., :GPT2_VOCAB_SIZE]
        theirs = transformers.GPT2LMHeadModel.from_pretrained(out).eval()(idx).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_a_muon_trained_run_finetunes_samples_and_evaluates_like_an_adamw_one(shakespeare, gptctl_home, tmp_path):
    """What follows pretraining reads only the weights: a Muon run's checkpoints serve it as an AdamW run's do."""
    import json

    from helpers import cli, losses, only_run_id
    from test_eval import write_items
    from test_finetune import write_dolly

    cli("pretrain", *TINY_RUN, "--data-root", str(shakespeare), "--max-steps", "4", "--checkpoint-interval", "4",
        "--optimizer", "muon", "--run-name", "muon-base", home=gptctl_home)
    data = write_dolly(tmp_path / "dolly.jsonl", n=60)
    ft = json.loads(cli("finetune", "--pretrained-checkpoint", "muon-base", "--dataset-path", str(data),
                        "--max-steps", "3", "--warmup-steps", "1", "--eval-steps", "1", "--json",
                        home=gptctl_home).stdout)
    assert ft["status"] == "completed" and ft["last_step"] == 3
    assert json.loads(cli("runs", "show", ft["run_id"], "--json", home=gptctl_home).stdout)["settings"]["optimizer"] \
        == "adamw"  # a finetune's optimizer is its own choice; only the weights came from Muon
    sampled = cli("sample", "muon-base", "--prompt", "To be", "--max-new-tokens", "4", "--device", "cpu",
                  home=gptctl_home)
    assert sampled.stdout.strip() and "model_00004.pt: pretrain model, step 4" in sampled.stderr
    scored = json.loads(cli("eval", "muon-base", "--task", "hellaswag", "--hellaswag-file",
                            str(write_items(tmp_path / "h.jsonl")), "--json", home=gptctl_home).stdout)
    assert scored["total"] == 4 and scored["accuracy"] == scored["correct"] / 4
    measured = json.loads(cli("eval", "muon-base", "--task", "val-loss", "--limit", "2", "--json",
                              home=gptctl_home).stdout)
    assert measured["val_loss"] == pytest.approx(losses(gptctl_home, only_run_id(gptctl_home, "muon-base"))[4][1],
                                                 rel=1e-5)  # the run's own val loss at its step 4
