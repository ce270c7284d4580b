"""An httpx2 client whose connections come from a network backend of ours, spread over a
few connection pools.

httpcore2's network backend is its one plug-in point below HTTP: it makes the connections.
httpx2's transport does not take one, so the transport's pool is replaced by one built with
the backend (``library_internals.replace_pool``, which holds that private touch and its
version check). Everything above, HTTP/1.1 and TLS included, is httpx2's own.

Each request that starts or ends makes httpcore2's pool walk all its connections and queued
requests once (``_assign_requests_to_connections``, probing the socket of each idle one).
With hundreds of requests in flight that walk was an eighth of the server's CPU in the
bench's cancel storm, so a client with a large connection limit has several pools of at
most ``_CONNECTIONS_PER_POOL`` connections each, filled in order: a request goes to the
first pool with fewer than ``_FILL`` requests in flight. At low load that is always the
first one, so requests one after another reuse one connection (and its TLS session); under
load the others take the overflow, each keeping its share of idle connections. httpcore
closes an expired idle connection only when a request passes through its pool, so a pool
that has had no request for longer than the keep-alive expiry has its idle connections
closed here, at the next request to another pool.
"""

from __future__ import annotations

import math
import ssl
import time
from types import TracebackType

import httpcore2
import httpx2
import trio

from server.library_internals import pool_connections, pool_in_flight, replace_pool
from server.tracing import send_trace_context

_CONNECTIONS_PER_POOL = 100
_MAX_POOLS = 16
# Requests in flight in a pool before the next pool takes the overflow.
_FILL = 25


class _PoolsFilledInOrder(httpx2.AsyncBaseTransport):
    """Requests go to the first transport with fewer than ``_FILL`` requests in flight
    (all full: the one with the fewest). Idle connections of a transport unused for longer
    than ``expiry`` are closed."""

    def __init__(self, transports: list[httpx2.AsyncHTTPTransport], expiry: float | None) -> None:
        self._transports = transports
        self._expiry = expiry
        self._last_used = [0.0] * len(transports)

    async def handle_async_request(self, request: httpx2.Request) -> httpx2.Response:
        loads = [pool_in_flight(t) for t in self._transports]
        chosen = next((i for i, load in enumerate(loads) if load < _FILL), None)
        if chosen is None:
            chosen = loads.index(min(loads))
        now = time.monotonic()
        self._last_used[chosen] = now
        if self._expiry is not None:
            for i, transport in enumerate(self._transports):
                if i != chosen and loads[i] == 0 and now - self._last_used[i] > self._expiry:
                    await _close_idle(transport)
        return await self._transports[chosen].handle_async_request(request)

    async def __aenter__(self) -> _PoolsFilledInOrder:
        for transport in self._transports:
            await transport.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None = None,
        exc_value: BaseException | None = None,
        traceback: TracebackType | None = None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        for transport in self._transports:
            await transport.aclose()


async def _close_idle(transport: httpx2.AsyncHTTPTransport) -> None:
    """Close the pool's idle connections (the pool drops closed ones at its next request).
    Shielded: it only releases sockets, and a request cancelled meanwhile must not leave
    one half closed."""
    with trio.CancelScope(shield=True):
        for connection in pool_connections(transport):
            if connection.is_idle():
                await connection.aclose()


def _transport(
    backend: httpcore2.AsyncNetworkBackend,
    ssl_context: ssl.SSLContext,
    max_connections: int | None,
    max_keepalive: int | None,
    keepalive_expiry: float | None,
) -> httpx2.AsyncHTTPTransport:
    transport = httpx2.AsyncHTTPTransport(verify=ssl_context, trust_env=False)
    replace_pool(
        transport,
        httpcore2.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=max_connections,
            max_keepalive_connections=max_keepalive,
            keepalive_expiry=keepalive_expiry,
            network_backend=backend,
        ),
    )
    return transport


def client_with_backend(
    backend: httpcore2.AsyncNetworkBackend,
    limits: httpx2.Limits,
    timeout: httpx2.Timeout,
    *,
    traced: bool = False,
) -> httpx2.AsyncClient:
    """A client (redirects followed, no environment proxies) over ``backend``, its
    connection limits shared out between its pools. ``traced``: each request carries a
    ``traceparent`` header for the span it is sent in (untraced, no hook at all)."""
    total, keepalive = limits.max_connections, limits.max_keepalive_connections
    pools = (
        1 if total is None else min(_MAX_POOLS, max(1, math.ceil(total / _CONNECTIONS_PER_POOL)))
    )
    ssl_context = httpx2.create_ssl_context(trust_env=False)  # loads the CA bundle: once
    transports = [
        _transport(
            backend,
            ssl_context,
            None if total is None else math.ceil(total / pools),
            None if keepalive is None else math.ceil(keepalive / pools),
            limits.keepalive_expiry,
        )
        for _ in range(pools)
    ]
    transport: httpx2.AsyncBaseTransport = (
        transports[0] if pools == 1 else _PoolsFilledInOrder(transports, limits.keepalive_expiry)
    )
    return httpx2.AsyncClient(
        transport=transport,
        timeout=timeout,
        follow_redirects=True,
        trust_env=False,
        event_hooks={"request": [send_trace_context]} if traced else None,
    )
