"""Model shapes and training recipes by name. Pure Python: the CLI, settings and estimate use it without torch."""

from dataclasses import dataclass

GPT2_VOCAB_SIZE = 50257
# 50257 rounded up to a multiple of 64: GPU matmuls are faster on padded shapes and the
# extra logits are never targets, so they only learn to be unlikely.
PADDED_VOCAB_SIZE = 50304


# The architectures of gptctl's GPT (engine/model.py says what each is made of).
ARCHS = ("gpt2", "modern")
ROPE_THETA = 10000.0  # modern: the rotary base (Llama's, Qwen3's default is larger for long contexts)
RMS_NORM_EPS = 1e-6  # modern: Qwen3's default, so that an export computes the same norms
LOSS_CHUNK_ROWS = 2048  # rows (tokens) of logits alive at once: 2048 × 50304 fp32 = 412 MB
# --activation-checkpointing: recompute no block, every other one (0, 2, …), or all of them in backward
CHECKPOINTING_MODES = ("none", "selective", "full")


@dataclass(frozen=True)
class ModelShape:
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int = 1024
    vocab_size: int = PADDED_VOCAB_SIZE
    arch: str = "gpt2"

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        """Width of the MLP's hidden layer. gpt2: 4d. modern: SwiGLU has three matrices instead of two, so
        its width is 2/3 of that (8d/3, rounded up to a multiple of 64 for the matmuls): the same parameters."""
        if self.arch == "gpt2":
            return 4 * self.n_embd
        return -(-8 * self.n_embd // 3 // 64) * 64

    @property
    def tied_head(self) -> bool:
        """gpt2 ties lm_head to the token embedding; modern gives each its own weights (and learning rate)."""
        return self.arch == "gpt2"

    def block_matrices(self) -> list[tuple[int, int]]:
        """(rows, cols) of one block's weight matrices: what --optimizer muon gives to Muon."""
        d, h = self.n_embd, self.mlp_hidden
        if self.arch == "gpt2":
            return [(3 * d, d), (d, d), (h, d), (d, h)]  # c_attn, attn.c_proj, c_fc, mlp.c_proj
        return [(d, d)] * 4 + [(h, d), (h, d), (d, h)]  # q, k, v, o_proj; gate, up, down_proj

    def num_params(self, include_embeddings: bool = True) -> int:
        """Exact parameter count of gptctl's GPT of this architecture."""
        d, L, h = self.n_embd, self.n_layer, self.mlp_hidden
        if self.arch == "gpt2":
            per_block = (
                2 * 2 * d  # ln_1, ln_2 weight + bias
                + d * 3 * d + 3 * d  # attn.c_attn
                + d * d + d  # attn.c_proj
                + d * h + h  # mlp.c_fc
                + h * d + d  # mlp.c_proj
            )
            total = L * per_block + 2 * d  # + ln_f
            embeddings = self.vocab_size * d + self.block_size * d  # wte (= lm_head), wpe
        else:
            per_block = (
                2 * d  # ln_1, ln_2 gains
                + 2 * self.head_dim  # q_norm, k_norm gains
                + 4 * d * d  # q_proj, k_proj, v_proj, o_proj
                + 3 * d * h  # gate_proj, up_proj, down_proj
            )
            total = L * per_block + d  # + ln_f
            embeddings = 2 * self.vocab_size * d  # wte and lm_head; RoPE has no parameters
        return total + (embeddings if include_embeddings else 0)

    def model_settings(self) -> dict:
        """The shape as the settings that rebuild it (a finetune's or --init-from's, taken from its parent)."""
        return {"arch": self.arch, "n_layer": self.n_layer, "n_head": self.n_head, "n_embd": self.n_embd,
                "block_size": self.block_size}


PRESETS: dict[str, ModelShape] = {
    "tiny": ModelShape(n_layer=2, n_head=2, n_embd=64),
    "small": ModelShape(n_layer=6, n_head=6, n_embd=192),  # ~10M params (mostly embeddings)
    "gpt2": ModelShape(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": ModelShape(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": ModelShape(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": ModelShape(n_layer=48, n_head=25, n_embd=1600),
}


# Named recipes: settings a run starts from before the user's own (explicit options override them).
# classic is GPT-2's (gptctl's defaults). speedrun is modded-nanogpt's and nanochat's way to GPT-2's
# quality in a fraction of the tokens: the modern architecture, Muon on the block matrices, a
# warmup-stable-decay schedule, and AdamW learning rates of its own for the embedding, the head and the
# gains. The LRs were tuned with benchmarks/recipes.py (benchmarks/README.md has the sweep).
RECIPES: dict[str, dict] = {
    "classic": {},
    "speedrun": {
        "arch": "modern", "optimizer": "muon", "lr_scheduler": "wsd", "decay_fraction": 0.4,
        "muon_lr": 0.02, "max_lr": 0.008, "embedding_lr": 0.3, "head_lr": 0.008, "scalar_lr": 0.02,
        "weight_decay": 0.0,
    },
}
