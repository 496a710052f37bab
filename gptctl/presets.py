"""Model shapes by name. Pure Python: the CLI, settings and estimate use it without torch."""

from dataclasses import dataclass

GPT2_VOCAB_SIZE = 50257
# 50257 rounded up to a multiple of 64: GPU matmuls are faster on padded shapes and the
# extra logits are never targets, so they only learn to be unlikely.
PADDED_VOCAB_SIZE = 50304


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int = 1024
    vocab_size: int = PADDED_VOCAB_SIZE

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count of gptctl's GPT (lm_head tied to wte, biases included)."""
        d, L = self.n_embd, self.n_layer
        per_block = (
            2 * 2 * d  # ln_1, ln_2 weight + bias
            + d * 3 * d + 3 * d  # attn.c_attn
            + d * d + d  # attn.c_proj
            + d * 4 * d + 4 * d  # mlp.c_fc
            + 4 * d * d + d  # mlp.c_proj
        )
        total = L * per_block + 2 * d  # + ln_f
        if include_embeddings:
            total += self.vocab_size * d + self.block_size * d
        return total


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(n_layer=2, n_head=2, n_embd=64),
    "small": ModelShape(n_layer=6, n_head=6, n_embd=192),  # ~10M params (mostly embeddings)
    "gpt2": ModelShape(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": ModelShape(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": ModelShape(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": ModelShape(n_layer=48, n_head=25, n_embd=1600),
}
