"""How a baseline server runs: hypercorn's trio worker on a loopback port, announced on
stdout as ``READY <port>`` once it listens (bench/procs.py waits for that line)."""

from __future__ import annotations

from typing import Any, Literal

import trio
from hypercorn.config import Config
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app


async def _serve(app: Any, port: int, mode: Literal["asgi"] | None) -> None:
    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.keep_alive_timeout = 75
    config.backlog = 4096
    sockets = config.create_sockets()
    bound = sockets.insecure_sockets[0].getsockname()[1]
    for sock in sockets.insecure_sockets:
        sock.listen(config.backlog)
    print(f"READY {bound}", flush=True)
    await worker_serve(wrap_app(app, config.wsgi_max_body_size, mode), config, sockets=sockets)


def run(app: Any, port: int, *, mode: Literal["asgi"] | None = None) -> None:
    """Serve ``app`` on ``port`` (0: any free port) until interrupted."""
    try:
        trio.run(_serve, app, port, mode)
    except KeyboardInterrupt:
        pass
