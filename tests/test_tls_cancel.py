"""A connection stopped during its TLS handshake is closed at once, not when the garbage
collector gets to it (httpcore2 leaves it open on cancellation; see net/tls_safe.py)."""

from __future__ import annotations

import gc
from functools import partial
from typing import Any

import pytest
import trio

from server.config import Settings
from server.runtime import build_http_client
from tests.conftest import WAIT


@pytest.mark.parametrize("paced", [False, True], ids=["web client", "model client"])
async def test_a_connection_stopped_during_its_tls_handshake_is_closed(
    nursery: trio.Nursery, paced: bool
) -> None:
    accepted, closed = trio.Event(), trio.Event()

    async def silent_tls_server(stream: trio.SocketStream) -> None:
        """Reads the client's hello and never answers it."""
        accepted.set()
        try:
            while await stream.receive_some(4096):
                pass
        except trio.BrokenResourceError:
            pass
        closed.set()

    listeners: Any = await nursery.start(
        partial(trio.serve_tcp, silent_tls_server, 0, host="127.0.0.1")
    )
    port = listeners[0].socket.getsockname()[1]
    client = build_http_client(Settings(), keepalive=10, pause=(lambda: 0.0) if paced else None)
    # Collected garbage would close a leaked socket too and hide the leak.
    gc.disable()
    try:
        async with client:
            async with trio.open_nursery() as requests:
                requests.start_soon(client.get, f"https://127.0.0.1:{port}/")
                with trio.fail_after(WAIT):
                    await accepted.wait()
                requests.cancel_scope.cancel()  # a stop, mid-handshake
            with trio.fail_after(WAIT):
                await closed.wait()
    finally:
        gc.enable()
