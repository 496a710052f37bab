"""`gptctl sample`: generate text from a checkpoint, streaming it to stdout."""

import json
import math
from typing import Optional

import typer

from gptctl.cli import app
from gptctl.errors import UserError
from gptctl.paths import home_dir
from gptctl.refs import checkpoint_for_reading
from gptctl.settings import DEVICES, SEED_MAX

SEPARATOR = "-" * 15  # between streamed samples, as nanoGPT's sample.py prints them


def _check(prompt, instruction, context, max_new_tokens, temperature, top_k, top_p, stop, num_samples, seed,
           device) -> None:
    if prompt is not None and instruction is not None:
        raise UserError("--prompt and --instruction exclude each other; give one")
    if prompt is None and instruction is None:
        raise UserError("--prompt: missing; give --prompt TEXT, or --instruction TEXT for a finetuned model")
    if context is not None and instruction is None:
        raise UserError("--context: only goes with --instruction; add --instruction TEXT")
    if max_new_tokens < 1:
        raise UserError(f"--max-new-tokens: must be at least 1, got {max_new_tokens}")
    if not 0 <= temperature < math.inf:
        raise UserError(f"--temperature: must be 0 (greedy) or more, and finite; got {temperature}")
    if top_k < 1:
        raise UserError(f"--top-k: must be at least 1, got {top_k}")
    if not 0 < top_p <= 1:
        raise UserError(f"--top-p: must be more than 0 and at most 1 (1 = off), got {top_p}")
    if "" in stop:
        raise UserError("--stop: must not be empty; give the text that ends a sample")
    if num_samples < 1:
        raise UserError(f"--num-samples: must be at least 1, got {num_samples}")
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed: must be between 0 and {SEED_MAX} (2**32-1), got {seed}")
    if device not in DEVICES:
        raise UserError(f"--device: unknown device {device!r}; choose one of {', '.join(DEVICES)}")


@app.command("sample")
def sample_cmd(
    checkpoint: str = typer.Argument(..., metavar="RUN[:STEP]|PATH",
                                     help="A run (its newest valid checkpoint), RUN:STEP, or a checkpoint file."),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="Text to continue; <|endoftext|> starts a new document."),
    instruction: Optional[str] = typer.Option(None, "--instruction", help="An instruction, wrapped in the finetune template."),
    context: Optional[str] = typer.Option(None, "--context", help="Input that goes with --instruction."),
    max_new_tokens: int = typer.Option(200, "--max-new-tokens", show_default=False, help="Tokens to generate at most; end-of-text stops earlier. (default: 200)"),
    temperature: float = typer.Option(0.8, "--temperature", show_default=False, help="Sampling temperature; 0 = greedy. (default: 0.8)"),
    top_k: int = typer.Option(200, "--top-k", show_default=False, help="Sample only among the k likeliest tokens. (default: 200)"),
    top_p: float = typer.Option(1.0, "--top-p", show_default=False, help="Sample only among the likeliest tokens that together hold this probability (nucleus); 1 = off. (default: 1)"),
    stop: list[str] = typer.Option(None, "--stop", metavar="<str>", show_default=False, help="End a sample before this text; repeat for several (the first found ends it)."),
    num_samples: int = typer.Option(1, "--num-samples", show_default=False, help="Independent samples. (default: 1)"),
    seed: int = typer.Option(1337, "--seed", show_default=False, help="Random seed; the same seed gives the same text. (default: 1337)"),
    device: str = typer.Option("auto", "--device", show_default=False, help="auto, cuda, cpu or mps. (default: auto)"),
    as_json: bool = typer.Option(False, "--json", help="Print a list of {sample, text, tokens} at the end instead of streaming."),
):
    """Generate text from a checkpoint, streaming tokens to stdout as they are generated."""
    stop = tuple(stop or ())
    _check(prompt, instruction, context, max_new_tokens, temperature, top_k, top_p, stop, num_samples, seed, device)
    with checkpoint_for_reading(checkpoint, "RUN[:STEP]|PATH", home_dir()) as path:  # retention spares it while it loads
        from gptctl.engine.generate import Sampling
        from gptctl.engine.sample import Sampler  # torch: only once the command line is known to be good

        sampler = Sampler(path, device, option="RUN[:STEP]|PATH")
    typer.echo(f"sampling from {path}: {sampler.describe()}", err=True)
    prompt_tokens = sampler.encode(prompt, instruction, context)
    block_size = sampler.model.config.block_size
    if len(prompt_tokens) > block_size:
        typer.echo(f"note: the prompt has {len(prompt_tokens)} tokens; the model sees only the last {block_size}", err=True)
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
