"""The GPT-2 BPE tokenizer (tiktoken's r50k_base). tiktoken is imported lazily.

"gpt2" and "r50k_base" are the same byte-pair encoding with the same 50257-token vocabulary; both
names resolve to tiktoken's r50k_base so only one vocabulary file is needed in TIKTOKEN_CACHE_DIR.
"""

from __future__ import annotations

from gptctl.errors import UserError

EOT_TOKEN = 50256
TOKENIZERS = {"gpt2": "r50k_base", "r50k_base": "r50k_base"}


def resolve_name(name: str) -> str:
    """Map a --tokenizer value to the tiktoken encoding name, or raise UserError."""
    try:
        return TOKENIZERS[name]
    except KeyError:
        choices = ", ".join(sorted(TOKENIZERS))
        raise UserError(f"--tokenizer: unknown tokenizer {name!r}; choose one of: {choices}") from None


def get_encoding(name: str = "gpt2"):
    """Return the tiktoken Encoding for `name` ("gpt2" or "r50k_base"); its EOT token is 50256."""
    encoding_name = resolve_name(name)
    import tiktoken

    try:
        enc = tiktoken.get_encoding(encoding_name)
    except Exception as exc:  # usually: no network and no cached vocabulary file
        raise UserError(
            f"--tokenizer: could not load tiktoken encoding {encoding_name!r} ({type(exc).__name__}: {exc}); "
            "set TIKTOKEN_CACHE_DIR to a directory holding the cached vocabulary"
        ) from None
    if enc.eot_token != EOT_TOKEN:
        raise UserError(f"--tokenizer: encoding {encoding_name!r} has EOT {enc.eot_token}, expected {EOT_TOKEN}")
    return enc
