"""A :class:`FakeServer` whose answers are scripts written by the test itself.

Unit tests of a single client (a search provider, the page reader, the
OpenAI-compatible model client) want to shape one response by hand: stall after
the headers, trickle or flood a body, cut a chunked stream midway. A *script* is
an ``async`` function given the base :class:`~fakes.base.Exchange`; it may
use ``start_response`` / ``send`` / ``finish`` / ``abort`` freely, and may block
forever (:func:`until_client_leaves`): the base server's receive watcher cancels
it and records the connection as closed by the client as soon as the client
leaves. Everything the server received is in ``requests`` and ``connections``.

Scripts are looked up by ``(method, path)`` among the routes first; the default
script (if any) answers everything else, and without one the answer is a 404.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

import trio

from .base import Exchange, FakeServer

__all__ = [
    "Script",
    "ScriptedServer",
    "constant",
    "endless",
    "json_answer",
    "respond",
    "send_sse",
    "stall_after_headers",
    "start_stream",
    "until_client_leaves",
]

Script = Callable[[Exchange], Awaitable[None]]


class ScriptedServer(FakeServer):
    """Answers each request by running the test's script for it."""

    def __init__(self, script: Script | None = None) -> None:
        super().__init__()
        self.script = script
        self.routes: dict[tuple[str, str], Script] = {}

    def route(self, method: str, path: str, script: Script) -> None:
        """Answer ``method path`` (path without the query) with ``script``."""
        self.routes[(method.upper(), path)] = script

    async def handle(self, ex: Exchange) -> None:
        script = self.routes.get((ex.request.method, ex.request.path), self.script)
        if script is None:
            await ex.respond(404, f"no script for {ex.request.method} {ex.request.path}\n")
        else:
            await script(ex)


# --------------------------------------------------------------------------- building blocks


async def respond(
    ex: Exchange,
    status: int,
    body: bytes,
    content_type: str | None,
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    """A whole response with Content-Length; ``content_type=None`` sends no
    Content-Type header at all (unlike ``Exchange.respond``)."""
    hdrs = [*headers] if content_type is None else [("content-type", content_type), *headers]
    await ex.start_response(status, hdrs, content_length=len(body))
    await ex.send(body)
    await ex.finish()


async def start_stream(
    ex: Exchange, content_type: str = "text/event-stream", status: int = 200
) -> None:
    """Status line and headers of a chunked body; each ``ex.send`` is one chunk."""
    await ex.start_response(status, [("content-type", content_type)])


async def send_sse(ex: Exchange, value: Any) -> None:
    """One server-sent event carrying ``value`` as JSON (``data: ...`` + blank line)."""
    await ex.send(f"data: {json.dumps(value)}\n\n")


async def until_client_leaves() -> None:
    """Block until the client closes the connection (the receive watcher then
    cancels the script); nothing more is sent."""
    await trio.sleep_forever()


# --------------------------------------------------------------------------- ready-made scripts


def constant(status: int, body: bytes, content_type: str | None) -> Script:
    """Always the same complete response."""

    async def script(ex: Exchange) -> None:
        await respond(ex, status, body, content_type)

    return script


def json_answer(value: Any, status: int = 200) -> Script:
    """Always ``value`` as an ``application/json`` body."""
    return constant(status, json.dumps(value).encode(), "application/json")


def stall_after_headers(content_type: str = "text/html") -> Script:
    """Send 200 and the headers of a chunked body, then nothing until the client leaves."""

    async def script(ex: Exchange) -> None:
        await start_stream(ex, content_type)
        await until_client_leaves()

    return script


def endless(piece: bytes, content_type: str = "text/plain; charset=utf-8") -> Script:
    """A chunked 200 body that repeats ``piece`` for as long as the client reads."""

    async def script(ex: Exchange) -> None:
        await start_stream(ex, content_type)
        while True:
            await ex.send(piece)

    return script
