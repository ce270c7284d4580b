"""ASGI wrappers: binding a task to the HTTP connection that asked for it, and routing
``/ws`` below the framework."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, cast

from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope
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
            await inner(scope, receive, send)
        finally:
            for callback in callbacks:
                callback()

    return asgi


def on_connection_close(callback: Callable[[], object]) -> None:
    """Call ``callback`` when the current request's connection is done with, however."""
    scope = cast(dict[str, Any], request.scope)
    scope[ON_CLOSE].append(callback)


def route_websocket(inner: ASGIApp, path: str, handler: ASGIApp) -> ASGIApp:
    """Serve WebSocket connections to ``path`` with ``handler``, below the framework;
    everything else goes to ``inner``."""

    async def asgi(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] == "websocket" and scope["path"] == path:
            await handler(scope, receive, send)
        else:
            await inner(scope, receive, send)

    return asgi
