"""An httpx2 client whose connections come from a network backend of ours.

httpcore2's network backend is its one plug-in point below HTTP: it makes the connections.
httpx2's transport does not take one, so the transport's pool is replaced by one built with
the backend (through the transport's private ``_pool``: httpx2 is pinned at the version this
was written against, 2.16.2). Everything above, HTTP/1.1 and TLS included, is httpx2's own.
"""

from __future__ import annotations

import httpcore2
import httpx2


def client_with_backend(backend: httpcore2.AsyncNetworkBackend, limits: httpx2.Limits,
                        timeout: httpx2.Timeout) -> httpx2.AsyncClient:
    """A client (redirects followed, no environment proxies) over ``backend``."""
    transport = httpx2.AsyncHTTPTransport(limits=limits, trust_env=False)
    transport._pool = httpcore2.AsyncConnectionPool(
        ssl_context=httpx2.create_ssl_context(trust_env=False),
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=backend,
    )
    return httpx2.AsyncClient(transport=transport, timeout=timeout, follow_redirects=True,
                              trust_env=False)
