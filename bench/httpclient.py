"""A small HTTP/1.1 client on trio sockets and h11, for measuring.

Why not a library client: the bench needs to know exactly when a request left and when its
answer arrived, to keep one keep-alive connection per simulated client, and to close a
socket at a chosen moment (disconnect scenarios). Every request is timed on
``time.monotonic()`` (CLOCK_MONOTONIC, shared with the fakes' records).
"""

from __future__ import annotations

import json
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import h11
import trio

_RECV = 65536


class HttpError(RuntimeError):
    pass


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes
    sent_at: float  # monotonic, just before the request bytes were written
    done_at: float  # monotonic, when the whole answer had been read

    @property
    def elapsed(self) -> float:
        return self.done_at - self.sent_at

    def json(self) -> Any:
        return json.loads(self.body)


class HttpConnection:
    """One keep-alive connection to ``host:port``, reconnecting when the server closes it;
    over TLS with ``tls`` (a deployment measured with ``--target https://...``)."""

    def __init__(self, host: str, port: int, *, tls: bool = False) -> None:
        self.host = host
        self.port = port
        self.tls = tls
        self._stream: trio.SocketStream | trio.SSLStream[trio.SocketStream] | None = None
        self._h11 = h11.Connection(h11.CLIENT)
        # When the last request's bytes went out (monotonic): a stream's start, for
        # ``open_stream``, whose answer is read later.
        self.last_sent_at = 0.0

    async def connect(self) -> None:
        if self._stream is None:
            if self.tls:
                context = ssl.create_default_context()
                self._stream = await trio.open_ssl_over_tcp_stream(
                    self.host, self.port, ssl_context=context, https_compatible=True
                )
            else:
                self._stream = await trio.open_tcp_stream(self.host, self.port)
            self._h11 = h11.Connection(h11.CLIENT)

    async def aclose(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.aclose()

    def abort(self) -> float:
        """Close the socket at once (a client walking away); returns the monotonic time
        just before the close."""
        stream, self._stream = self._stream, None
        closed_at = time.monotonic()
        if isinstance(stream, trio.SSLStream):
            stream = stream.transport_stream
        if stream is not None:
            stream.socket.close()
        return closed_at

    def _head(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None
    ) -> h11.Request:
        hdrs = [("host", f"{self.host}:{self.port}"), ("user-agent", "tether-bench")]
        if body is not None:
            hdrs += [("content-type", "application/json"), ("content-length", str(len(body)))]
        for k, v in (headers or {}).items():
            hdrs.append((k, v))
        return h11.Request(method=method, target=path, headers=hdrs)

    async def _send(
        self, method: str, path: str, body: bytes | None, headers: dict[str, str] | None
    ) -> float:
        if self._stream is not None and self._h11.our_state is not h11.IDLE:
            await self.aclose()
        await self.connect()
        assert self._stream is not None
        data = self._h11.send(self._head(method, path, body, headers)) or b""
        if body is not None:
            data += self._h11.send(h11.Data(data=body)) or b""
        data += self._h11.send(h11.EndOfMessage()) or b""
        sent_at = self.last_sent_at = time.monotonic()
        await self._stream.send_all(data)
        return sent_at

    async def _next_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            event = self._h11.next_event()
            if event is h11.NEED_DATA:
                if self._stream is None:  # aborted by another task
                    raise trio.ClosedResourceError("the connection was closed")
                data = await self._stream.receive_some(_RECV)
                self._h11.receive_data(data)
                continue
            return event

    async def _read_head(self) -> tuple[int, dict[str, str]]:
        while True:
            event = await self._next_event()
            if isinstance(event, h11.InformationalResponse):
                continue
            if isinstance(event, h11.Response):
                headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                return event.status_code, headers
            if isinstance(event, h11.ConnectionClosed):
                raise HttpError("connection closed before the answer")
            raise HttpError(f"unexpected h11 event {event!r}")

    def _finish_cycle(self) -> None:
        if self._h11.our_state is h11.DONE and self._h11.their_state is h11.DONE:
            self._h11.start_next_cycle()
        else:
            self.abort()

    async def request(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> Response:
        """Send one request and read the whole answer. ``body`` is JSON-encoded unless bytes."""
        raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        try:
            sent_at = await self._send(method, path, raw, headers)
            status, hdrs = await self._read_head()
            chunks: list[bytes] = []
            while True:
                event = await self._next_event()
                if isinstance(event, h11.Data):
                    chunks.append(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    raise HttpError(f"unexpected h11 event {event!r}")
        except (
            trio.BrokenResourceError,
            trio.ClosedResourceError,
            h11.ProtocolError,
            OSError,
            HttpError,
        ):
            self.abort()
            raise
        done_at = time.monotonic()
        self._finish_cycle()
        return Response(status, hdrs, b"".join(chunks), sent_at, done_at)

    async def open_stream(
        self, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> tuple[int, dict[str, str]]:
        """Send a request and read only the answer's head; then iterate ``body_chunks``."""
        raw = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        await self._send(method, path, raw, headers)
        return await self._read_head()

    async def body_chunks(self) -> AsyncIterator[bytes]:
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._finish_cycle()
                return
            else:
                raise HttpError(f"unexpected h11 event {event!r}")


async def sse_events(conn: HttpConnection) -> AsyncIterator[tuple[float, str]]:
    """``(arrival time, data)`` of each SSE ``data:`` field of an opened stream; comment
    lines are yielded as ``(t, ":<comment>")``."""
    buffer = b""
    async for chunk in conn.body_chunks():
        buffer += chunk
        while b"\n\n" in buffer:
            block, buffer = buffer.split(b"\n\n", 1)
            now = time.monotonic()
            datas = []
            for line in block.decode("utf-8", "replace").splitlines():
                if line.startswith("data:"):
                    datas.append(line[5:].lstrip())
                elif line.startswith(":"):
                    yield now, line
            if datas:
                yield now, "\n".join(datas)


async def get_json(host: str, port: int, path: str) -> Any:
    """One-off GET on a fresh connection (control calls)."""
    conn = HttpConnection(host, port)
    try:
        answer = await conn.request("GET", path)
    finally:
        await conn.aclose()
    if answer.status >= 400:
        raise HttpError(f"GET {path} -> {answer.status}: {answer.body[:300]!r}")
    return answer.json()


async def post_json(host: str, port: int, path: str, body: Any = None) -> Any:
    conn = HttpConnection(host, port)
    try:
        answer = await conn.request("POST", path, body if body is not None else {})
    finally:
        await conn.aclose()
    if answer.status >= 400:
        raise HttpError(f"POST {path} -> {answer.status}: {answer.body[:300]!r}")
    return answer.json()
