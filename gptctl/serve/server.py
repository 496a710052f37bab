"""Run the application under uvicorn on a socket bound here (so that port 0 gives a free port whose URL
can be said), and stop promptly and cleanly on SIGINT or SIGTERM: the batcher stops first, failing the
jobs in flight (503: the server is shutting down), so the requests end at once; uvicorn waits for them
to go out (up to GRACE seconds), then the signal reaches the caller as an exception (Stopped, or
KeyboardInterrupt), so that what it holds (the checkpoint's lease) is released on the way out."""

import asyncio
import ipaddress
import signal
import socket
import time
from pathlib import Path

from gptctl.engine.startup import signals_noted
from gptctl.errors import UserError

GRACE = 1  # seconds uvicorn waits at shutdown for the requests' last bytes (their jobs have failed by then)


class Stopped(Exception):
    """SIGTERM, raised where the program runs."""


def stop_on_sigterm() -> None:
    def stop(signum, frame):
        raise Stopped()
    signal.signal(signal.SIGTERM, stop)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def bind(host: str, port: int) -> socket.socket:
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.create_server((host, port), family=family, backlog=128)
    except OSError as exc:
        raise UserError(f"--host/--port: cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    sock.set_inheritable(True)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def model_info(sampler, path: Path, ref: str, home: Path):
    """The model's name: RUN:STEP for a checkpoint of the registry (the run's id, its name and the reference
    as typed are aliases), else the file's name."""
    from gptctl.registry import open_registry, queries
    from gptctl.serve.protocol import ModelInfo

    db = open_registry(home, create=False)
    rows = list(db.query("select r.id, r.name from checkpoints c join runs r on r.id = c.run_id where c.path = ?",
                         [queries.stored_path(db, path)]))
    step = sampler.step
    if rows:
        run_id, name = rows[0]["id"], rows[0]["name"] or rows[0]["id"]
        model_id, aliases = f"{name}:{step}", {ref, name, run_id, f"{run_id}:{step}"}
    else:
        model_id, aliases = path.name, {ref, str(path)}
    return ModelInfo(model_id, sampler.model.config.block_size, step, sampler.settings.kind, int(path.stat().st_mtime),
                     frozenset(aliases - {model_id}))


def serve(sampler, model, sock: socket.socket, api_key: str | None, max_rows: int, max_waiting: int) -> None:
    """Serve until SIGINT (KeyboardInterrupt) or SIGTERM (Stopped; stop_on_sigterm must be in place)."""
    import uvicorn

    from gptctl.engine.batch import Batcher
    from gptctl.serve.app import create_app

    batcher = Batcher(sampler.model, sampler.enc, sampler.device, sampler.dtype, max_rows, max_waiting)
    app = create_app(batcher, model, sampler.enc, api_key)
    config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=GRACE,
                            lifespan="on")

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None):
            # The batcher before uvicorn waits for the open requests: their jobs fail (503) and they end
            # now, rather than generate on (a stream to its max_tokens) until uvicorn cuts them off.
            await asyncio.to_thread(batcher.close)
            await super().shutdown(sockets)
            if self.force_exit:
                # A second Ctrl-C (uvicorn's force quit) skips the application's lifespan end: asyncio would
                # cancel it on the way out, and uvicorn log that with a traceback. The batcher has stopped,
                # so it ends at once.
                await self.lifespan.shutdown()

    # uvicorn catches SIGINT and SIGTERM while it runs, shuts down, then raises the signal again with the
    # handlers it found: KeyboardInterrupt for SIGINT, Stopped for SIGTERM.
    Server(config).run(sockets=[sock])


RENEW_EVERY_S = 3600.0


def keep_leased(home: Path) -> None:
    """Renew this process's checkpoint lease every hour while it serves (days, perhaps), so that another
    host's retention never takes it for a reader that died; a thread of its own with its own connection."""
    import threading

    def renew() -> None:
        from gptctl.registry import open_registry, queries

        while not time.sleep(RENEW_EVERY_S):
            try:
                queries.renew_leases(open_registry(home, create=False, check_home=False))
            except Exception:  # a registry busy or unwritable for a moment: the next hour tries again
                pass

    # A stop signal's exception (KeyboardInterrupt, Stopped) raised in the middle of Thread.start() leaves
    # threading's books half kept, and the exit prints a KeyError traceback: one that arrives meanwhile is
    # only noted, and raised again once the thread runs. (Masking it would not do: the kernel then hands
    # it to another thread, and Python runs the handler in this one all the same.)
    with signals_noted((signal.SIGINT, signal.SIGTERM)) as arrived:
        threading.Thread(target=renew, name="lease-renewal", daemon=True).start()
    for signum in dict.fromkeys(arrived):
        signal.raise_signal(signum)
