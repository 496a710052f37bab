"""`gptctl chat`: a conversation with a checkpoint in the terminal. This reads lines and prints; the chat itself
is gptctl/chat.py."""

import sys
from typing import Optional

import typer

from gptctl.cli import app
from gptctl.cli.sampling import (CHECKPOINT, DEVICE, MAX_NEW_TOKENS, SEED, STOP, TEMPERATURE, TOP_K, TOP_P,
                                 check_sampling, load_sampler)

PROMPT = "> "  # shown only on a terminal: piped in, stdout holds just the replies


def _dim(text: str) -> None:
    typer.secho(text, dim=True, err=True)  # styles are dropped where stderr is no terminal


@app.command("chat")
def chat_cmd(
    checkpoint: str = CHECKPOINT,
    system: Optional[str] = typer.Option(None, "--system", help="A finetuned model's system prompt, in place of the "
                                                                 "template's header (\"Below is an instruction…\")."),
    max_new_tokens: int = MAX_NEW_TOKENS,
    temperature: float = TEMPERATURE,
    top_k: int = TOP_K,
    top_p: float = TOP_P,
    stop: list[str] = STOP,
    seed: int = SEED,
    device: str = DEVICE,
):
    """Chat with a checkpoint in the terminal, streaming each reply as it is generated."""
    stop = tuple(stop or ())
    check_sampling(max_new_tokens, temperature, top_k, top_p, stop, seed, device)
    path, sampler = load_sampler(checkpoint, device)
    from gptctl.chat import Chat
    from gptctl.engine.generate import Sampling

    chat = Chat(sampler, max_new_tokens, Sampling(temperature, top_k, top_p, stop), seed, system)
    typer.echo(f"chatting with {path}: {sampler.describe()}", err=True)
    _dim(chat.intro())
    try:
        _converse(chat, interactive=sys.stdin.isatty())
    except KeyboardInterrupt:  # Ctrl-C at the prompt (or anywhere outside a reply) leaves
        typer.echo()
        raise typer.Exit(130)


def _converse(chat, interactive: bool) -> None:
    """Read a line, do what it asks, until /exit or the end of the input."""
    if interactive:
        try:
            import readline  # noqa: F401  line editing and history for input()
        except ImportError:
            pass
    while True:
        try:
            line = input(PROMPT if interactive else "")
        except EOFError:  # Ctrl-D, or the end of piped input
            if interactive:
                typer.echo()
            return
        action = chat.handle(line)
        if action is None:
            return
        if isinstance(action, str):
            if action:
                _dim(action)
            continue
        stopped = False
        try:
            if action.notice:
                _dim(action.notice)
            for piece in action:
                typer.echo(piece, nl=False)
        except KeyboardInterrupt:  # Ctrl-C during a reply ends the reply, not the chat
            stopped = True
        finally:
            action.finish()  # what was said so far is the reply
        typer.echo()
        if stopped:
            _dim("(reply stopped)")
