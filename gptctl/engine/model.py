"""gptctl's GPT, nanoGPT style, in two architectures that share everything where they agree.

gpt2 (the default): GPT-2 as OpenAI made it; parameter names match Hugging Face's GPT-2 one to one.
modern: the decoder that the speedruns (modded-nanogpt, nanochat) reach GPT-2's quality with, limited to
what a standard transformers architecture computes, so that it exports to Qwen3 (Qwen3ForCausalLM):
  * rotary position embeddings (RoPE, HF's rotate-half layout) instead of learned positions;
  * RMSNorm instead of LayerNorm, and QK-norm (RMSNorm of each head's queries and keys) against
    attention logits that grow without bound;
  * no biases; a SwiGLU MLP (same parameters as GPT-2's 4d GELU MLP);
  * an untied head: the embedding and lm_head learn at rates of their own (engine/optim.py);
  * output projections (o_proj, down_proj) and the head start at zero: each block starts as the
    identity, and the first steps do not undo a random head.
Left out because Qwen3 cannot compute them: logit soft-capping, value embeddings, U-net skips, ReLU²
(Qwen3's MLP is gated), the norm after the embedding, sliding windows. The containers keep nanoGPT's
names (transformer.h.N, ln_1, ln_2, ln_f) and the leaves take Qwen3's (q_proj, gate_proj, q_norm), so
the export is one rename table (engine/hf.py).

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

Generation (engine/generate.py) passes a KV cache to forward: positions then start at the cache's
fill, each attention layer adds its keys and values to the cache and attends over it, and only the
last position's logits are computed. Without a cache (training, evaluation) nothing changes.
"""

from typing import Literal

import torch
import torch.nn as nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

IGNORE_INDEX = -100  # finetuning masks prompt and padding tokens with it

# The one description of a model, shared with settings and estimate (pure Python); nanoGPT's name here.
# The loss chunk and the checkpointing modes too: estimate counts their memory without importing torch.
from gptctl.presets import (CHECKPOINTING_MODES, LOSS_CHUNK_ROWS, RMS_NORM_EPS, ROPE_THETA,  # noqa: E402
                            ModelShape as GPTConfig)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv=None) -> torch.Tensor:
    """Causal self-attention (B, H, T, hd); with `kv` (a layer of generate.KVCache), over the cache too.

    The cache takes two shapes of input: a prefill into an empty cache (causal over the new positions
    alone; its batch may be 1 where the cache's is N, the cache copies the rows) and one new position,
    which sees every filled position: no mask, unless the cache's rows hold different lengths
    (engine/batch.py's RowCache), whose `mask` hides each row's unfilled positions.
    """
    if kv is None:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # flash attention on GPU
    prefill = kv.empty
    keys, values = kv.append(k, v)
    if prefill:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=kv.mask)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)
        self.c_proj.RESIDUAL_SCALE_INIT = True
        self.n_head = config.n_head
        self.n_embd = config.n_embd

    def forward(self, x: torch.Tensor, kv=None) -> torch.Tensor:
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = attention(q, k, v, kv)
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


class RMSNorm(nn.Module):
    """Qwen3RMSNorm's arithmetic: normalised in fp32, cast back, then the gain (a learnable vector)."""

    def __init__(self, dim: int, eps: float = RMS_NORM_EPS):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rotary_at(head_dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (fp32) of HF's rotate-half RoPE at these positions (frequency i serves dims i and i+d/2):
    T × head_dim for positions (T,); B × 1 × T × head_dim for positions (B, T), one row each (the rows of
    a decode batch at different positions)."""
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=positions.device) / head_dim)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    if positions.dim() == 2:
        angles = angles.unsqueeze(1)  # broadcast over the heads
    return angles.cos(), angles.sin()


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, hd) rotated by position: x·cos + rotate_half(x)·sin, rotate_half(a, b) = (-b, a)."""
    half = x.size(-1) // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos.to(x.dtype) + rotated * sin.to(x.dtype)


class RotaryAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        d = config.n_embd
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)
        self.o_proj.ZERO_INIT = True
        self.q_norm = RMSNorm(config.head_dim)
        self.k_norm = RMSNorm(config.head_dim)
        self.n_head, self.head_dim = config.n_head, config.head_dim

    def forward(self, x: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor], kv=None) -> torch.Tensor:
        B, T, C = x.size()
        heads = (B, T, self.n_head, self.head_dim)
        q = self.q_norm(self.q_proj(x).view(heads)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(heads)).transpose(1, 2)
        v = self.v_proj(x).view(heads).transpose(1, 2)
        cos, sin = rotary
        # The norms' fp32 gains would promote q and k out of autocast's dtype; v's is the one attention runs in.
        q, k = apply_rotary(q, cos, sin).to(v.dtype), apply_rotary(k, cos, sin).to(v.dtype)
        y = attention(q, k, v, kv)
        return self.o_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(config.n_embd, config.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(config.mlp_hidden, config.n_embd, bias=False)
        self.down_proj.ZERO_INIT = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm residual block, the same in both architectures: only its parts differ."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        modern = config.arch == "modern"
        self.ln_1 = RMSNorm(config.n_embd) if modern else nn.LayerNorm(config.n_embd)
        self.attn = RotaryAttention(config) if modern else CausalSelfAttention(config)
        self.ln_2 = RMSNorm(config.n_embd) if modern else nn.LayerNorm(config.n_embd)
        self.mlp = SwiGLU(config) if modern else MLP(config)

    def forward(self, x: torch.Tensor, *rotary: tuple[torch.Tensor, torch.Tensor], kv=None) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), *rotary, kv=kv)  # rotary: modern's (cos, sin); gpt2 has none
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, config: GPTConfig,
                 activation_checkpointing: Literal["none", "selective", "full"] = "none"):
        super().__init__()
        if activation_checkpointing not in CHECKPOINTING_MODES:
            raise ValueError(f"activation_checkpointing must be one of {CHECKPOINTING_MODES}")
        self.config = config
        self.activation_checkpointing = activation_checkpointing  # a plain attribute: not in the state dict
        if config.arch not in ("gpt2", "modern"):
            raise ValueError(f"unknown architecture {config.arch!r}")
        modern = config.arch == "modern"
        layers = dict(wte=nn.Embedding(config.vocab_size, config.n_embd))
        if not modern:
            layers["wpe"] = nn.Embedding(config.block_size, config.n_embd)
        self.transformer = nn.ModuleDict(
            dict(
                **layers,
                h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
                ln_f=RMSNorm(config.n_embd) if modern else nn.LayerNorm(config.n_embd),
            )
        )
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tied_head:
            self.transformer.wte.weight = self.lm_head.weight  # weight tying, as in GPT-2
        else:
            self.lm_head.ZERO_INIT = True
        self.apply(self._init_modern_weights if modern else self._init_weights)

    def _init_modern_weights(self, module: nn.Module) -> None:
        """The speedruns' init: matrices uniform with std 1/√fan_in (no outliers), zero where ZERO_INIT,
        the embedding at std 1 (the first RMSNorm rescales it, and its large LR moves it)."""
        if isinstance(module, nn.Linear):
            if getattr(module, "ZERO_INIT", False):
                torch.nn.init.zeros_(module.weight)
            else:
                bound = 3 ** 0.5 * module.in_features ** -0.5
                torch.nn.init.uniform_(module.weight, -bound, bound)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=1.0)

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

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, cache=None):
        """(logits, loss): logits without targets, the loss with them. With `cache` (a generate.KVCache),
        idx continues the cached positions and the logits are the last position's only (B, 1, V)."""
        B, T = idx.size()
        start = cache.length if cache is not None else 0  # a cache of rows of different lengths: the longest
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of length {start + T} exceeds block size {self.config.block_size}")
        # (T,), or (B, T) where each row of the cache has its own position
        positions = cache.positions(T, idx.device) if cache is not None else torch.arange(T, device=idx.device)
        x = self.transformer.wte(idx)
        if self.config.arch == "gpt2":
            x = x + self.transformer.wpe(positions)
            extra = ()
        else:  # computed per call: cheap next to a block, and a buffer would not survive meta-device init
            extra = (rotary_at(self.config.head_dim, positions),)
        for i, block in enumerate(self.transformer.h):
            if cache is not None:
                x = block(x, *extra, kv=cache.layers[i])
            elif self._recomputes(i):
                x = checkpoint(block, x, *extra, use_reentrant=False)
            else:
                x = block(x, *extra)
        if cache is not None:
            cache.advance(T)
            x = x[:, -1:]  # generation samples from the last position: the head's matmul for it alone
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
