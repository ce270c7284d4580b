"""ASGI wrappers: binding a task to the HTTP connection that asked for it, and routing
``/ws`` below the framework."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope
from quart import request

ASGIApp = Callable[[Scope, ASGIReceiveCallable, ASGISendCallable], Awaitable[None]]

ON_CLOSE = "tether.on_close"


def bind_to_connection(inner: ASGIApp) -> ASGIApp:
    """Run each HTTP request's ``tether.on_close`` callbacks when its ASGI call ends.

    quart-trio cancels a request's handling when the client goes away, at whatever point
    it is: in the handler, before a streaming body has started, or inside it. The ASGI call
    ends in every case, so this is the one place where binding a task to its connection
    cannot be missed. The callbacks are synchronous (``TaskManager.stop``).
    """

    async def asgi(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] != "http":
            await inner(scope, receive, send)
            return
        callbacks: list[Callable[[], object]] = []
        cast(dict[str, Any], scope)[ON_CLOSE] = callbacks
        try:
            async with trio.open_nursery() as nursery:
                await inner(scope, receive, _draining_on_close(send, receive, nursery))
        finally:
            for callback in callbacks:
                callback()

    return asgi


def on_connection_close(callback: Callable[[], object]) -> Callable[[], None]:
    """Call ``callback`` when the current request's connection is done with, however.
    Returns what takes it back: an answer that ends on purpose before its task does (a
    stream the task store let go, see ``RedisStore.let_readers_go``) leaves the task be."""
    callbacks: list[Callable[[], object]] = cast(dict[str, Any], request.scope)[ON_CLOSE]
    callbacks.append(callback)

    def take_back() -> None:
        if callback in callbacks:
            callbacks.remove(callback)

    return take_back


def route_websocket(inner: ASGIApp, path: str, handler: ASGIApp) -> ASGIApp:
    """Serve WebSocket connections to ``path`` with ``handler``, below the framework;
    everything else goes to ``inner``."""

    # A plain function handing back the chosen app's coroutine: a coroutine of its own
    # here would hold a frame for every open WebSocket, for nothing.
    def asgi(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> Awaitable[None]:
        if scope["type"] == "websocket" and scope["path"] == path:
            return handler(scope, receive, send)
        return inner(scope, receive, send)

    return asgi


# How long an answer that closes its connection keeps reading the body the client is still
# sending, so that the client reads the answer rather than a reset.
DRAIN_S = 5.0


def _draining_on_close(
    send: ASGISendCallable, receive: ASGIReceiveCallable, nursery: trio.Nursery
) -> ASGISendCallable:
    """``send``, except that an answer marked ``Connection: close`` (sent before the body
    was read: see ``common.close_if_body_unread``) reads and drops the rest of the body from
    its last part on, and that last part is sent shielded.

    Why: hypercorn closes the connection inside the send of the answer's last part, after it
    has queued a last message for the app. An app that answered without reading the body may
    have left that queue full, and quart-trio may cancel the handler while the body is still
    arriving: either way the close was abandoned and the connection stayed open, unread, for
    as long as the client waited.
    """
    closing = False

    async def drain() -> None:
        with trio.move_on_after(DRAIN_S):
            while True:
                message = await receive()
                if message["type"] != "http.request" or not message.get("more_body"):
                    return

    async def send_draining(message: ASGISendEvent) -> None:
        nonlocal closing
        if message["type"] == "http.response.start":
            closing = any(
                name.lower() == b"connection" and value.lower() == b"close"
                for name, value in message.get("headers", ())
            )
        elif (
            closing
            and message["type"] == "http.response.body"
            and not message.get("more_body", False)
        ):
            nursery.start_soon(drain)
            # The last part of the answer is where hypercorn closes the connection, and
            # quart-trio may cancel the handler meanwhile (a body past its limit): finish it.
            with trio.move_on_after(DRAIN_S, shield=True):
                await send(message)
            return
        await send(message)

    return send_draining
