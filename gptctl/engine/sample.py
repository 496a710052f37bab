"""Text generation from a checkpoint: safe load, prompt encoding, one sample's text as it streams.
The generation itself (KV cache, sampling, incremental decoding) is engine/generate.py."""

from collections.abc import Iterator
from pathlib import Path

import torch
from pydantic import ValidationError

from gptctl.data.tokenizer import EOT_TOKEN, get_encoding
from gptctl.checkpoints import files as ckpt
from gptctl.engine.distributed import resolve_device, resolve_dtype
from gptctl.engine.generate import Generation, Sampling
from gptctl.engine.model import GPT
from gptctl.errors import UserError
from gptctl.prompt import format_prompt
from gptctl.settings import TrainSettings


def encode_prompt(enc, prompt: str | None = None, instruction: str | None = None, context: str | None = None) -> list[int]:
    """The tokens the model continues: the finetune template around an instruction, else the raw prompt."""
    if instruction is not None:
        return enc.encode_ordinary(format_prompt(instruction, context))  # exactly as finetuning encodes it
    # "<|endoftext|>" in a prompt means "a new document starts here", as between GPT-2's training documents.
    tokens = enc.encode(prompt or "", allowed_special={"<|endoftext|>"})
    return tokens or [EOT_TOKEN]  # an empty prompt: an unconditional sample, i.e. the start of a document


class Completion:
    """One sample of a Generation: iterate for its text as it arrives; `tokens` and `text()` hold the whole of it.

    The generation advances all its samples together: iterating this one steps it, and the other
    samples' text waits in it until their Completion is iterated.
    """

    def __init__(self, generation: Generation, row: int):
        self.generation, self.row, self._pieces = generation, row, []

    @property
    def tokens(self) -> list[int]:
        return self.generation.tokens[self.row]

    def __iter__(self) -> Iterator[str]:
        while True:
            for piece in self.generation.take(self.row):
                self._pieces.append(piece)
                yield piece
            if self.generation.finished(self.row):
                return
            self.generation.step()

    def text(self) -> str:
        for _ in self:
            pass
        return "".join(self._pieces)


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

    @property
    def finetuned(self) -> bool:
        """Whether the model was instruction-tuned (gptctl finetune), so it answers prompts in prompt.py's template."""
        return self.settings.kind == "finetune"

    @property
    def block_size(self) -> int:
        """Tokens the model sees at most (its context); generation slides past it."""
        return self.model.config.block_size

    def cropped(self, prompt_tokens: list[int]) -> str | None:
        """What to tell the user when a prompt is longer than the context: the model sees only its end."""
        if len(prompt_tokens) > self.block_size:
            return f"the prompt has {len(prompt_tokens)} tokens; the model sees only the last {self.block_size}"
        return None

    def describe(self) -> str:
        return (f"{self.settings.kind} model, step {self.step}, {self.model.num_params() / 1e6:.2f}M parameters, "
                f"context {self.block_size} tokens, on {self.device.type} ({str(self.dtype).removeprefix('torch.')})")

    def encode(self, prompt: str | None = None, instruction: str | None = None, context: str | None = None) -> list[int]:
        return encode_prompt(self.enc, prompt, instruction, context)

    def samples(self, prompt_tokens: list[int], num_samples: int, max_new_tokens: int, sampling: Sampling,
                seed: int) -> list[Completion]:
        """num_samples completions, generated together and drawn from one seeded generator."""
        generator = torch.Generator(device=self.device).manual_seed(seed)
        generation = Generation(self.model, self.enc, prompt_tokens, max_new_tokens, sampling, num_samples,
                                generator, self.dtype)
        return [Completion(generation, row) for row in range(num_samples)]
