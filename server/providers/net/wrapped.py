"""A network stream that hands every call to the stream it wraps: the base of the streams
that change one thing about a connection (``paced.PacedStream``: its reads;
``tls_safe.TlsSafeStream``: a handshake that does not finish)."""

from __future__ import annotations

import ssl
from typing import Any

from httpcore2 import AsyncNetworkStream


class WrappedStream(AsyncNetworkStream):
    def __init__(self, inner: AsyncNetworkStream) -> None:
        self._inner = inner

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return await self._inner.read(max_bytes, timeout)

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def start_tls(self, ssl_context: ssl.SSLContext, server_hostname: str | None = None,
                        timeout: float | None = None) -> AsyncNetworkStream:
        return await self._inner.start_tls(ssl_context, server_hostname, timeout)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)
