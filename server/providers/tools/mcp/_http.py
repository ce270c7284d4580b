"""The HTTP client of a streamable-HTTP MCP server: a stop closes the call's response stream.

A tool call over streamable HTTP is a POST whose response (an SSE stream, or one JSON body)
carries the result. When a task stops during the call, the SDK sends the protocol's
``notifications/cancelled`` for the request as a POST of its own, which is the signal the
2025 protocol defines, and then forgets the request; the call's own POST stays open until
the server answers it. A well-behaved server ends it at once, but one that ignores the cancel
would keep the stream (and its connection) open for as long as the tool runs.

So this transport remembers which response stream belongs to which JSON-RPC request id (it
reads the id from the POST body), and when it sees the cancel notification for an id go
out, it aborts that request's response stream: the read in flight is cancelled, the SDK's
reader sees the stream end, and the connection is closed rather than returned to the pool.
The notification is sent first, so that the server learns it is a cancel and not a broken
connection.

It also gives each POST the ``traceparent`` its JSON-RPC message carries in
``params._meta`` (a traced task's tool call puts it there): the SDK sends each POST from a
task of its session, outside the task's trace context, so an event hook could not know it.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx2
import trio

__all__ = ["CancellingTransport"]


class _AbortableStream(httpx2.AsyncByteStream):
    """A response body that another task can end: ``abort()`` cancels the read in flight
    (and every later one) with ``httpx2.StreamClosed``, which the SDK's readers take for a
    stream that ended without an answer (they answer the forgotten request with an error)."""

    def __init__(self, inner: httpx2.AsyncByteStream, on_close: Callable[[], None]) -> None:
        self._inner = inner
        self._on_close = on_close
        self._read_scope: trio.CancelScope | None = None
        self.aborted = False

    def abort(self) -> None:
        self.aborted = True
        if self._read_scope is not None:
            self._read_scope.cancel()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunks = self._inner.__aiter__()
        while True:
            # One cancel scope per read, never held across the yield (a cancel scope must
            # not span the suspension of an async generator).
            with trio.CancelScope() as scope:
                self._read_scope = scope
                if self.aborted:
                    scope.cancel()
                try:
                    chunk = await chunks.__anext__()
                except StopAsyncIteration:
                    return
                finally:
                    self._read_scope = None
            if scope.cancelled_caught:
                raise httpx2.StreamClosed()
            yield chunk

    async def aclose(self) -> None:
        self._on_close()
        await self._inner.aclose()


RequestId = str | int


class CancellingTransport(httpx2.AsyncBaseTransport):
    """An ``httpx2`` transport for one MCP server's client: requests go through ``inner``;
    the POST of a request cancelled with ``notifications/cancelled`` is aborted, whether its
    answer is still to begin (it is answered 499 here, without the server) or streaming."""

    def __init__(self, inner: httpx2.AsyncBaseTransport) -> None:
        self._inner = inner
        # Per request id: the cancel scope of a POST waiting for its answer's head, and the
        # answer's body once it streams.
        self._waiting: dict[RequestId, trio.CancelScope] = {}
        self._streaming: dict[RequestId, _AbortableStream] = {}
        # Ids cancelled before their POST got here (the SDK spawns each request's POST and
        # may send the cancel first); bounded, oldest first out.
        self._cancelled_early: dict[RequestId, None] = {}
        self.aborted = 0

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        """Send the request. Cancelling it cancels the inner transport's request (which
        closes its connection)."""
        message = _jsonrpc_message(request)
        traceparent = _traceparent(message)
        if traceparent is not None:
            request.headers["traceparent"] = traceparent
        cancelled_id = _cancelled_request_id(message)
        if cancelled_id is not None:
            try:
                return await self._inner.handle_async_request(request)
            finally:
                # Also when the notification could not be sent (the server is gone): the
                # request is abandoned either way, so its POST has nothing left to carry.
                self._abort(cancelled_id)
        request_id = _request_id(message)
        if request_id is None:
            return await self._inner.handle_async_request(request)
        with trio.CancelScope() as scope:
            self._waiting[request_id] = scope
            if request_id in self._cancelled_early:
                del self._cancelled_early[request_id]
                scope.cancel()
            try:
                response = await self._inner.handle_async_request(request)
            finally:
                if self._waiting.get(request_id) is scope:
                    del self._waiting[request_id]
        if scope.cancelled_caught:
            # 499, nginx's "client closed request": the SDK answers the (already forgotten)
            # request with an error, and no exception reaches its transport task group.
            return httpx2.Response(499, request=request)
        if not isinstance(response.stream, httpx2.AsyncByteStream):
            return response
        stream = _AbortableStream(response.stream, lambda: self._forget(request_id, stream))
        self._streaming[request_id] = stream
        response.stream = stream
        return response

    def _abort(self, request_id: RequestId) -> None:
        waiting = self._waiting.get(request_id)
        streaming = self._streaming.get(request_id)
        if waiting is not None:
            waiting.cancel()
        elif streaming is not None:
            streaming.abort()
        else:
            self._cancelled_early[request_id] = None
            while len(self._cancelled_early) > _MAX_EARLY_CANCELS:
                del self._cancelled_early[next(iter(self._cancelled_early))]
            return
        self.aborted += 1

    def _forget(self, request_id: RequestId, stream: _AbortableStream) -> None:
        if self._streaming.get(request_id) is stream:
            del self._streaming[request_id]

    async def aclose(self) -> None:
        await self._inner.aclose()


_MAX_EARLY_CANCELS = 1000


def _jsonrpc_message(request: httpx2.Request) -> dict[str, Any]:
    """The JSON-RPC message a POST carries; ``{}`` for anything else (a GET, a batch)."""
    if request.method != "POST":
        return {}
    try:
        message = json.loads(request.content)
    except (httpx2.RequestNotRead, ValueError, UnicodeDecodeError):
        return {}
    return message if isinstance(message, dict) else {}


def _as_id(value: Any) -> RequestId | None:
    if isinstance(value, str | int) and not isinstance(value, bool):
        return value
    return None


def _request_id(message: dict[str, Any]) -> RequestId | None:
    return _as_id(message.get("id")) if "method" in message else None


def _traceparent(message: dict[str, Any]) -> str | None:
    params = message.get("params")
    meta = params.get("_meta") if isinstance(params, dict) else None
    value = meta.get("traceparent") if isinstance(meta, dict) else None
    return value if isinstance(value, str) else None


def _cancelled_request_id(message: dict[str, Any]) -> RequestId | None:
    if message.get("method") != "notifications/cancelled" or "id" in message:
        return None
    params = message.get("params")
    return _as_id(params.get("requestId")) if isinstance(params, dict) else None
