"""An HTTP upstream that answers from functions, under an httpx2 client, with no socket.

Tests that only check how a client reads an answer (a model provider's stream, a search
engine's JSON, a page's text) need no connection: httpx2's ``MockTransport`` is a real
transport that hands the client the response a function built, so the client's parsing runs
exactly as it would over the network. Tests that prove a cancel or a timeout closes a
connection keep the loopback servers of ``fakes/`` instead: there is nothing to close here.

An answer is looked up by method and path (without the query), as ``fakes.scripted`` does;
anything else is a 404 that names what was asked, so a client that calls the wrong path
fails the test. Every request is kept, its body read, in ``requests``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2

__all__ = ["Answer", "MockUpstream", "json_response", "streamed"]

Answer = Callable[[httpx2.Request], httpx2.Response]


class MockUpstream:
    """Routes of ``(method, path)`` to answers, and the requests received."""

    def __init__(self, base_url: str = "http://upstream.test") -> None:
        self.base_url = base_url
        self.routes: dict[tuple[str, str], Answer] = {}
        self.default: Answer | None = None
        self.requests: list[httpx2.Request] = []

    def route(self, method: str, path: str, answer: Answer | httpx2.Response) -> None:
        """Answer ``method path`` with ``answer``: a function of the request, or a response
        given as is (one with a whole body answers every request, a streamed one the first)."""
        self.routes[(method.upper(), path)] = _as_answer(answer)

    def answer_everything(self, answer: Answer | httpx2.Response) -> None:
        """Answer every request that no route names with ``answer``."""
        self.default = _as_answer(answer)

    def client(self, **kwargs: Any) -> httpx2.AsyncClient:
        """A client whose every request this upstream answers."""
        return httpx2.AsyncClient(transport=httpx2.MockTransport(self._handle), **kwargs)

    def _handle(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(request)
        answer = self.routes.get((request.method, request.url.path), self.default)
        if answer is None:
            return httpx2.Response(404, text=f"no answer for {request.method} {request.url.path}")
        return answer(request)


def _as_answer(answer: Answer | httpx2.Response) -> Answer:
    if not isinstance(answer, httpx2.Response):
        return answer
    try:
        body = answer.content
    except httpx2.ResponseNotRead:
        # A streamed body (``streamed``) is read as the client reads it, so it answers once.
        return lambda _request: answer
    # A whole body: a fresh response from its parts each time, so it answers every request.
    status, headers = answer.status_code, answer.headers
    return lambda _request: httpx2.Response(status, headers=headers, content=body)


def json_response(value: Any, status: int = 200) -> httpx2.Response:
    """``value`` as an ``application/json`` body."""
    return httpx2.Response(
        status, content=json.dumps(value).encode(), headers={"content-type": "application/json"}
    )


def streamed(
    *writes: str | bytes | dict[str, Any],
    content_type: str = "text/event-stream",
    status: int = 200,
) -> httpx2.Response:
    """A body that reaches the client in pieces, one per write, as separate writes of a
    server would: a string or bytes as they are, anything else as one server-sent event
    carrying it as JSON (``data: ...`` and a blank line)."""
    pieces = [
        w
        if isinstance(w, bytes)
        else (w if isinstance(w, str) else f"data: {json.dumps(w)}\n\n").encode()
        for w in writes
    ]

    async def body() -> AsyncIterator[bytes]:
        for piece in pieces:
            yield piece

    return httpx2.Response(status, headers={"content-type": content_type}, content=body())
