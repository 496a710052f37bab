"""`gptctl serve`: an OpenAI-compatible HTTP API and a chat page over a checkpoint (gptctl/serve/)."""

import importlib.util
from typing import Optional

import typer

from gptctl.cli import app
from gptctl.errors import UserError
from gptctl.paths import home_dir
from gptctl.refs import checkpoint_for_reading
from gptctl.settings import DEVICES

METAVAR = "RUN[:STEP]|PATH"


def _check(host: str, port: int, api_key: str | None, device: str, max_batch: int, max_queue: int) -> None:
    from gptctl.serve.server import is_loopback

    if not 0 <= port <= 65535:
        raise UserError(f"--port: must be between 0 (any free port) and 65535, got {port}")
    if api_key is not None and not api_key.strip():
        raise UserError("--api-key: must not be empty")
    if api_key is None and not is_loopback(host):
        raise UserError(f"--api-key: required to listen on {host} (reachable from other machines); "
                        "give --api-key KEY, or keep the default --host 127.0.0.1")
    if device not in DEVICES:
        raise UserError(f"--device: unknown device {device!r}; choose one of {', '.join(DEVICES)}")
    if max_batch < 1:
        raise UserError(f"--max-batch: must be at least 1, got {max_batch}")
    if max_queue < 1:
        raise UserError(f"--max-queue: must be at least 1, got {max_queue}")
    missing = [m for m in ("fastapi", "uvicorn") if importlib.util.find_spec(m) is None]
    if missing:
        raise UserError(f"gptctl serve needs {' and '.join(missing)}: pip install 'gptctl[serve]'")


@app.command("serve")
def serve_cmd(
    checkpoint: str = typer.Argument(..., metavar=METAVAR,
                                     help="A run (its newest valid checkpoint), RUN:STEP, or a checkpoint file."),
    host: str = typer.Option("127.0.0.1", "--host", show_default=False, help="Address to listen on; anything but localhost needs --api-key. (default: 127.0.0.1)"),
    port: int = typer.Option(8000, "--port", show_default=False, help="Port; 0 picks a free one. (default: 8000)"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="GPTCTL_API_KEY", show_default=False, help="Require Authorization: Bearer KEY on every /v1 route (also $GPTCTL_API_KEY)."),
    device: str = typer.Option("auto", "--device", show_default=False, help="auto, cuda, cpu or mps. (default: auto)"),
    max_batch: int = typer.Option(8, "--max-batch", show_default=False, help="Samples decoded together at most; more wait in the queue. (default: 8)"),
    max_queue: int = typer.Option(32, "--max-queue", show_default=False, help="Prompts that may wait; past that a request gets 503. (default: 32)"),
):
    """Serve a checkpoint over an OpenAI-compatible HTTP API, with a chat page."""
    _check(host, port, api_key, device, max_batch, max_queue)
    from gptctl.serve.server import Stopped, bind, keep_leased, model_info, serve, stop_on_sigterm, url_of

    stop_on_sigterm()
    try:
        with checkpoint_for_reading(checkpoint, METAVAR, home_dir()) as path:  # leased until the server stops
            sock = bind(host, port)
            from gptctl.engine.sample import Sampler  # torch: only once the command line is known to be good

            sampler = Sampler(path, device, option=METAVAR)
            model = model_info(sampler, path, checkpoint, home_dir())
            url = url_of(sock)
            typer.echo(f"serving {model.id}: {sampler.describe()}, from {path}")
            typer.echo(f"  API:  {url}/v1  (model {model.id!r}{', Authorization: Bearer KEY' if api_key else ''})")
            typer.echo(f"  chat: {url}/")
            typer.echo("Ctrl-C stops.")
            keep_leased(home_dir())
            serve(sampler, model, sock, api_key, max_batch, max_queue)
        how = "stopped"  # by a signal its parent ignores, as in a background job of a script
    except KeyboardInterrupt:
        how = "stopped (SIGINT)"
    except Stopped:
        how = "stopped (SIGTERM)"
    typer.echo(f"{how}; the checkpoint's lease is released", err=True)
