"""TCP connections that are closed when their TLS handshake does not finish.

httpcore2 (2.x, ``_backends/trio.py``) closes the TCP stream when a TLS handshake fails with
an ``Exception``, but not when it is cancelled (``trio.Cancelled`` is a ``BaseException``),
and the connection that was being set up is then dropped from the pool unclosed. A page
fetch or a model call stopped during the handshake, which is what a stop does, so leaves a
socket open to the server until the garbage collector reaches it; with the collector tuned
for fewer pauses (cli.tune_garbage_collector) that can be minutes. Every outgoing client's
connections come through ``TlsSafeBackend``, whose streams close themselves when
``start_tls`` ends in anything but a TLS stream.
"""

from __future__ import annotations

import ssl

import trio
from httpcore2 import AsyncNetworkStream, TrioBackend

from server.providers.net.wrapped import WrappedStream, WrappingBackend


class TlsSafeStream(WrappedStream):
    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> AsyncNetworkStream:
        """The TLS stream; cancelled or failed, the TCP stream is closed first (its close
        shielded: it only releases the socket)."""
        try:
            return await self._inner.start_tls(ssl_context, server_hostname, timeout)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self._inner.aclose()
            raise


class TlsSafeBackend(WrappingBackend):
    """httpcore2's trio backend, its streams wrapped in ``TlsSafeStream``."""

    def __init__(self) -> None:
        super().__init__(TrioBackend())

    def wrap(self, stream: AsyncNetworkStream, *, tcp: bool) -> AsyncNetworkStream:
        return TlsSafeStream(stream)
