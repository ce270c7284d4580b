"""The model client's connections, read in paced steps when the server is busy.

Each model token costs a socket read, a wake-up, an event and a WebSocket frame. When the
event loop has CPU to spare a stream is read the moment bytes arrive. When it is nearly
saturated (``server.load``), each model connection waits a moment before each socket
read: by then the upstream has sent several chunks, one read takes them all, and the
stream reader hands them on as one delta when the connection next needs bytes (its
``before_wait`` hook). Fewer reads, events and frames carry the same text, and what the
pause adds to a token's delivery is bounded by the largest pause.

The pause is applied below httpcore, in the network backend of the model client's pool,
because only there is a socket read visible: one read of the body iterator yields one
HTTP chunk, whether or not more are already buffered. httpcore2's pool takes a network
backend (its public plug-in point); httpx2's transport does not pass one on, so the
transport's pool is replaced by one built with it (``net.client``, through
``library_internals.replace_pool``).

Reads of a plain TCP connection also skip what httpcore2's trio stream wraps around each
one: a cancel scope for the read timeout and a context manager that maps exceptions, a few
microseconds a read, which under load are a tenth of the server's CPU (one read per token
of every stream). Such a read waits on the socket itself; the read timeout is kept by one
watchdog per client (``_IdleWatch``) that closes a connection whose read has waited past
its deadline, and the read then raises httpcore2's ``ReadTimeout`` as before. TLS
connections read through the TLS stream, as httpcore2 does.
"""

from __future__ import annotations

import math
import ssl
from collections.abc import Awaitable, Callable

import httpcore2
import httpx2
import trio
from httpcore2 import AsyncNetworkStream

from server.providers.net.client import client_with_backend
from server.providers.net.tls_safe import TlsSafeBackend
from server.providers.net.wrapped import WrappedStream, WrappingBackend

Pause = Callable[[], float]


class _IdleWatch:
    """The read timeout of a client's plain connections: the reads waiting now, and one
    system task that closes the connection of any that waits past its deadline. Started
    with the first read (a client is built before the event loop runs); ticks at a
    quarter of the shortest timeout seen, at most once a second, so that a read times out
    within a quarter of its timeout after its deadline."""

    def __init__(self) -> None:
        self.reading: set[PacedStream] = set()
        self._tick = 1.0
        self._running = False

    def add(self, stream: PacedStream, timeout: float) -> None:
        self._tick = min(self._tick, max(timeout / 4, 0.005))
        if not self._running:
            self._running = True
            trio.lowlevel.spawn_system_task(self._run, name="model read timeouts")
        self.reading.add(stream)

    async def _run(self) -> None:
        try:
            while True:
                await trio.sleep(self._tick)
                now = trio.current_time()
                for stream in [s for s in self.reading if s.read_deadline <= now]:
                    stream.time_out()
        finally:
            self._running = False


class PacedStream(WrappedStream):
    """A connection whose reads wait ``pause()`` seconds first. ``before_wait``, when set
    (by the reader of the response in flight), runs before each read: the moment the
    bytes already received are all parsed. ``socket``, for a plain TCP connection, is read
    directly (see the module's note)."""

    def __init__(
        self,
        inner: AsyncNetworkStream,
        pause: Pause,
        socket: trio.socket.SocketType | None = None,
        watch: _IdleWatch | None = None,
    ) -> None:
        super().__init__(inner)
        self._pause = pause
        self._socket = socket
        self._watch = watch
        self.read_deadline = math.inf
        self._timed_out = False
        self.before_wait: Callable[[], Awaitable[None]] | None = None
        # Smoothed time between two reads. A stream whose bytes come further apart than
        # the pause would gain nothing from it (each read would still bring one chunk)
        # and would pay a timer per read: only dense streams are paced.
        self._interval = 0.0
        self._last_read_at = 0.0

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        """Cancelling it cancels the pause or the read (httpcore then closes the
        connection)."""
        if self.before_wait is not None:
            await self.before_wait()
        pause = self._pause()
        if pause > 0 and self._interval < 2 * pause:
            await trio.sleep(pause)
        if self._socket is None or self._watch is None:
            data = await self._inner.read(max_bytes, timeout)
        else:
            data = await self._receive(self._socket, self._watch, max_bytes, timeout)
        now = trio.current_time()
        if self._last_read_at:
            self._interval = 0.7 * self._interval + 0.3 * (now - self._last_read_at)
        self._last_read_at = now
        return data

    async def _receive(
        self,
        socket: trio.socket.SocketType,
        watch: _IdleWatch,
        max_bytes: int,
        timeout: float | None,
    ) -> bytes:
        if self._timed_out:
            raise httpcore2.ReadTimeout("the read timed out")
        if timeout is not None:
            self.read_deadline = trio.current_time() + timeout
            watch.add(self, timeout)
        try:
            data: bytes = await socket.recv(max_bytes)
            return data
        except (OSError, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            if self._timed_out:
                raise httpcore2.ReadTimeout("the read timed out") from None
            raise httpcore2.ReadError(str(exc) or type(exc).__name__) from exc
        finally:
            watch.reading.discard(self)
            self.read_deadline = math.inf

    def time_out(self) -> None:
        """The read waited past its deadline: close the socket under it, which wakes it
        (httpcore then drops the connection)."""
        self._timed_out = True
        if self._socket is not None:
            self._socket.close()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> AsyncNetworkStream:
        tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return PacedStream(tls, self._pause)


class _PacedBackend(WrappingBackend):
    def __init__(self, pause: Pause) -> None:
        super().__init__(TlsSafeBackend())
        self._pause = pause
        self._watch = _IdleWatch()

    def wrap(self, stream: AsyncNetworkStream, *, tcp: bool) -> AsyncNetworkStream:
        if not tcp:
            return PacedStream(stream, self._pause)
        socket = stream.get_extra_info("socket")
        return PacedStream(
            stream,
            self._pause,
            socket if isinstance(socket, trio.socket.SocketType) else None,
            self._watch,
        )


def paced_client(
    limits: httpx2.Limits, timeout: httpx2.Timeout, pause: Pause, *, traced: bool = False
) -> httpx2.AsyncClient:
    """An httpx2 client whose connections are ``PacedStream``s (``traced``: see
    ``client_with_backend``)."""
    return client_with_backend(_PacedBackend(pause), limits, timeout, traced=traced)
