"""Common machinery for the loopback HTTP/1.1 fakes.

Every fake is a real TCP server built from ``trio`` sockets and ``h11``. The point
of doing it by hand (instead of with a web framework) is that we see precisely
when each TCP connection opens and closes, including when a client walks away in
the middle of a slow response.

Core ideas:

* One :class:`ConnRecord` per accepted TCP connection, one :class:`RequestRecord`
  per request (keep-alive connections carry several requests).
* While a handler is producing a response (possibly sleeping, hanging, or trickling
  chunks) a *receive watcher* task reads the socket concurrently. If the peer
  closes, the watcher records ``closed_at`` immediately and cancels the handler.
* Every state change replaces a ``trio.Event`` so waiters can loop on a predicate
  (``wait_for_request``, ``wait_connection_closed``, ``wait_until``).
* Everything under ``/_fake/`` is the control API; those requests are not recorded
  and connections that only carried control requests are flagged ``control``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import struct
import sys
import time
import traceback
import urllib.parse
from collections.abc import AsyncIterator, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal, NoReturn, Self

import h11
import trio

__all__ = [
    "AbortConnection",
    "ConnRecord",
    "Exchange",
    "FakeServer",
    "RequestRecord",
    "run_main",
]

ClosedBy = Literal["client", "server"]
Headers = list[tuple[str, str]]

CONTROL_PREFIX = "/_fake/"
_RECV_SIZE = 65536


@dataclass
class ConnRecord:
    """One accepted TCP connection. Times are ``time.monotonic()`` seconds."""

    id: int
    opened_at: float
    closed_at: float | None = None
    paths: list[str] = field(default_factory=list)
    closed_by: ClosedBy | None = None
    control: bool = False
    peer: str = ""
    control_requests: int = 0
    # TCP_NODELAY on the fake's end: without it a peer that writes its request in two
    # packets (head, then body) waits about 40 ms on Nagle's algorithm and delayed ACKs,
    # and the bench would measure the fake, not the peer.
    nodelay: bool = False

    @property
    def is_open(self) -> bool:
        return self.closed_at is None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RequestRecord:
    """One complete HTTP request (headers and body fully received)."""

    conn_id: int
    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes
    json_body: Any
    received_at: float
    raw_query: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def to_json(self) -> dict[str, Any]:
        return {
            "conn_id": self.conn_id,
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "raw_query": self.raw_query,
            "headers": self.headers,
            "json_body": self.json_body,
            "body": None if self.json_body is not None else self.text,
            "received_at": self.received_at,
            "meta": self.meta,
        }


class AbortConnection(Exception):
    """Raised by a handler to drop the TCP connection on the floor."""

    def __init__(self, rst: bool = False) -> None:
        super().__init__("abort connection")
        self.rst = rst


class _PeerGone(Exception):
    """Internal: the client closed (or reset) the connection."""


class _ConnState:
    def __init__(self, stream: trio.SocketStream, record: ConnRecord) -> None:
        self.stream = stream
        self.record = record
        self.h11 = h11.Connection(h11.SERVER)
        self.peer_eof = False
        self.rst = False


class Exchange:
    """The handler's view of one request/response on a connection.

    Handlers may freely ``await trio.sleep(...)`` / ``trio.sleep_forever()``
    between sends: a concurrent watcher cancels them as soon as the peer closes.
    """

    def __init__(self, server: FakeServer, state: _ConnState, request: RequestRecord) -> None:
        self.server = server
        self.request = request
        self._state = state
        self.started = False
        self.finished = False
        self.status = 0
        self._chunked = False

    @property
    def conn_id(self) -> int:
        return self._state.record.id

    async def _send_event(self, event: h11.Event) -> None:
        data = self._state.h11.send(event)
        if data:
            await self._send_bytes(data)

    async def _send_bytes(self, data: bytes) -> None:
        try:
            await self._state.stream.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise _PeerGone() from exc

    # Raw body chunks: a fast path for handlers that stream many small chunks (the
    # model fake's paced tokens). The head goes out through h11 (start_response) and
    # so does the end (send / finish); in between, the caller frames chunks itself
    # and writes them straight to the socket. h11 keeps no per-chunk state for chunked
    # bodies, so its state machine stays consistent.
    @property
    def raw_body_chunks(self) -> bool:
        """True when the response body is open and chunked, so that
        :meth:`frame_body_chunk` + :meth:`send_raw` / :meth:`try_send_raw` may be used."""
        return (
            self._chunked
            and not self.finished
            and not self._no_body()
            and self._state.h11.our_state is h11.SEND_BODY
        )

    @staticmethod
    def frame_body_chunk(data: bytes) -> bytes:
        """One HTTP/1.1 chunk (size line, data, CRLF) holding ``data`` (not empty)."""
        return b"%x\r\n%b\r\n" % (len(data), data)

    async def send_raw(self, data: bytes) -> None:
        """Write already framed body bytes (see :attr:`raw_body_chunks`)."""
        await self._send_bytes(data)

    def try_send_raw(self, data: bytes) -> int:
        """Write already framed body bytes without waiting: as many as the socket takes
        right now (returns the count; the caller must send the rest before anything
        else). Raises like :meth:`send` if the peer is gone. Not to be used while
        another send on this exchange is in progress."""
        try:
            return os.write(self._state.stream.socket.fileno(), data)
        except BlockingIOError:
            return 0
        except OSError as exc:
            raise _PeerGone() from exc

    async def start_response(
        self,
        status: int,
        headers: Iterable[tuple[str, str]] = (),
        content_length: int | None = None,
    ) -> None:
        """Send the status line and headers. Without ``content_length`` the body
        is sent with chunked transfer encoding (HTTP/1.1 peers)."""
        hdrs: Headers = [(k, v) for k, v in headers]
        names = {k.lower() for k, _ in hdrs}
        self.status = status
        if status < 200 or status in (204, 304):
            content_length = None
        if content_length is not None and "content-length" not in names:
            hdrs.append(("content-length", str(content_length)))
        if "server" not in names:
            hdrs.append(("server", f"tether-fake/{type(self.server).__name__}"))
        self.started = True
        head = self._state.h11.send(h11.Response(status_code=status, headers=hdrs)) or b""
        # h11 picked the body framing; it spells chunked framing exactly like this.
        self._chunked = b"\r\ntransfer-encoding: chunked\r\n" in head.lower()
        await self._send_bytes(head)

    async def send(self, data: bytes | str) -> None:
        """Send (and flush) one piece of body. With chunked encoding each call is
        one HTTP chunk."""
        if isinstance(data, str):
            data = data.encode()
        if data and not self._no_body():
            await self._send_event(h11.Data(data=data))

    def _no_body(self) -> bool:
        """HEAD requests and 1xx/204/304 responses carry no body (data is dropped)."""
        return self.request.method == "HEAD" or self.status < 200 or self.status in (204, 304)

    async def finish(self) -> None:
        await self._send_event(h11.EndOfMessage())
        self.finished = True

    async def respond(
        self,
        status: int,
        body: bytes | str = b"",
        content_type: str = "text/plain; charset=utf-8",
        headers: Iterable[tuple[str, str]] = (),
    ) -> None:
        """Send a complete response with Content-Length."""
        if isinstance(body, str):
            body = body.encode()
        hdrs: Headers = [("content-type", content_type), *headers]
        await self.start_response(status, hdrs, content_length=len(body))
        await self.send(body)
        await self.finish()

    async def respond_json(
        self, obj: Any, status: int = 200, headers: Iterable[tuple[str, str]] = ()
    ) -> None:
        await self.respond(status, json.dumps(obj), "application/json", headers)

    def abort(self, rst: bool = False) -> NoReturn:
        """Drop the connection right now (FIN, or RST with ``rst=True``), without
        finishing the response."""
        raise AbortConnection(rst)


class FakeServer:
    """Base class: a loopback HTTP/1.1 server that records connections/requests.

    Subclasses implement :meth:`handle` and declare their settings in
    ``SETTING_NAMES`` plus :meth:`_reset_settings` (assign defaults).
    """

    SETTING_NAMES: ClassVar[tuple[str, ...]] = ()

    def __init__(self) -> None:
        self.port: int = 0
        self.host: str = "127.0.0.1"
        self._all_connections: list[ConnRecord] = []
        self.requests: list[RequestRecord] = []
        self.errors: list[str] = []
        self._next_conn_id = 1
        self._changed = trio.Event()
        self._serve_scope: trio.CancelScope | None = None
        self._reset_settings()

    # ------------------------------------------------------------------ settings
    def _reset_settings(self) -> None:
        """Assign every setting its default value. Override in subclasses."""

    def _apply_setting(self, key: str, value: Any) -> None:
        """Set one setting from a (JSON) value. Override to convert values."""
        setattr(self, key, value)

    def _setting_to_json(self, key: str, value: Any) -> Any:
        return _jsonable(value)

    def configure(self, **settings: Any) -> None:
        """Merge settings (same semantics as ``POST /_fake/config``)."""
        unknown = [k for k in settings if k not in self.SETTING_NAMES]
        if unknown:
            raise KeyError(f"unknown setting(s) {unknown}; known: {list(self.SETTING_NAMES)}")
        for key, value in settings.items():
            self._apply_setting(key, value)
        self._notify()

    def settings(self) -> dict[str, Any]:
        return {k: self._setting_to_json(k, getattr(self, k)) for k in self.SETTING_NAMES}

    def reset(self) -> None:
        """Clear records and restore default settings.

        Connections that are still open stay in ``connections`` (their sockets are
        alive, so forgetting them would make ``open_connections()`` lie)."""
        self._all_connections = [c for c in self._all_connections if c.closed_at is None]
        self.requests = []
        self.errors = []
        self._reset_settings()
        self._notify()

    # ------------------------------------------------------------------ lifecycle
    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self, nursery: trio.Nursery, host: str = "127.0.0.1", port: int = 0) -> int:
        """Bind, start serving inside ``nursery`` and return the bound port."""
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.host = host
        self.port = listeners[0].socket.getsockname()[1]
        await nursery.start(self._serve, listeners)
        return self.port

    async def _serve(
        self,
        listeners: list[trio.SocketListener],
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        with trio.CancelScope() as scope:
            self._serve_scope = scope
            async with trio.open_nursery() as nursery:
                self._start_background(nursery)
                task_status.started()
                await trio.serve_listeners(self._handle_connection, listeners)

    def _start_background(self, nursery: trio.Nursery) -> None:
        """Subclass hook: start tasks that live as long as the server serves."""

    def stop(self) -> None:
        """Stop listening and close every connection (recorded as server-closed)."""
        if self._serve_scope is not None:
            self._serve_scope.cancel()

    @asynccontextmanager
    async def serving(self, host: str = "127.0.0.1", port: int = 0) -> AsyncIterator[Self]:
        """``async with FakeModel().serving() as model: ...`` (own nursery)."""
        async with trio.open_nursery() as nursery:
            await self.start(nursery, host, port)
            try:
                yield self
            finally:
                nursery.cancel_scope.cancel()

    # ------------------------------------------------------------------ records
    @property
    def connections(self) -> list[ConnRecord]:
        """Non-control connections, in accept order."""
        return [c for c in self._all_connections if not c.control]

    @property
    def all_connections(self) -> list[ConnRecord]:
        return list(self._all_connections)

    def open_connections(self) -> list[ConnRecord]:
        return [c for c in self._all_connections if c.closed_at is None and not c.control]

    def connection(self, conn_id: int) -> ConnRecord:
        for c in self._all_connections:
            if c.id == conn_id:
                return c
        raise KeyError(conn_id)

    def requests_for(self, path_prefix: str = "/") -> list[RequestRecord]:
        return [r for r in self.requests if r.path.startswith(path_prefix)]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` is true; re-checked on every state change."""
        while not predicate():
            await self._changed.wait()

    async def wait_for_request(self, path_prefix: str = "/", count: int = 1) -> RequestRecord:
        """Wait for at least ``count`` recorded requests whose path starts with
        ``path_prefix``; return the latest such request."""
        await self.wait_until(lambda: len(self.requests_for(path_prefix)) >= count)
        return self.requests_for(path_prefix)[-1]

    async def wait_connection_closed(self, conn_id: int) -> ConnRecord:
        await self.wait_until(lambda: self.connection(conn_id).closed_at is not None)
        return self.connection(conn_id)

    async def wait_for_connections(self, count: int = 1) -> list[ConnRecord]:
        """Wait until at least ``count`` non-control connections were accepted."""
        await self.wait_until(lambda: len(self.connections) >= count)
        return self.connections

    async def wait_all_closed(self) -> None:
        """Wait until no non-control connection is open."""
        await self.wait_until(lambda: not self.open_connections())

    def _mark_closed(self, record: ConnRecord, by: ClosedBy) -> None:
        if record.closed_at is None:
            record.closed_at = time.monotonic()
            record.closed_by = by
            self._notify()

    # ------------------------------------------------------------------ handlers
    async def handle(self, ex: Exchange) -> None:
        """Answer one (non-control) request. Override in subclasses."""
        await ex.respond(404, "not found\n")

    async def handle_control(self, ex: Exchange, name: str) -> bool:
        """Subclass hook for extra ``/_fake/<name>`` endpoints; return True if
        handled."""
        return False

    async def _control(self, ex: Exchange) -> None:
        req = ex.request
        name = req.path[len(CONTROL_PREFIX) :]
        method = req.method
        if name == "connections" and method == "GET":
            include_all = req.query.get("all", "") not in ("", "0", "false")
            conns = self._all_connections if include_all else self.connections
            await ex.respond_json([c.to_json() for c in conns])
        elif name == "requests" and method == "GET":
            prefix = req.query.get("path_prefix", "/")
            await ex.respond_json([r.to_json() for r in self.requests_for(prefix)])
        elif name == "config" and method == "GET":
            await ex.respond_json(self.settings())
        elif name == "config" and method == "POST":
            body = req.json_body
            if not isinstance(body, dict):
                await ex.respond_json({"error": "expected a JSON object"}, 400)
                return
            try:
                self.configure(**body)
            except (KeyError, TypeError, ValueError) as exc:
                await ex.respond_json({"error": str(exc)}, 400)
                return
            await ex.respond_json(self.settings())
        elif name == "reset" and method == "POST":
            self.reset()
            await ex.respond_json({"ok": True})
        elif name == "health":
            await ex.respond_json({"ok": True, "port": self.port, "now": time.monotonic()})
        elif name == "wait_request" and method == "GET":
            prefix = req.query.get("path_prefix", "/")
            count = int(req.query.get("count", "1"))
            timeout = float(req.query.get("timeout", "30"))
            with trio.move_on_after(timeout):
                rec = await self.wait_for_request(prefix, count)
                await ex.respond_json(rec.to_json())
                return
            await ex.respond_json({"error": "timeout"}, 504)
        elif name == "wait_closed" and method == "GET":
            conn_id = int(req.query.get("conn_id", "0"))
            timeout = float(req.query.get("timeout", "30"))
            try:
                self.connection(conn_id)
            except KeyError:
                await ex.respond_json({"error": f"no connection {conn_id}"}, 404)
                return
            with trio.move_on_after(timeout):
                conn = await self.wait_connection_closed(conn_id)
                await ex.respond_json(conn.to_json())
                return
            await ex.respond_json({"error": "timeout"}, 504)
        elif not await self.handle_control(ex, name):
            await ex.respond_json({"error": f"unknown control endpoint {method} {req.path}"}, 404)

    # ------------------------------------------------------------------ connection loop
    async def _recv(self, st: _ConnState) -> bytes:
        try:
            data = await st.stream.receive_some(_RECV_SIZE)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if not data:
            st.peer_eof = True
        return data

    async def _handle_connection(self, stream: trio.SocketStream) -> None:
        try:
            host, port = stream.socket.getpeername()[:2]
            peer = f"{host}:{port}"
            # trio's SocketStream sets it already; set here so that no change there or
            # here can lose it, and recorded so that the bench can check it.
            stream.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, True)
            nodelay = bool(stream.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        except OSError:
            peer, nodelay = "", False
        record = ConnRecord(
            id=self._next_conn_id, opened_at=time.monotonic(), peer=peer, nodelay=nodelay
        )
        self._next_conn_id += 1
        self._all_connections.append(record)
        self._notify()
        st = _ConnState(stream, record)
        try:
            while True:
                request = await self._read_request(st)
                if request is None:
                    break
                keep_going = await self._serve_request(st, request)
                if not keep_going:
                    break
                conn = st.h11
                if conn.our_state is h11.DONE and conn.their_state is h11.DONE:
                    conn.start_next_cycle()
                else:
                    break
        except _PeerGone:
            self._mark_closed(record, "client")
        except h11.RemoteProtocolError as exc:
            if st.peer_eof:
                self._mark_closed(record, "client")
            else:
                await self._send_400(st, str(exc))
        except Exception:
            self._log_error(f"connection {record.id} crashed")
        finally:
            if st.peer_eof:
                self._mark_closed(record, "client")
            with trio.CancelScope(shield=True):
                if st.rst:
                    _set_rst_on_close(stream)
                await stream.aclose()
            self._mark_closed(record, "server")

    async def _send_400(self, st: _ConnState, message: str) -> None:
        if st.h11.our_state not in (h11.IDLE, h11.SEND_RESPONSE):
            return
        body = f"bad request: {message}\n".encode()
        try:
            data = st.h11.send(
                h11.Response(
                    status_code=400,
                    headers=[("content-length", str(len(body))), ("connection", "close")],
                )
            )
            data = (data or b"") + (st.h11.send(h11.Data(data=body)) or b"")
            data += st.h11.send(h11.EndOfMessage()) or b""
            await st.stream.send_all(data)
        except (h11.LocalProtocolError, trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _read_request(self, st: _ConnState) -> RequestRecord | None:
        conn = st.h11
        head: h11.Request | None = None
        body = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                if head is not None and conn.they_are_waiting_for_100_continue:
                    out = conn.send(h11.InformationalResponse(status_code=100, headers=[]))
                    if out:
                        await st.stream.send_all(out)
                data = await self._recv(st)
                if not data and head is None and conn.their_state is h11.IDLE:
                    # clean close between requests
                    self._mark_closed(st.record, "client")
                    return None
                conn.receive_data(data)
            elif isinstance(event, h11.ConnectionClosed):
                self._mark_closed(st.record, "client")
                return None
            elif isinstance(event, h11.Request):
                head = event
            elif isinstance(event, h11.Data):
                body += event.data
            elif isinstance(event, h11.EndOfMessage):
                assert head is not None
                return self._make_request_record(st, head, bytes(body))
            else:  # PAUSED or something unexpected: treat as the end
                return None

    def _make_request_record(self, st: _ConnState, head: h11.Request, body: bytes) -> RequestRecord:
        target = head.target.decode("latin-1")
        parts = urllib.parse.urlsplit(target)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(parts.query, True).items()}
        headers: dict[str, str] = {}
        for name, value in head.headers:
            key = name.decode("latin-1").lower()
            val = value.decode("latin-1")
            headers[key] = f"{headers[key]}, {val}" if key in headers else val
        json_body: Any = None
        if body:
            try:
                json_body = json.loads(body)
            except ValueError:
                json_body = None
        return RequestRecord(
            conn_id=st.record.id,
            method=head.method.decode("ascii"),
            path=parts.path or "/",
            query=query,
            headers=headers,
            body=body,
            json_body=json_body,
            received_at=time.monotonic(),
            raw_query=parts.query,
        )

    async def _serve_request(self, st: _ConnState, request: RequestRecord) -> bool:
        """Run the handler with a concurrent receive watcher. Returns True if the
        connection may be reused."""
        record = st.record
        is_control = request.path.startswith(CONTROL_PREFIX)
        if is_control:
            record.control_requests += 1
            record.control = not record.paths
        else:
            record.paths.append(request.path)
            record.control = False
            self.requests.append(request)
        self._notify()

        ex = Exchange(self, st, request)
        peer_gone = False
        aborted = False

        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                nonlocal peer_gone
                while True:
                    data = await self._recv(st)
                    if not data:
                        peer_gone = True
                        self._mark_closed(record, "client")
                        nursery.cancel_scope.cancel()
                        return
                    # pipelined bytes: h11 buffers them for the next cycle
                    st.h11.receive_data(data)

            nursery.start_soon(watch)
            try:
                if is_control:
                    await self._control(ex)
                else:
                    await self.handle(ex)
                if not ex.started:
                    await ex.respond(500, "fake handler sent no response\n")
                elif not ex.finished:
                    await ex.finish()
            except _PeerGone:
                peer_gone = True
                self._mark_closed(record, "client")
            except AbortConnection as exc:
                aborted = True
                st.rst = exc.rst
            except Exception:
                self._log_error(f"handler error for {request.method} {request.path}")
                if not ex.started:
                    try:
                        await ex.respond(500, "fake handler crashed\n")
                    except _PeerGone:
                        peer_gone = True
                        self._mark_closed(record, "client")
                else:
                    aborted = True
            finally:
                nursery.cancel_scope.cancel()
        return not (peer_gone or aborted)

    def _log_error(self, what: str) -> None:
        text = f"{what}\n{traceback.format_exc()}"
        self.errors.append(text)
        print(f"[{type(self).__name__}] {text}", file=sys.stderr, flush=True)


def _set_rst_on_close(stream: trio.SocketStream) -> None:
    try:
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass


def _jsonable(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = dataclasses.asdict(value)
        kind = getattr(value, "kind", None)
        if kind is not None:
            out = {"kind": kind, **out}
        return out
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def run_main(
    factory: Callable[[], FakeServer], argv: list[str] | None = None, description: str = ""
) -> None:
    """Entry point shared by ``python -m fakes.<name> --port N``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    parser.add_argument("--host", default="127.0.0.1")
    args = parser.parse_args(argv)

    async def _run() -> None:
        async with trio.open_nursery() as nursery:
            server = factory()
            port = await server.start(nursery, host=args.host, port=args.port)
            print(f"READY {port}", flush=True)

    try:
        trio.run(_run)
    except KeyboardInterrupt:
        pass
