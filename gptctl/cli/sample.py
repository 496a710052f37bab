"""`gptctl sample`: generate text from a checkpoint, streaming it to stdout."""

import json
from typing import Optional

import typer

from gptctl.cli import app
from gptctl.cli.sampling import (CHECKPOINT, DEVICE, MAX_NEW_TOKENS, SEED, STOP, TEMPERATURE, TOP_K, TOP_P,
                                 check_sampling, load_sampler)
from gptctl.errors import UserError

SEPARATOR = "-" * 15  # between streamed samples, as nanoGPT's sample.py prints them


MAX_SAMPLES = 256


def _check(prompt, instruction, context, num_samples) -> None:
    if prompt is not None and instruction is not None:
        raise UserError("--prompt and --instruction exclude each other; give one")
    if prompt is None and instruction is None:
        raise UserError("--prompt: missing; give --prompt TEXT, or --instruction TEXT for a finetuned model")
    if context is not None and instruction is None:
        raise UserError("--context: only goes with --instruction; add --instruction TEXT")
    if not 1 <= num_samples <= MAX_SAMPLES:
        raise UserError(f"--num-samples: must be at least 1 and at most {MAX_SAMPLES} (they decode together: each "
                        f"holds a KV cache and a row of 50,257 logits), got {num_samples}; for more, run again with "
                        "another --seed")


@app.command("sample")
def sample_cmd(
    checkpoint: str = CHECKPOINT,
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text to continue; <|endoftext|> starts a new document."),
    instruction: Optional[str] = typer.Option(None, "--instruction", help="An instruction, wrapped in the finetune template."),
    context: Optional[str] = typer.Option(None, "--context", help="Input that goes with --instruction."),
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    top_k: int = TOP_K,
    top_p: float = TOP_P,
    stop: list[str] = STOP,
    num_samples: int = typer.Option(1, "--num-samples", show_default=False, help="Independent samples. (default: 1)"),
    seed: int = SEED,
    device: str = DEVICE,
    as_json: bool = typer.Option(False, "--json", help="Print a list of {sample, text, tokens} at the end instead of streaming."),
):
    """Generate text from a checkpoint, streaming tokens to stdout as they are generated."""
    stop = tuple(stop or ())
    _check(prompt, instruction, context, num_samples)
    check_sampling(max_new_tokens, temperature, top_k, top_p, stop, seed, device)
    path, sampler = load_sampler(checkpoint, device)
    from gptctl.engine.generate import Sampling

    typer.echo(f"sampling from {path}: {sampler.describe()}", err=True)
    prompt_tokens = sampler.encode(prompt, instruction, context)
    if note := sampler.cropped(prompt_tokens):
        typer.echo(f"note: {note}", err=True)
    sampling = Sampling(temperature, top_k, top_p, stop)
    completions = sampler.samples(prompt_tokens, num_samples, max_new_tokens, sampling, seed)
    if as_json:
        typer.echo(json.dumps([{"sample": i, "text": c.text(), "tokens": len(c.tokens)} for i, c in enumerate(completions)],
                              indent=2))
        return
    for i, completion in enumerate(completions):
        if i:
            typer.echo(SEPARATOR)
        for piece in completion:
            typer.echo(piece, nl=False)
        typer.echo()
