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
transport's pool is replaced by one built with it (``_pool``: httpx2 2.16.2, pinned).
"""

from __future__ import annotations

import ssl
from collections.abc import Awaitable, Callable, Iterable

import httpx2
import trio
from httpcore2 import SOCKET_OPTION, AsyncNetworkBackend, AsyncNetworkStream

from server.providers.net.client import client_with_backend
from server.providers.net.tls_safe import TlsSafeBackend
from server.providers.net.wrapped import WrappedStream

Pause = Callable[[], float]


class PacedStream(WrappedStream):
    """A connection whose reads wait ``pause()`` seconds first. ``before_wait``, when set
    (by the reader of the response in flight), runs before each read: the moment the
    bytes already received are all parsed."""

    def __init__(self, inner: AsyncNetworkStream, pause: Pause) -> None:
        super().__init__(inner)
        self._pause = pause
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
        data = await self._inner.read(max_bytes, timeout)
        now = trio.current_time()
        if self._last_read_at:
            self._interval = 0.7 * self._interval + 0.3 * (now - self._last_read_at)
        self._last_read_at = now
        return data

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> AsyncNetworkStream:
        tls = await self._inner.start_tls(ssl_context, server_hostname, timeout)
        return PacedStream(tls, self._pause)


class _PacedBackend(AsyncNetworkBackend):
    def __init__(self, pause: Pause) -> None:
        self._inner = TlsSafeBackend()
        self._pause = pause

    async def connect_tcp(self, host: str, port: int, timeout: float | None = None,
                          local_address: str | None = None,
                          socket_options: Iterable[SOCKET_OPTION] | None = None,
                          ) -> AsyncNetworkStream:
        stream = await self._inner.connect_tcp(host, port, timeout, local_address,
                                               socket_options)
        return PacedStream(stream, self._pause)

    async def connect_unix_socket(self, path: str, timeout: float | None = None,
                                  socket_options: Iterable[SOCKET_OPTION] | None = None,
                                  ) -> AsyncNetworkStream:
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return PacedStream(stream, self._pause)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


def paced_client(limits: httpx2.Limits, timeout: httpx2.Timeout, pause: Pause
                 ) -> httpx2.AsyncClient:
    """An httpx2 client whose connections are ``PacedStream``s."""
    return client_with_backend(_PacedBackend(pause), limits, timeout)
