"""Hugging Face interop: export gptctl models as transformers directories, import their weights.

--arch gpt2 is HF's GPT2LMHeadModel: gptctl's parameter names are HF's, with two differences: HF's
Conv1D stores c_attn, c_proj and c_fc weights transposed relative to nn.Linear, and gptctl pads the
vocabulary from 50257 to 50304 rows. --arch modern is HF's Qwen3ForCausalLM (RMSNorm, RoPE, QK-norm,
SwiGLU, no biases, untied head): the leaves have Qwen3's names and the containers GPT-2's, so
QWEN3_NAMES renames one into the other; the vocabulary is padded the same way.
transformers itself is never imported: the files are plain JSON and safetensors.
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from gptctl.data.tokenizer import EOT_TOKEN
from gptctl.checkpoints import files as ckpt
from gptctl.engine.model import GPT, GPTConfig
from gptctl.errors import UserError
from gptctl.presets import GPT2_VOCAB_SIZE, PADDED_VOCAB_SIZE, PRESETS, RMS_NORM_EPS, ROPE_THETA, ModelShape
from gptctl.settings import TrainSettings

CONV1D_WEIGHTS = (".attn.c_attn.weight", ".attn.c_proj.weight", ".mlp.c_fc.weight", ".mlp.c_proj.weight")
HF_BUFFERS = (".attn.bias", ".attn.masked_bias")  # causal-mask buffers older transformers saved; not weights
SETTINGS_FILE = "gptctl.json"
TIED = "lm_head.weight"  # gptctl and HF both tie it to transformer.wte.weight
EOT_TEXT = "<|endoftext|>"
# gptctl's modern names -> Qwen3's, applied in order (and the other way round on import).
QWEN3_NAMES = (("transformer.wte.", "model.embed_tokens."), ("transformer.h.", "model.layers."),
               (".attn.", ".self_attn."), (".ln_1.", ".input_layernorm."), (".ln_2.", ".post_attention_layernorm."),
               ("transformer.ln_f.", "model.norm."))
VOCAB_ROWS = ("transformer.wte.weight", "lm_head.weight")  # padded to 50304 rows in gptctl
QWEN3_HEAD_DIM = 128  # what transformers' Qwen3Config takes when config.json has no head_dim


def require_safetensors(option: str):
    try:
        import safetensors.torch
    except ImportError:
        raise UserError(f"{option}: needs the safetensors package; pip install safetensors") from None
    return safetensors.torch


# --- gptctl -> Hugging Face


def _renamed(name: str, pairs) -> str:
    for old, new in pairs:
        name = name.replace(old, new)
    return name


def hf_state_dict(state: dict[str, torch.Tensor], arch: str = "gpt2") -> dict[str, torch.Tensor]:
    """gptctl's state dict under HF's names and layouts (GPT2LMHeadModel or Qwen3ForCausalLM), on the
    real 50257-token vocabulary."""
    out = {}
    for name, tensor in state.items():
        if name == TIED and arch == "gpt2":
            continue  # HF re-ties lm_head to wte from tie_word_embeddings; safetensors refuses shared tensors
        if name in VOCAB_ROWS:
            tensor = tensor[:GPT2_VOCAB_SIZE]  # the padded rows are no tokens
        if arch == "gpt2" and name.endswith(CONV1D_WEIGHTS):
            tensor = tensor.t()
        out[_renamed(name, QWEN3_NAMES) if arch == "modern" else name] = tensor.detach().contiguous()
    return out


def hf_config(config: GPTConfig, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for the transformers architecture that computes exactly gptctl's model."""
    return (_qwen3_config if config.arch == "modern" else _gpt2_config)(config, dtype)


def _qwen3_config(config: GPTConfig, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "model_type": "qwen3",
        "vocab_size": GPT2_VOCAB_SIZE,
        "hidden_size": config.n_embd,
        "intermediate_size": config.mlp_hidden,
        "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_head,  # full multi-head attention
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": config.block_size,
        "rms_norm_eps": RMS_NORM_EPS,
        # transformers 5 reads rope_parameters, earlier versions rope_theta
        "rope_parameters": {"rope_type": "default", "rope_theta": ROPE_THETA},
        "rope_theta": ROPE_THETA,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.n_layer,
        "initializer_range": 0.02,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "tie_word_embeddings": False,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _gpt2_config(config: GPTConfig, dtype: torch.dtype) -> dict[str, Any]:
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": GPT2_VOCAB_SIZE,
        "n_positions": config.block_size,
        "n_embd": config.n_embd,
        "n_layer": config.n_layer,
        "n_head": config.n_head,
        "n_inner": None,  # 4 * n_embd, as gptctl's MLP
        "activation_function": "gelu_new",  # GELU with the tanh approximation, as gptctl's MLP
        "layer_norm_epsilon": 1e-5,  # nn.LayerNorm's default, which gptctl uses
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        # gptctl trains without dropout; HF applies these only in train mode
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "initializer_range": 0.02,
        "bos_token_id": EOT_TOKEN,
        "eos_token_id": EOT_TOKEN,
        "tie_word_embeddings": True,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
    }


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (encoder.py): how vocab.json and merges.txt spell bytes."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            table[byte] = chr(byte)
        else:
            table[byte] = chr(256 + extra)
            extra += 1
    return table


def _split_at_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> list[bytes]:
    """Byte-pair merge `token` using only merges ranked below its own: what is left is the pair that made it."""
    parts = [bytes([b]) for b in token]
    while len(parts) > 1:
        pairs = [(ranks.get(a + b, rank), i) for i, (a, b) in enumerate(zip(parts, parts[1:]))]
        best, i = min(pairs)
        if best >= rank:
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
    return parts


def tokenizer_files(enc, block_size: int) -> dict[str, str]:
    """GPT-2's vocab.json and merges.txt, recovered exactly from tiktoken's r50k_base (same BPE, same ids).

    Token ids are merge ranks: ids 0-255 are single bytes and id 256 + i is made by merge i, so each
    merge is found by merging the token's bytes with the lower-ranked merges until two parts remain.
    """
    char = _bytes_to_unicode()
    spell = lambda token: "".join(char[b] for b in token)  # noqa: E731
    ranks = {enc.decode_single_token_bytes(i): i for i in range(EOT_TOKEN)}
    merges = ["#version: 0.2"]
    for token, rank in ranks.items():
        if rank < 256:
            continue
        pair = _split_at_merge(token, rank, ranks)
        if len(pair) != 2:
            raise RuntimeError(f"token {rank} of {enc.name} is not one merge of two lower-ranked tokens")
        merges.append(" ".join(spell(part) for part in pair))
    vocab = {spell(token): rank for token, rank in ranks.items()} | {EOT_TEXT: EOT_TOKEN}
    special = {"bos_token": EOT_TEXT, "eos_token": EOT_TEXT, "unk_token": EOT_TEXT}
    tokenizer_config = {"tokenizer_class": "GPT2Tokenizer", "model_max_length": block_size,
                        "add_prefix_space": False, "add_bos_token": False, **special}
    return {
        "vocab.json": json.dumps(vocab, ensure_ascii=False),
        "merges.txt": "\n".join(merges) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2) + "\n",
        "special_tokens_map.json": json.dumps(special, indent=2) + "\n",
    }


def _write_hf(directory: Path, model: GPT, enc, info: dict[str, Any]) -> None:
    state = hf_state_dict(model.state_dict(), model.config.arch)
    dtype = model.lm_head.weight.dtype
    require_safetensors("--format").save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(hf_config(model.config, dtype), indent=2) + "\n")
    for name, text in tokenizer_files(enc, model.config.block_size).items():
        (directory / name).write_text(text, encoding="utf-8")


def _write_safetensors(directory: Path, model: GPT, enc, info: dict[str, Any]) -> None:
    # save_model stores the tied lm_head/wte pair once; safetensors.torch.load_model restores both
    require_safetensors("--format").save_model(model, str(directory / "model.safetensors"), metadata={"format": "pt"})
    described = {**vars(model.config), **info}  # GPTConfig(**{its fields}) rebuilds the model
    (directory / SETTINGS_FILE).write_text(json.dumps(described, indent=2) + "\n")


WRITERS = {"hf": _write_hf, "safetensors": _write_safetensors}


def export(model: GPT, enc, fmt: str, out: Path, info: dict[str, Any]) -> list[str]:
    """Write the export into a temporary sibling of `out`, then rename it into place; returns the file names.

    An existing `out` (checked by the caller: empty, or --force) is replaced only once the new one is complete.
    """
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=out.parent))
    try:
        WRITERS[fmt](tmp, model, enc, info)
        names = sorted(p.name for p in tmp.iterdir())
        _default_permissions(tmp)
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return names


def _default_permissions(directory: Path) -> None:
    """mkdtemp makes the directory private and safetensors its file; an export is for sharing, like any new file."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _replace_dir(new: Path, out: Path) -> None:
    if not out.exists():
        os.rename(new, out)
        return
    old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
    os.rename(out, old)
    try:
        os.rename(new, out)
    except BaseException:
        os.rename(old, out)
        raise
    shutil.rmtree(old)


# --- Hugging Face -> gptctl


def locate(dir_or_name: str, option: str) -> Path:
    """A local directory, else a model name in the local Hugging Face cache (never the network)."""
    path = Path(dir_or_name).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(dir_or_name, local_files_only=True))
    except Exception as exc:  # not cached (LocalEntryNotFoundError), or not a valid repo id (ValueError)
        raise UserError(
            f"{option}: {dir_or_name!r} is neither a directory nor a model in the local Hugging Face cache "
            f"({type(exc).__name__}); download it first (`hf download {dir_or_name}`) or give a directory "
            "holding config.json and model.safetensors") from None


def _check_config(config: dict[str, Any], where: Path, option: str) -> ModelShape:
    """The model's shape, if the config describes exactly one of gptctl's architectures; else a UserError
    saying what differs."""
    if config.get("model_type") == "qwen3":
        return _check_qwen3(config, where, option)
    n_embd, n_head = config.get("n_embd"), config.get("n_head")
    expected = {
        "model_type": ("gpt2",),
        "vocab_size": (GPT2_VOCAB_SIZE,),  # token ids must mean what tiktoken's GPT-2 BPE means
        "activation_function": ("gelu_new", "gelu_pytorch_tanh"),
        "n_inner": (None, 4 * n_embd if isinstance(n_embd, int) else None),
        "scale_attn_weights": (True,),
        "scale_attn_by_inverse_layer_idx": (False,),
        "add_cross_attention": (False,),
    }
    defaults = {"n_inner": None, "scale_attn_weights": True, "scale_attn_by_inverse_layer_idx": False,
                "add_cross_attention": False, "activation_function": "gelu_new"}
    for key, allowed in expected.items():
        value = config.get(key, defaults.get(key))
        if value not in allowed:
            raise UserError(f"{option}: {where}/config.json has {key}={value!r}; gptctl's GPT-2 needs "
                            + " or ".join(repr(a) for a in allowed) + (" (or model_type 'qwen3': --arch modern)"
                                                                       if key == "model_type" else ""))
    if abs(config.get("layer_norm_epsilon", 1e-5) - 1e-5) > 1e-12:
        raise UserError(f"{option}: {where}/config.json has layer_norm_epsilon={config['layer_norm_epsilon']}; "
                        "gptctl's GPT-2 needs 1e-05")
    try:
        shape = ModelShape(n_layer=int(config["n_layer"]), n_head=int(n_head), n_embd=int(n_embd),
                           block_size=int(config["n_positions"]))
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{option}: {where}/config.json lacks n_layer, n_head, n_embd or n_positions") from None
    if min(shape.n_layer, shape.n_head, shape.n_embd, shape.block_size) <= 0 or shape.n_embd % shape.n_head:
        raise UserError(f"{option}: {where}/config.json has an impossible shape {shape}")
    return shape


def _check_qwen3(config: dict[str, Any], where: Path, option: str) -> ModelShape:
    """--arch modern's shape from a Qwen3 config.json that describes exactly it."""
    try:
        shape = ModelShape(n_layer=int(config["num_hidden_layers"]), n_head=int(config["num_attention_heads"]),
                           n_embd=int(config["hidden_size"]), block_size=int(config["max_position_embeddings"]),
                           arch="modern")
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{option}: {where}/config.json lacks num_hidden_layers, num_attention_heads, hidden_size "
                        "or max_position_embeddings") from None
    if min(shape.n_layer, shape.n_head, shape.n_embd, shape.block_size) <= 0 or shape.n_embd % shape.n_head:
        raise UserError(f"{option}: {where}/config.json has an impossible shape {shape}")
    if "head_dim" not in config and shape.head_dim != QWEN3_HEAD_DIM:
        raise UserError(f"{option}: {where}/config.json has no head_dim, which transformers' Qwen3Config reads as "
                        f"{QWEN3_HEAD_DIM}; gptctl's --arch modern needs {shape.head_dim} (hidden_size / "
                        "num_attention_heads): add \"head_dim\": " + str(shape.head_dim) + " if that is the model's")
    # As transformers reads them: rope_scaling (transformers 4's name) replaces rope_parameters when set, and
    # a RoPE type other than "default" (linear, dynamic, yarn, llama3, ...) computes other frequencies.
    rope_field = "rope_scaling" if config.get("rope_scaling") else "rope_parameters"
    rope = config.get(rope_field) or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise UserError(f"{option}: {where}/config.json has {rope_field}={rope!r}; gptctl's --arch modern computes "
                        "plain RoPE (rope_type 'default', no scaling)")
    expected = {
        "vocab_size": (config.get("vocab_size"), GPT2_VOCAB_SIZE),  # token ids must mean what GPT-2's BPE means
        "intermediate_size": (config.get("intermediate_size"), shape.mlp_hidden),
        "num_key_value_heads": (config.get("num_key_value_heads", shape.n_head), shape.n_head),
        "head_dim": (config.get("head_dim", QWEN3_HEAD_DIM), shape.head_dim),
        "hidden_act": (config.get("hidden_act", "silu"), "silu"),
        "rope_theta": (rope.get("rope_theta", config.get("rope_theta", ROPE_THETA)), ROPE_THETA),
        "rms_norm_eps": (config.get("rms_norm_eps", RMS_NORM_EPS), RMS_NORM_EPS),
        "attention_bias": (config.get("attention_bias", False), False),
        "use_sliding_window": (config.get("use_sliding_window", False), False),
        "tie_word_embeddings": (config.get("tie_word_embeddings", False), False),
    }
    for key, (value, needed) in expected.items():
        if value != needed:
            raise UserError(f"{option}: {where}/config.json has {key}={value!r}; gptctl's --arch modern needs {needed!r}")
    return shape


def _read_weights(directory: Path, option: str) -> dict[str, torch.Tensor]:
    """model.safetensors (or its shards), else pytorch_model.bin loaded as plain data only."""
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file() or index.is_file():
        files = (sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file()
                 else ["model.safetensors"])
        load_file = require_safetensors(option).load_file
        try:
            return {k: v for name in files for k, v in load_file(directory / name).items()}
        except Exception as exc:  # safetensors raises its own SafetensorError for damaged files
            raise UserError(f"{option}: {directory} has unreadable safetensors weights: {exc}") from None
    if (directory / "pytorch_model.bin").is_file():
        try:
            return ckpt.load(directory / "pytorch_model.bin")
        except ckpt.UnsafeCheckpoint as exc:
            raise UserError(f"{option}: {exc}") from None
    raise UserError(f"{option}: {directory} has no model.safetensors or pytorch_model.bin")


def _model_settings(shape: ModelShape) -> dict[str, Any]:
    """What preflight.parent_model returns for a gptctl checkpoint: a preset name and the explicit shape."""
    same = (shape.n_layer, shape.n_head, shape.n_embd)
    preset = next((name for name, p in PRESETS.items() if (p.n_layer, p.n_head, p.n_embd) == same), "gpt2")
    return {"model": preset, **shape.model_settings()}


def load_hf(dir_or_name: str, option: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(state dict for gptctl's GPT with the vocabulary padded to 50304, model settings) of an HF GPT-2 or
    of a Qwen3 of --arch modern's shape.

    `dir_or_name` is a directory (config.json + weights) or a model name in the local HF cache;
    `option` names the command-line option in error messages.
    """
    directory = locate(dir_or_name, option)
    try:
        config = json.loads((directory / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{option}: {directory}/config.json is missing or not JSON ({exc})") from None
    shape = _check_config(config, directory, option)
    weights = _read_weights(directory, option)
    gpt2 = shape.arch == "gpt2"

    state, lm_head = {}, None
    for name, tensor in weights.items():
        if not gpt2:
            state[_renamed(name, [(new, old) for old, new in reversed(QWEN3_NAMES)])] = tensor.float().contiguous()
            continue
        name = name.removeprefix("transformer.")  # HF hub files often lack the prefix; save_pretrained adds it
        if name.endswith(HF_BUFFERS):
            continue
        if name == TIED:
            lm_head = tensor
            continue
        state["transformer." + name] = (tensor.t() if name.endswith(CONV1D_WEIGHTS) else tensor).float().contiguous()
    with torch.device("meta"):
        expected = GPT(shape).state_dict()
    if gpt2:
        expected.pop(TIED)
        wte = state.get("transformer.wte.weight")
        if wte is not None and wte.shape[0] == GPT2_VOCAB_SIZE and lm_head is not None and not torch.equal(lm_head.float(), wte):
            raise UserError(f"{option}: {directory} has an lm_head that is not tied to wte; gptctl's GPT ties them")
    for name in VOCAB_ROWS:
        rows = state.get(name)
        if rows is not None and rows.shape[0] == GPT2_VOCAB_SIZE:
            # The padded rows are no tokens but do get logits: the mean row makes each padded logit the mean
            # of the real ones (embedding: the mean input), so (Jensen) they hold at most 47/50257 of the mass.
            padding = rows.mean(dim=0, keepdim=True).expand(PADDED_VOCAB_SIZE - GPT2_VOCAB_SIZE, -1)
            state[name] = torch.cat([rows, padding])
    wrong = sorted(set(expected) ^ set(state))
    wrong += [n for n in sorted(set(expected) & set(state)) if expected[n].shape != state[n].shape]
    if wrong:
        raise UserError(f"{option}: {directory} does not hold the {'GPT-2' if gpt2 else 'Qwen3'} its config.json "
                        f"describes (missing, unexpected or misshapen: {', '.join(wrong[:4])}"
                        f"{', ...' if len(wrong) > 4 else ''})")
    if gpt2:
        state[TIED] = state["transformer.wte.weight"]  # the same tensor, as in gptctl's own checkpoints
    return state, _model_settings(shape)


def write_checkpoint(dir_or_name: str, path: Path, option: str) -> dict[str, Any]:
    """Convert an HF GPT-2 (or Qwen3 of --arch modern's shape) into a gptctl checkpoint file at `path` (step 0); returns its model settings."""
    state, model = load_hf(dir_or_name, option)
    path.parent.mkdir(parents=True, exist_ok=True)  # only now: weights that are refused leave nothing behind
    # The stored settings only describe the model: a run that starts from it brings its own batch settings.
    settings = TrainSettings(**model, seq_len=model["block_size"], total_batch_size=None)
    ckpt.save_atomic({"model": state, "settings": settings.model_dump(mode="json"), "step": 0,
                      "source": f"hf:{dir_or_name}"}, path)
    return model
