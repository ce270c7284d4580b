"""A network stream that hands every call to the stream it wraps: the base of the streams
that change one thing about a connection (``paced.PacedStream``: its reads;
``tls_safe.TlsSafeStream``: a handshake that does not finish); and a network backend whose
connections are another backend's, each wrapped so (``paced._PacedBackend``,
``tls_safe.TlsSafeBackend``)."""

from __future__ import annotations

import ssl
from collections.abc import Iterable
from typing import Any

from httpcore2 import SOCKET_OPTION, AsyncNetworkBackend, AsyncNetworkStream


class WrappedStream(AsyncNetworkStream):
    def __init__(self, inner: AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> AsyncNetworkStream:
        return await self._inner.start_tls(ssl_context, server_hostname, timeout)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class WrappingBackend(AsyncNetworkBackend):
    """Connects through ``inner`` and hands each new stream to ``wrap`` (``tcp``: a TCP
    connection, not a Unix socket)."""

    def __init__(self, inner: AsyncNetworkBackend) -> None:
        self._inner = inner

    def wrap(self, stream: AsyncNetworkStream, *, tcp: bool) -> AsyncNetworkStream:
        return stream

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        """Cancelling it abandons the connect (the inner backend closes what it opened)."""
        stream = await self._inner.connect_tcp(host, port, timeout, local_address, socket_options)
        return self.wrap(stream, tcp=True)

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        """Cancelling it abandons the connect (the inner backend closes what it opened)."""
        stream = await self._inner.connect_unix_socket(path, timeout, socket_options)
        return self.wrap(stream, tcp=False)

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)
