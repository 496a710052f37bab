"""Generation with a KV cache: the prompt is run once (prefill), then each new token is one position
run against the cached keys and values of all earlier ones (decode), for either architecture.

Several samples of one prompt share its prefill: the prompt runs at batch 1 and its keys and values
are copied into every row of the cache, then the rows decode together, one token each per step. A
row ends at end-of-text (not part of the sample), at a stop sequence (its text ends before it) or at
max_new_tokens; an ended row leaves the batch, so the others no longer compute it.

Past the context (block_size tokens), the model sees the last block_size tokens, as nanoGPT's
cache-free loop does, so that the text is the same with and without the cache. The cache cannot be
kept for that: every token of the window changes position (gpt2's learned positions) or loses the
tokens it attended to (both architectures: the oldest token falls out of every later one's past).
So once the cache is full, each step re-prefills the last block_size tokens: as slow as the
cache-free loop there, but exact. (The cheaper policy, re-prefilling half a window and decoding
into the other half, shows the model a context of block_size/2 to block_size tokens: other text.)
"""

import codecs
from dataclasses import dataclass

import torch
from torch.nn import functional as F

from gptctl.data.tokenizer import EOT_TOKEN
from gptctl.engine.distributed import autocast_for
from gptctl.engine.model import GPT, GPTConfig
from gptctl.presets import GPT2_VOCAB_SIZE


class KVCache:
    """Keys and values of every layer, preallocated as (layers, batch, heads, max_len, head_dim).

    `length` positions are filled; GPT.forward advances it once all its layers have appended.
    """

    def __init__(self, config: GPTConfig, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        shape = (config.n_layer, batch, config.n_head, max_len, config.head_dim)
        self.k = torch.empty(shape, device=device, dtype=dtype)
        self.v = torch.empty(shape, device=device, dtype=dtype)
        self.max_len, self.length = max_len, 0
        self.layers = [_LayerCache(self, i) for i in range(config.n_layer)]

    @property
    def full(self) -> bool:
        return self.length == self.max_len

    def positions(self, length: int, device: torch.device) -> torch.Tensor:
        """The positions of `length` new tokens: after the filled ones, the same in every row."""
        return torch.arange(self.length, self.length + length, device=device)

    def advance(self, length: int) -> None:
        self.length += length

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (the samples still running), in this order."""
        self.k, self.v = self.k[:, rows], self.v[:, rows]


class _LayerCache:
    """One layer's view of the cache: what model.attention appends to and attends over."""

    mask = None  # every row holds the same positions: nothing to hide

    def __init__(self, cache: KVCache, index: int):
        self.cache, self.index = cache, index

    @property
    def empty(self) -> bool:
        return self.cache.length == 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, hd) after the filled positions; returns every filled position's keys and values.
        A batch-1 prefill is copied into all rows (broadcasting)."""
        cache, start = self.cache, self.cache.length
        end = start + k.size(2)
        if start and k.size(2) != 1:
            raise ValueError("a KV cache takes a prefill into an empty cache, then one position at a time")
        cache.k[self.index, :, :, start:end] = k
        cache.v[self.index, :, :, start:end] = v
        return cache.k[self.index, :, :, :end], cache.v[self.index, :, :, :end]


@dataclass(frozen=True)
class Sampling:
    """How tokens are picked. temperature 0: greedy (argmax; top_k and top_p then change nothing).
    top_k None and top_p 1.0 are off. stop: strings the text ends before (the first one found)."""

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


GREEDY_BELOW = 1e-4  # a temperature below this is greedy: the likeliest token's share is ~1 already


def sample_next(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row of logits (B × V, fp32): argmax at temperature 0, else a draw from the
    softmax of logits/temperature restricted to the top_k likeliest tokens, then to the fewest
    likeliest whose probabilities sum to top_p (the nucleus; the likeliest token always stays)."""
    if sampling.temperature < GREEDY_BELOW:  # 0, or so small that logits/temperature would overflow to NaN
        return logits.argmax(dim=-1)
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.size(-1):
        kth = torch.topk(logits, sampling.top_k).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # A token is out once the likelier ones before it already hold top_p.
        out_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= sampling.top_p
        probs = probs.masked_fill(out_sorted.scatter(-1, order, out_sorted), 0.0)  # multinomial renormalises
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


class TextStream:
    """A sample's text, decoded as its tokens arrive: each token's bytes go through an incremental
    UTF-8 decoder, which holds back a character whose bytes are not all there yet (bytes that never
    complete become U+FFFD, as in enc.decode). Text that may be the start of a stop sequence is held
    back too, until it is known not to be one; at a stop sequence the text ends before it."""

    def __init__(self, enc, stop: tuple[str, ...] = ()):
        self.enc, self.stop, self.stopped = enc, stop, False
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""

    def push(self, token: int) -> str:
        """The text that token completes (maybe none)."""
        return self._release(self._utf8.decode(self.enc.decode_single_token_bytes(token)), final=False)

    def close(self) -> str:
        """Whatever was held back, once no token follows."""
        return self._release(self._utf8.decode(b"", final=True), final=True)

    def _release(self, new: str, final: bool) -> str:
        if self.stopped:
            return ""
        text = self._held + new
        found = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if found:
            self.stopped, self._held = True, ""
            return text[:min(found)]
        # Emitted text never holds the start of a stop sequence, so held + new is all a match can span.
        keep = 0 if final else max((n for s in self.stop for n in range(1, len(s)) if text.endswith(s[:n])), default=0)
        self._held = text[len(text) - keep:]
        return text[:len(text) - keep]


class SampleText:
    """One sample's new tokens and its text as they arrive; `finish` says why it ended ("stop": end-of-text
    or a stop sequence; "length": max_new_tokens), None while it runs."""

    def __init__(self, enc, stop: tuple[str, ...], max_new_tokens: int):
        self.tokens: list[int] = []
        self.stream, self.max_new_tokens, self.finish = TextStream(enc, stop), max_new_tokens, None

    def add(self, token: int) -> str:
        """Take the token the model chose; returns the text it completes (maybe none)."""
        text = ""
        if token != EOT_TOKEN:  # end-of-text ends the sample and is not part of it
            self.tokens.append(token)
            text = self.stream.push(token)
        if token == EOT_TOKEN or self.stream.stopped:
            self.finish = "stop"
        elif len(self.tokens) == self.max_new_tokens:
            self.finish = "length"
        return text + self.stream.close() if self.finish else text


def context_window(prompt: list[int], tokens: list[int], block_size: int) -> list[int]:
    """What the model sees of a sample: its last block_size tokens, the prompt's included."""
    return (prompt + tokens)[-block_size:]


class Generation:
    """num_samples continuations of one prompt, decoded together against one KV cache.

    step() adds a token to every running sample; take(row) hands out the text that arrived for a
    sample since last asked; tokens[row] are its new tokens (the one that reached a stop sequence
    included, end-of-text not).
    """

    def __init__(self, model: GPT, enc, prompt_tokens: list[int], max_new_tokens: int, sampling: Sampling,
                 num_samples: int = 1, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
        self.model, self.sampling, self.generator, self.dtype = model, sampling, generator, dtype
        self.max_new_tokens = max_new_tokens
        self.device = next(model.parameters()).device
        self.block_size = model.config.block_size
        self.prompt = prompt_tokens[-self.block_size:]  # the model sees at most block_size positions
        self._samples = [SampleText(enc, sampling.stop, max_new_tokens) for _ in range(num_samples)]
        self.tokens: list[list[int]] = [sample.tokens for sample in self._samples]
        self._pieces: list[list[str]] = [[] for _ in range(num_samples)]
        self.running = list(range(num_samples))  # the samples in the cache's rows, in row order
        # Room for the prompt and the new tokens (one more than is ever fed: the last is not), up to the context.
        max_len = min(self.block_size, len(self.prompt) + max_new_tokens)
        self.cache = KVCache(model.config, num_samples, max_len, self.device, dtype)

    def finished(self, row: int) -> bool:
        return row not in self.running

    def take(self, row: int) -> list[str]:
        pieces, self._pieces[row] = self._pieces[row], []
        return [p for p in pieces if p]

    @torch.inference_mode()
    def step(self) -> bool:
        """One token for each running sample; returns whether any still runs."""
        if not self.running:
            return False
        logits = self._forward()[:, -1, :GPT2_VOCAB_SIZE]  # the padded vocabulary's extra rows are no tokens
        chosen = sample_next(logits.float().expand(len(self.running), -1), self.sampling, self.generator)
        ended = []
        for row, token in zip(self.running, chosen.tolist()):
            self._pieces[row].append(self._samples[row].add(token))
            if self._samples[row].finish:
                ended.append(row)
        if ended:
            kept = [i for i, row in enumerate(self.running) if row not in ended]
            self.running = [self.running[i] for i in kept]
            if kept:
                self.cache.keep(torch.tensor(kept, device=self.device))
        return bool(self.running)

    def run(self) -> list[list[int]]:
        """Every sample to its end; their new tokens."""
        while self.step():
            pass
        return self.tokens

    def _forward(self) -> torch.Tensor:
        """Logits of the next position of every running row (one row while only the prompt is cached)."""
        if self.cache.length == 0:  # the prompt, once for all samples
            idx = [self.prompt]
        elif self.cache.full:  # past the context: the last block_size tokens, anew (module docstring)
            self.cache.length = 0
            idx = [context_window(self.prompt, self.tokens[row], self.block_size) for row in self.running]
        else:
            idx = [self.tokens[row][-1:] for row in self.running]
        with autocast_for(self.device, self.dtype):
            logits, _ = self.model(torch.tensor(idx, device=self.device), cache=self.cache)
        return logits
