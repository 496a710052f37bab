"""GPT-2, nanoGPT style: parameter names match Hugging Face's GPT-2 one to one.

Two memory savers, neither of which changes a parameter name (checkpoints load into any model):

* The loss never materialises the B×T×V logits (3.3 GB in fp32 for gpt2 at B=16, T=1024):
  `chunked_cross_entropy` computes the head and the cross-entropy LOSS_CHUNK_ROWS rows at a time
  and, since the loss is the end of the graph, the gradients of the head's input and weight in the
  same pass (no recomputation, the same FLOPs as the plain head).
* Activation checkpointing per transformer block (`activation_checkpointing`): "full" keeps only
  each block's input and recomputes the block in backward; "selective" does that for every other
  block (blocks 0, 2, 4, …: about half the activation memory for a third more block compute in
  backward, torchtitan's layer-selective mode). Through torch.utils.checkpoint (non-reentrant),
  which torch.compile, DDP and FSDP2 support; recomputation is deterministic, so losses are the
  same to the bit.
"""

from typing import Literal

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # finetuning masks prompt and padding tokens with it
LOSS_CHUNK_ROWS = 2048  # rows (tokens) of logits alive at once: 2048 × 50304 fp32 = 412 MB
CHECKPOINTING_MODES = ("none", "selective", "full")

# The one description of a model, shared with settings and estimate (pure Python); nanoGPT's name here.
from gptctl.presets import ModelShape as GPTConfig  # noqa: E402


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention on GPU
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.gelu = nn.GELU(approximate="tanh")
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig,
                 activation_checkpointing: Literal["none", "selective", "full"] = "none"):
        super().__init__()
        if activation_checkpointing not in CHECKPOINTING_MODES:
            raise ValueError(f"activation_checkpointing must be one of {CHECKPOINTING_MODES}")
        self.config = config
        self.activation_checkpointing = activation_checkpointing  # a plain attribute: not in the state dict
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(config.vocab_size, config.n_embd),
                wpe=nn.Embedding(config.block_size, config.n_embd),
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            std = 0.02
            if getattr(module, "RESIDUAL_SCALE_INIT", False):
                std *= (2 * self.config.n_layer) ** -0.5  # GPT-2: residual projections scaled by 1/sqrt(2L)
            torch.nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.size()
        if T > self.config.block_size:
            raise ValueError(f"sequence of length {T} exceeds block size {self.config.block_size}")
        pos = torch.arange(0, T, dtype=torch.long, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for i, block in enumerate(self.transformer.h):
            if self._recomputes(i):
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        x = self.transformer.ln_f(x)
        if targets is None:
            return self.lm_head(x), None
        # With targets, the logits are never whole: callers that pass targets only use the loss.
        return None, chunked_cross_entropy(x.view(B * T, -1), self.lm_head.weight, targets.reshape(-1))

    def _recomputes(self, block_index: int) -> bool:
        mode = self.activation_checkpointing
        return torch.is_grad_enabled() and (mode == "full" or (mode == "selective" and block_index % 2 == 0))

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          chunk_rows: int = LOSS_CHUNK_ROWS) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weightᵀ over targets != IGNORE_INDEX, as
    F.cross_entropy(logits.float(), targets, ignore_index=IGNORE_INDEX) computes it, chunk_rows rows at a time."""
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _ChunkedCrossEntropy.apply(h, weight, targets, chunk_rows)
    loss_sum, _, _ = _chunked_loss_and_grads(h, weight, targets, chunk_rows, with_grads=False)
    return loss_sum / (targets != IGNORE_INDEX).sum()


class _ChunkedCrossEntropy(torch.autograd.Function):
    """The loss is the end of the graph, so its gradients are known in forward up to the scalar that
    backward brings (1/accumulation, the GradScaler's scale): computing them there, chunk by chunk,
    means no logits are kept or recomputed."""

    @staticmethod
    def forward(ctx, h, weight, targets, chunk_rows):
        loss_sum, grad_h, grad_w = _chunked_loss_and_grads(h, weight, targets, chunk_rows, with_grads=True)
        count = (targets != IGNORE_INDEX).sum()  # a tensor: no host-device sync
        ctx.save_for_backward(grad_h, grad_w, count)
        return loss_sum / count

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, count = ctx.saved_tensors
        scale = grad_loss / count
        return grad_h * scale, grad_w * scale, None, None


def _chunked_loss_and_grads(h, weight, targets, chunk_rows, with_grads):
    """(sum of token losses, d sum/dh, d sum/dweight): the head in the autocast dtype, softmax in fp32.

    Gradients leave the chunk unnormalised (softmax − one-hot, in [-1, 1]) and are divided by the
    token count only in fp32, so float16 cannot underflow where the unchunked loss's scaled gradient
    would not either.
    """
    device_type = h.device.type
    compute_dtype = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else h.dtype
    with torch.autocast(device_type, enabled=False):
        w = weight.to(compute_dtype)
        loss_sum = torch.zeros((), device=h.device, dtype=torch.float32)
        grad_h = torch.empty_like(h) if with_grads else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if with_grads else None
        for start in range(0, h.size(0), chunk_rows):
            rows = slice(start, start + chunk_rows)
            h_chunk, t = h[rows].to(compute_dtype), targets[rows]
            logits = (h_chunk @ w.t()).float()  # the chunk's one V-wide fp32 tensor: the rest is done in place
            valid = t != IGNORE_INDEX
            safe_t = torch.where(valid, t, 0).unsqueeze(1)
            target_logit = logits.gather(1, safe_t)
            row_max = logits.amax(dim=1, keepdim=True)
            probs = logits.sub_(row_max).exp_()  # torch.logsumexp would allocate a second V-wide temporary
            row_sum = probs.sum(dim=1, keepdim=True)
            token_loss = (row_max + row_sum.log() - target_logit).squeeze(1)
            loss_sum = loss_sum + torch.where(valid, token_loss, 0.0).sum()
            if with_grads:
                probs.mul_(valid.unsqueeze(1) / row_sum)  # the softmax, zero on ignored rows: one pass
                probs.scatter_add_(1, safe_t, -valid.unsqueeze(1).to(probs.dtype))  # − one-hot
                grad_logits = probs.to(compute_dtype)  # in fp32 the same tensor as probs
                del logits, probs
                grad_h[rows] = (grad_logits @ w).to(h.dtype)
                grad_w += (grad_logits.t() @ h_chunk).float()
                del grad_logits
            else:
                del logits, probs  # before the next chunk's logits exist: one chunk alive at a time
    return loss_sum, grad_h, grad_w
