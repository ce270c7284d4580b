"""What the client tests check of a connection to a scripted loopback server
(fakes/scripted.py): that the client closed it, or that nobody was there to connect to."""

from __future__ import annotations

import trio

from fakes.scripted import ScriptedServer


async def wait_client_left(server: ScriptedServer) -> None:
    """The connection that carried the server's only request gets closed by the client."""
    (request,) = server.requests
    with trio.fail_after(5):
        conn = await server.wait_connection_closed(request.conn_id)
    assert conn.closed_by == "client"


async def closed_port_url() -> str:
    """The URL of a loopback port that was just free and has no listener: a connection to
    it is refused."""
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    return f"http://127.0.0.1:{port}"
