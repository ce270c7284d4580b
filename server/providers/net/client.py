"""An httpx2 client whose connections come from a network backend of ours, spread over a
few connection pools.

httpcore2's network backend is its one plug-in point below HTTP: it makes the connections.
httpx2's transport does not take one, so the transport's pool is replaced by one built with
the backend (through the transport's private ``_pool``: httpx2 is pinned at the version this
was written against, 2.16.2). Everything above, HTTP/1.1 and TLS included, is httpx2's own.

Each request that starts or ends makes httpcore2's pool walk all its connections and queued
requests once (``_assign_requests_to_connections``, probing the socket of each idle one).
With hundreds of requests in flight that walk was an eighth of the server's CPU in the
bench's cancel storm, so a client with a large connection limit spreads its requests, in
turn, over several pools of at most ``_CONNECTIONS_PER_POOL`` connections each; each pool
keeps its share of the idle connections.
"""

from __future__ import annotations

import math
import ssl
from types import TracebackType

import httpcore2
import httpx2

_CONNECTIONS_PER_POOL = 100
_MAX_POOLS = 16


class _PoolsInTurn(httpx2.AsyncBaseTransport):
    """Requests handed to several transports in turn."""

    def __init__(self, transports: list[httpx2.AsyncHTTPTransport]) -> None:
        self._transports = transports
        self._next = 0

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        transport = self._transports[self._next]
        self._next = (self._next + 1) % len(self._transports)
        return await transport.handle_async_request(request)

    async def __aenter__(self) -> _PoolsInTurn:
        for transport in self._transports:
            await transport.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None = None,
                        exc_value: BaseException | None = None,
                        traceback: TracebackType | None = None) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for transport in self._transports:
            await transport.aclose()


def _transport(backend: httpcore2.AsyncNetworkBackend, ssl_context: ssl.SSLContext,
               max_connections: int | None, max_keepalive: int | None,
               keepalive_expiry: float | None) -> httpx2.AsyncHTTPTransport:
    transport = httpx2.AsyncHTTPTransport(verify=ssl_context, trust_env=False)
    transport._pool = httpcore2.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=max_connections,
        max_keepalive_connections=max_keepalive,
        keepalive_expiry=keepalive_expiry,
        network_backend=backend,
    )
    return transport


def client_with_backend(backend: httpcore2.AsyncNetworkBackend, limits: httpx2.Limits,
                        timeout: httpx2.Timeout) -> httpx2.AsyncClient:
    """A client (redirects followed, no environment proxies) over ``backend``, its
    connection limits shared out between its pools."""
    total, keepalive = limits.max_connections, limits.max_keepalive_connections
    pools = 1 if total is None else min(_MAX_POOLS, max(1, math.ceil(
        total / _CONNECTIONS_PER_POOL)))
    ssl_context = httpx2.create_ssl_context(trust_env=False)  # loads the CA bundle: once
    transports = [
        _transport(backend, ssl_context,
                   None if total is None else math.ceil(total / pools),
                   None if keepalive is None else math.ceil(keepalive / pools),
                   limits.keepalive_expiry)
        for _ in range(pools)
    ]
    transport: httpx2.AsyncBaseTransport = (
        transports[0] if pools == 1 else _PoolsInTurn(transports))
    return httpx2.AsyncClient(transport=transport, timeout=timeout, follow_redirects=True,
                              trust_env=False)
