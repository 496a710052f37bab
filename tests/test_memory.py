"""Memory savers: the chunked loss (same loss and gradients as the plain one) and activation
checkpointing (the same losses to the bit, and state dicts that know nothing of it)."""

import pytest
import torch
import torch.nn.functional as F

from gptctl.engine.model import GPT, chunked_cross_entropy
from gptctl.engine.optim import make_optimizer
from gptctl.presets import ModelShape

SHAPE = ModelShape(n_layer=3, n_head=2, n_embd=32, block_size=16)


def tiny(mode: str = "none") -> GPT:
    torch.manual_seed(0)
    return GPT(SHAPE, activation_checkpointing=mode)


def reference_loss(model: GPT, idx, targets):
    """The loss as the model computed it before chunking: whole logits, .float(), F.cross_entropy."""
    logits, _ = model(idx)
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.view(-1), ignore_index=-100)


def batch(masked: bool = False):
    g = torch.Generator().manual_seed(1)
    idx = torch.randint(0, 50257, (3, 16), generator=g)
    targets = torch.randint(0, 50257, (3, 16), generator=g)
    if masked:  # a finetune's prompt and padding
        targets[:, :5] = -100
        targets[2, 9:] = -100
    return idx, targets


@pytest.mark.parametrize("masked", [False, True])
def test_chunked_loss_and_gradients_match_the_whole_logits_loss(masked, monkeypatch):
    # Several chunks of 7 rows, the last one ragged (48 rows).
    monkeypatch.setattr(chunked_cross_entropy, "__defaults__", (7,))
    idx, targets = batch(masked)
    model = tiny()
    ref = reference_loss(model, idx, targets)
    ref_grads = torch.autograd.grad(ref * 0.25, list(model.parameters()))
    logits, loss = model(idx, targets)
    assert logits is None  # never materialised when only the loss is wanted
    grads = torch.autograd.grad(loss * 0.25, list(model.parameters()))
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)
    for (name, _), a, b in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_loss_under_autocast_matches_to_its_precision(dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(101, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 101, (37,), generator=g)
    t[::5] = -100
    with torch.autocast("cpu", dtype=dtype):
        ref = F.cross_entropy(F.linear(h, w).float(), t, ignore_index=-100)
        loss = chunked_cross_entropy(h, w, t, chunk_rows=8)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
    for a, b in zip(torch.autograd.grad(loss, [h, w]), torch.autograd.grad(ref, [h, w])):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-2)  # bf16 has 3 significant digits


def test_chunked_loss_without_gradients_is_the_same_number():
    idx, targets = batch(masked=True)
    model = tiny()
    with torch.no_grad():
        _, loss = model(idx, targets)
        ref = reference_loss(model, idx, targets)
    assert loss.item() == pytest.approx(ref.item(), rel=1e-6)


def train_losses(mode: str, steps: int = 3) -> tuple[list[float], GPT]:
    model = tiny(mode)
    optimizer = make_optimizer(model, 0.1, 1e-3, "cpu")
    losses = []
    for step in range(steps):
        idx, targets = batch(masked=step == 1)
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(idx, targets)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(loss.item())
    return losses, model


def test_activation_checkpointing_gives_the_same_losses_to_the_bit():
    plain, plain_model = train_losses("none")
    for mode in ("selective", "full"):
        losses, model = train_losses(mode)
        assert losses == plain, mode
        for (name, a), b in zip(model.state_dict().items(), plain_model.state_dict().values()):
            assert torch.equal(a, b), (mode, name)


def test_checkpointed_models_state_dicts_load_into_plain_ones_and_back():
    _, trained = train_losses("full", steps=1)
    keys = list(tiny().state_dict())
    assert list(trained.state_dict()) == keys  # no checkpoint-wrapper prefixes
    plain = tiny("none")
    plain.load_state_dict(trained.state_dict())
    again = tiny("selective")
    again.load_state_dict(plain.state_dict())
    idx, targets = batch()
    assert again(idx, targets)[1].item() == trained(idx, targets)[1].item()


def test_unknown_checkpointing_mode_is_refused():
    with pytest.raises(ValueError, match="activation_checkpointing"):
        tiny("every-third")
