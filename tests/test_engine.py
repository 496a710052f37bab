"""Engine pieces in-process: model, loader, schedule, checkpoint safety."""

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from gptctl.checkpoints import files as ckpt
from gptctl.engine.loader import BatchLoader, TokenStream
from gptctl.engine.model import GPT
from gptctl.engine.optim import make_optimizer
from gptctl.schedule import Schedule
from gptctl.presets import PRESETS, ModelShape

from helpers import TINY_SETTINGS, train_in_process

HF_GPT2_KEYS = [  # Hugging Face GPT2LMHeadModel's names for block 0 and the rest (attn.bias buffers aside)
    "transformer.wte.weight", "transformer.wpe.weight",
    "transformer.h.0.ln_1.weight", "transformer.h.0.ln_1.bias",
    "transformer.h.0.attn.c_attn.weight", "transformer.h.0.attn.c_attn.bias",
    "transformer.h.0.attn.c_proj.weight", "transformer.h.0.attn.c_proj.bias",
    "transformer.h.0.ln_2.weight", "transformer.h.0.ln_2.bias",
    "transformer.h.0.mlp.c_fc.weight", "transformer.h.0.mlp.c_fc.bias",
    "transformer.h.0.mlp.c_proj.weight", "transformer.h.0.mlp.c_proj.bias",
    "transformer.ln_f.weight", "transformer.ln_f.bias", "lm_head.weight",
]


def tiny_model(seq_len=32) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelShape(n_layer=1, n_head=2, n_embd=32, block_size=seq_len))


def test_parameter_names_match_gpt2_and_head_is_tied():
    model = tiny_model()
    assert list(model.state_dict()) == HF_GPT2_KEYS
    assert model.lm_head.weight is model.transformer.wte.weight


def test_param_count_matches_preset_arithmetic():
    shape = PRESETS["tiny"]
    model = GPT(shape)
    assert model.num_params() == shape.num_params()


def test_residual_projections_are_scaled_at_init():
    torch.manual_seed(0)
    model = GPT(ModelShape(n_layer=8, n_head=2, n_embd=64, block_size=16))
    std_fc = model.transformer.h[0].mlp.c_fc.weight.std().item()
    std_proj = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert std_fc == pytest.approx(0.02, rel=0.1)
    assert std_proj == pytest.approx(0.02 / 4, rel=0.1)  # 1/sqrt(2·8)


def test_forward_returns_logits_and_mean_cross_entropy():
    model = tiny_model()
    idx = torch.randint(0, 50257, (2, 16))
    logits, loss = model(idx)
    assert logits.shape == (2, 16, 50304) and loss is None
    _, loss = model(idx, idx)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 50304), idx.view(-1))
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert loss.item() == pytest.approx(np.log(50304), rel=0.05)  # untrained: near uniform


def test_weight_decay_groups():
    opt = make_optimizer(tiny_model(), 0.1, 1e-3, "cpu")
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and all(p.dim() >= 2 for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0 and all(p.dim() < 2 for p in no_decay["params"])


def test_learning_rate_schedules():
    lr = lambda s, kind="cosine", restarts=0: Schedule(kind, 6e-4, 6e-5, 10, 110, restarts).at(s)
    mid = (6e-4 + 6e-5) / 2
    for kind in ("cosine", "cosine_with_restarts", "linear", "constant"):  # the same warmup for all
        assert lr(1, kind) == pytest.approx(6e-5) and lr(10, kind) == pytest.approx(6e-4)
    assert lr(60) == pytest.approx(mid) and lr(110) == pytest.approx(6e-5)
    assert lr(60, "constant") == 6e-4 and lr(110, "constant") == 6e-4
    assert lr(35, "linear") == pytest.approx(6e-4 - 0.25 * (6e-4 - 6e-5)) and lr(110, "linear") == pytest.approx(6e-5)
    # Two restarts: three cycles of 100/3 steps, each from max_lr back down to min_lr.
    assert lr(110, "cosine_with_restarts", 2) == pytest.approx(6e-5)
    assert lr(10 + 100 / 6, "cosine_with_restarts", 2) == pytest.approx(mid)
    assert lr(10 + 100 / 3 + 1, "cosine_with_restarts", 2) > 5.9e-4  # restarted near the top
    assert lr(10 + 100 / 3 - 1, "cosine_with_restarts", 2) < 7e-5
    assert lr(60, "cosine_with_restarts", 0) == lr(60)  # no restarts is plain cosine
    # wsd: max_lr until the last 20% of the steps (from step 88 of 110), then straight down to min_lr.
    wsd = Schedule("wsd", 6e-4, 6e-5, 10, 110, decay_fraction=0.2)
    assert wsd.decay_start() == 88 and wsd.at(10) == wsd.at(88) == 6e-4
    assert wsd.at(99) == pytest.approx(6e-4 - 0.5 * (6e-4 - 6e-5)) and wsd.at(110) == pytest.approx(6e-5)
    # After the schedule's end (a run extended past --lr-decay-steps), the final LR, never a jump.
    for kind in ("cosine", "linear", "wsd", "cosine_with_restarts"):
        assert Schedule(kind, 6e-4, 6e-5, 10, 110, 1).at(150) == pytest.approx(6e-5), kind


def write_shards(root: Path, sizes: list[int]) -> np.ndarray:
    root.mkdir(parents=True)
    tokens = np.arange(sum(sizes), dtype=np.uint16) % 50000
    start = 0
    for i, n in enumerate(sizes):
        np.save(root / f"demo_train_{i:06d}.npy", tokens[start:start + n])
        start += n
    np.save(root / "demo_val_000000.npy", tokens[:100])
    return tokens


def test_stream_reads_across_shard_boundaries(tmp_path):
    tokens = write_shards(tmp_path / "d", [50, 30, 70])
    stream = TokenStream(tmp_path / "d", "train")
    assert stream.num_tokens == 150
    assert (stream.read(45, 40) == tokens[45:85]).all()


def test_batches_do_not_depend_on_world_size(tmp_path):
    write_shards(tmp_path / "d", [400, 300])
    stream = TokenStream(tmp_path / "d", "train")
    cpu = torch.device("cpu")

    def step_rows(world, accum, step):
        rows = []
        for micro in range(accum):
            for rank in range(world):
                x, y = BatchLoader(stream, 2, 8, accum, rank, world, cpu).batch(step, micro)
                assert (x[:, 1:] == y[:, :-1]).all()
                rows.append(x)
        return torch.cat(rows)

    for step in (1, 2, 50):  # 50 wraps around the end of the stream
        single = step_rows(1, 4, step)
        assert torch.equal(torch.sort(single, 0).values, torch.sort(step_rows(2, 2, step), 0).values)
        assert torch.equal(torch.sort(single, 0).values, torch.sort(step_rows(4, 1, step), 0).values)
    assert not torch.equal(step_rows(1, 4, 1), step_rows(1, 4, 2))


def test_sequence_length_warmup_reads_the_same_tokens_in_shorter_rows(tmp_path):
    from gptctl.settings import TrainSettings

    settings = TrainSettings(seq_len=64, min_seq_length=16, dynamic_seq_length=True, warmup_steps=6, max_steps=20,
                             batch_size=2, total_batch_size=2 * 64 * 2)
    assert [settings.seq_len_at(s) for s in range(1, 9)] == [16, 16, 32, 32, 64, 64, 64, 64]  # 3 stages over 6 steps
    assert TrainSettings(seq_len=64).seq_len_at(1) == 64
    write_shards(tmp_path / "d", [3000])
    stream = TokenStream(tmp_path / "d", "train")
    cpu = torch.device("cpu")
    fixed = BatchLoader(stream, 2, 64, 2, 0, 1, cpu)
    warming = BatchLoader(stream, 2, 64, 2, 0, 1, cpu, seq_len_at=settings.seq_len_at)
    for step in (1, 3, 5, 12):  # 12 wraps around the end of the stream
        for micro in (0, 1):
            x, y = warming.batch(step, micro)
            T = settings.seq_len_at(step)
            assert x.shape == (2 * 64 // T, T) and torch.equal(x[:, 1:], y[:, :-1])
            assert torch.equal(x.reshape(-1), fixed.batch(step, micro)[0].reshape(-1))


def test_prefetching_gives_the_same_batches(tmp_path):
    write_shards(tmp_path / "d", [500])
    stream = TokenStream(tmp_path / "d", "train")
    plain = BatchLoader(stream, 2, 8, 2, 0, 1, torch.device("cpu"))
    fetched = BatchLoader(stream, 2, 8, 2, 0, 1, torch.device("cpu"), prefetch=1)
    for step in (1, 2, 3):
        for micro in (0, 1):
            assert torch.equal(plain.batch(step, micro)[0], fetched.batch(step, micro)[0])


def test_num_workers_threads_read_that_many_micro_batches_ahead(tmp_path):
    write_shards(tmp_path / "d", [500])
    stream = TokenStream(tmp_path / "d", "train")
    plain = BatchLoader(stream, 2, 8, 2, 0, 1, torch.device("cpu"))
    ahead = BatchLoader(stream, 2, 8, 2, 0, 1, torch.device("cpu"), prefetch=3)
    for step, micro in [(1, 0), (1, 1), (2, 0), (7, 1), (8, 0)]:  # 7: a jump, as after a rollback or resume
        assert torch.equal(plain.batch(step, micro)[1], ahead.batch(step, micro)[1])
        assert len(ahead.pending) == 3 and ahead._next(step, micro) in ahead.pending


def test_atomic_save_returns_size_and_hash_and_loads_safely(tmp_path):
    from gptctl.digest import sha256_of

    path = tmp_path / ckpt.checkpoint_name(7)
    size, sha = ckpt.save_atomic({"model": tiny_model().state_dict(), "step": 7}, path)
    assert path.name == "model_00007.pt"
    assert size == path.stat().st_size and sha == sha256_of(path)
    assert ckpt.load(path)["step"] == 7
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_a_checkpoint_that_would_run_code_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "model_00001.pt"
    torch.save({"step": 1, "payload": _Evil()}, evil)
    with pytest.raises(ckpt.UnsafeCheckpoint, match="not a plain-data checkpoint"):
        ckpt.load(evil)
    assert not (tmp_path / "pwned").exists()


def test_truncated_checkpoint_is_an_error(tmp_path):
    path = tmp_path / "model_00002.pt"
    ckpt.save_atomic({"model": tiny_model().state_dict()}, path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ckpt.UnsafeCheckpoint):
        ckpt.load(path)


# ---- the Trainer, in-process ---------------------------------------------------------------------

def test_sequence_length_warmup_and_lr_restarts_train_and_resume_exactly(shakespeare, tmp_path):
    args = dict(max_steps=10, checkpoint_interval=5, dynamic_seq_length=True, min_seq_length=8,
                seq_len_warmup_steps=6, lr_scheduler="cosine_with_restarts", lr_restarts=1)
    reference, saved = train_in_process(shakespeare, tmp_path / "warm", **args)
    state = ckpt.load(saved[10])
    lrs = {m["step"]: m["lr"] for m in state["metrics"]}
    # warmup 2 steps, then two cosine cycles of 4 steps: back at the top at step 6.
    assert lrs[2] == pytest.approx(3e-3) and lrs[5] < lrs[6] == pytest.approx(3e-3) and lrs[10] == pytest.approx(3e-4)
    again, _ = train_in_process(shakespeare, tmp_path / "again", resume_from=saved[5], **args)
    assert again == {s: reference[s] for s in range(6, 11)}


def test_the_trainer_state_is_the_checkpoint(shakespeare):
    """A Trainer asked to stop finishes its step; its state_dict loaded into a fresh Trainer continues the
    same run to the bit (losses, lr, grad norms, val losses) and carries the metrics history."""
    from gptctl.engine.distributed import Dist
    from gptctl.engine.startup import StopFlag
    from gptctl.engine.trainer import Metrics, Trainer
    from gptctl.settings import TrainSettings

    settings = TrainSettings(**{**TINY_SETTINGS, "data_root": shakespeare, "max_steps": 6})
    cpu = Dist(0, 0, 1, torch.device("cpu"))
    whole = Trainer(settings, cpu).train()

    stop = StopFlag()

    class StopDuringStep3(Metrics):
        def log(self, row):
            if row["step"] == 2:
                stop.requested = True  # as a signal would, before step 3's all-reduce

    first = Trainer(settings, cpu, stop=stop, metrics=StopDuringStep3())
    stopped = first.train()
    assert stopped.interrupted and stopped.step == 3
    state = first.state_dict()
    assert state["step"] == 3 and [m["step"] for m in state["metrics"]] == [1, 2, 3]
    second = Trainer(settings, cpu)
    second.load_state_dict(state)
    assert second.state.step == 3 and not second.state.interrupted

    def facts(history):
        return [(r["step"], r["loss"], r["lr"], r["grad_norm"], r.get("val_loss")) for r in history]
    assert facts(second.train().history) == facts(whole.history)
    assert whole.tokens_per_s > 0


def test_mmap_load_reads_settings_without_reading_the_tensors(tmp_path):
    """Preflight, orphan checks, sampling and a finetune's parent read part of a checkpoint: mapped, the
    tensors stay in the file (the page cache, shared by the ranks of a node) until touched, instead of
    a private copy of all of it in every process (the issue: ~19 GB per rank for gpt2-xl)."""
    path = tmp_path / "model_00001.pt"
    ckpt.save_atomic({"model": {"w": torch.zeros(2)}, "optimizer": {"big": torch.ones(2**20)},
                      "settings": {"model": "tiny"}, "step": 1}, path)

    def mapped_now() -> bool:
        return str(path) in Path("/proc/self/maps").read_text()

    read = ckpt.load(path)
    assert not mapped_now()
    mapped = ckpt.load(path, mmap=True)
    assert mapped_now()  # the tensors are views of the file, not copies
    assert mapped["settings"] == {"model": "tiny"} and ckpt.stored_step(path) == 1
    assert torch.equal(read["optimizer"]["big"], mapped["optimizer"]["big"])
