"""Text generation from a checkpoint: safe load, prompt encoding, token-by-token sampling, incremental decoding."""

from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import ValidationError
from torch.nn import functional as F

from gptctl.data.tokenizer import EOT_TOKEN, get_encoding
from gptctl.engine import checkpoint as ckpt
from gptctl.engine.distributed import autocast_for, resolve_device, resolve_dtype
from gptctl.engine.model import GPT
from gptctl.errors import UserError
from gptctl.presets import GPT2_VOCAB_SIZE
from gptctl.prompt import format_prompt
from gptctl.settings import TrainSettings


def encode_prompt(enc, prompt: str | None = None, instruction: str | None = None, context: str | None = None) -> list[int]:
    """The tokens the model continues: the finetune template around an instruction, else the raw prompt."""
    if instruction is not None:
        return enc.encode_ordinary(format_prompt(instruction, context))  # exactly as finetuning encodes it
    # "<|endoftext|>" in a prompt means "a new document starts here", as between GPT-2's training documents.
    tokens = enc.encode(prompt or "", allowed_special={"<|endoftext|>"})
    return tokens or [EOT_TOKEN]  # an empty prompt: an unconditional sample, i.e. the start of a document


def next_token(logits: torch.Tensor, temperature: float, top_k: int, generator: torch.Generator | None) -> int:
    """Pick one token from a 1-D row of logits: argmax at temperature 0, else top-k sampling."""
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return int(torch.multinomial(F.softmax(logits, dim=-1), 1, generator=generator))


@torch.no_grad()
def generate(model: GPT, prompt_tokens: list[int], max_new_tokens: int, temperature: float, top_k: int,
             generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32) -> Iterator[int]:
    """Yield new tokens one at a time; stops after max_new_tokens or at end-of-text (which is not yielded)."""
    device = next(model.parameters()).device
    block_size = model.config.block_size
    idx = torch.tensor([prompt_tokens[-block_size:]], dtype=torch.long, device=device)
    for _ in range(max_new_tokens):
        with autocast_for(device, dtype):
            logits, _ = model(idx)
        # The padded vocabulary's extra rows are no tokens; tiktoken could not decode them.
        token = next_token(logits[0, -1, :GPT2_VOCAB_SIZE].float(), temperature, top_k, generator)
        if token == EOT_TOKEN:
            return
        yield token
        # The model sees at most block_size positions, so the context slides.
        idx = torch.cat([idx, torch.tensor([[token]], device=device)], dim=1)[:, -block_size:]


class Completion:
    """One sample: iterate for text pieces as tokens arrive; `tokens` and `text()` hold the whole of it.

    Each step decodes all tokens so far and hands out the new suffix, except while the text ends in
    U+FFFD: a character whose UTF-8 bytes span several tokens waits until its last byte has arrived.
    """

    def __init__(self, enc, tokens: Iterator[int]):
        self.enc, self._source, self.tokens, self._emitted = enc, tokens, [], 0

    def __iter__(self) -> Iterator[str]:
        for token in self._source:
            self.tokens.append(token)
            text = self.enc.decode(self.tokens)
            new = "" if text.endswith("\ufffd") else self._take(text)
            if new:
                yield new
        rest = self._take(self.enc.decode(self.tokens))  # bytes that never completed stay U+FFFD
        if rest:
            yield rest

    def _take(self, text: str) -> str:
        new, self._emitted = text[self._emitted:], len(text)
        return new

    def text(self) -> str:
        for _ in self:
            pass
        return self.enc.decode(self.tokens)


class Sampler:
    """A model loaded from a checkpoint for generation, with its tokenizer, device and autocast dtype."""

    def __init__(self, path: Path, device: str = "auto", option: str = "CHECKPOINT"):
        try:
            self.device = resolve_device(device)
        except RuntimeError as exc:
            raise UserError(f"--device: {exc}; use --device auto or cpu") from None
        try:
            state = ckpt.load(path, mmap=True)  # the weights are copied out; the optimizer state is never read
        except ckpt.UnsafeCheckpoint as exc:
            raise UserError(f"{option}: {exc}") from None
        if not isinstance(state, dict) or not {"model", "settings"} <= state.keys():
            raise UserError(f"{option}: {path} is not a gptctl checkpoint (it has no model and settings); "
                            "give a file written by gptctl pretrain or finetune")
        try:
            self.settings = TrainSettings.model_validate(state["settings"])
            self.model = GPT(self.settings.shape)
            self.model.load_state_dict(state["model"])
        except (ValidationError, RuntimeError) as exc:
            raise UserError(f"{option}: {path} does not hold a model gptctl can build: {str(exc).splitlines()[0]}") from None
        self.model.to(self.device).eval()
        self.step = int(state.get("step", 0))
        self.dtype = resolve_dtype("auto", self.device)  # bfloat16 autocast where CUDA supports it
        self.enc = get_encoding("gpt2")

    def describe(self) -> str:
        return (f"{self.settings.kind} model, step {self.step}, {self.model.num_params() / 1e6:.2f}M parameters, "
                f"context {self.model.config.block_size} tokens, on {self.device.type} ({str(self.dtype).removeprefix('torch.')})")

    def encode(self, prompt: str | None = None, instruction: str | None = None, context: str | None = None) -> list[int]:
        return encode_prompt(self.enc, prompt, instruction, context)

    def samples(self, prompt_tokens: list[int], num_samples: int, max_new_tokens: int, temperature: float,
                top_k: int, seed: int) -> Iterator[Completion]:
        """num_samples completions drawn from one seeded generator; consume each before taking the next."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for _ in range(num_samples):
            tokens = generate(self.model, prompt_tokens, max_new_tokens, temperature, top_k, generator, self.dtype)
            yield Completion(self.enc, tokens)
