"""What `gptctl sample` and `gptctl chat` share: the checkpoint argument, the sampling options, their checks
and the loading of the checkpoint (one definition of each, so the two commands cannot drift apart)."""

import math

import typer

from gptctl.errors import UserError
from gptctl.paths import home_dir
from gptctl.refs import checkpoint_for_reading
from gptctl.settings import DEVICES, SEED_MAX

CHECKPOINT_METAVAR = "RUN[:STEP]|PATH"
CHECKPOINT = typer.Argument(..., metavar=CHECKPOINT_METAVAR,
                            help="A run (its newest valid checkpoint), RUN:STEP, or a checkpoint file.")
MAX_NEW_TOKENS = typer.Option(200, "--max-new-tokens", show_default=False, help="Tokens to generate at most; end-of-text stops earlier. (default: 200)")
TEMPERATURE = typer.Option(0.8, "--temperature", show_default=False, help="Sampling temperature; 0 = greedy. (default: 0.8)")
TOP_K = typer.Option(200, "--top-k", show_default=False, help="Sample only among the k likeliest tokens. (default: 200)")
TOP_P = typer.Option(1.0, "--top-p", show_default=False, help="Sample only among the likeliest tokens that together hold this probability (nucleus); 1 = off. (default: 1)")
STOP = typer.Option(None, "--stop", metavar="<str>", show_default=False, help="End a sample before this text; repeat for several (the first found ends it).")
SEED = typer.Option(1337, "--seed", show_default=False, help="Random seed; the same seed gives the same text. (default: 1337)")
DEVICE = typer.Option("auto", "--device", show_default=False, help="auto, cuda, cpu or mps. (default: auto)")


def check_sampling(max_new_tokens: int, temperature: float, top_k: int, top_p: float, stop: tuple[str, ...], seed: int,
                   device: str) -> None:
    """Refuse a bad sampling option in one line that names it and the fix."""
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
    if not 0 <= seed <= SEED_MAX:
        raise UserError(f"--seed: must be between 0 and {SEED_MAX} (2**32-1), got {seed}")
    if device not in DEVICES:
        raise UserError(f"--device: unknown device {device!r}; choose one of {', '.join(DEVICES)}")


def load_sampler(checkpoint: str, device: str):
    """(the checkpoint file, a Sampler of it): the file is leased while it loads, so retention spares it."""
    with checkpoint_for_reading(checkpoint, CHECKPOINT_METAVAR, home_dir()) as path:
        from gptctl.engine.sample import Sampler  # torch: only once the command line is known to be good

        return path, Sampler(path, device, option=CHECKPOINT_METAVAR)

