"""Redis failing, as the rest of the server sees it: ``BackendUnavailable`` (a 503 to an
HTTP caller, a failed task to a running one), never a coredis exception."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import coredis.exceptions

from server.tasks.errors import BackendUnavailable

RedisError = coredis.exceptions.RedisError

# Failures that a moment's wait may cure, rather than refusals: a connection lost, a Redis
# Cluster moving a slot (MOVED, ASK, TRYAGAIN) or failing over (CLUSTERDOWN), coredis
# giving up its own redirections ("Maximum retries exhausted"), and a primary replaced
# (READONLY from a demoted one, a new connection that reached a replica: Sentinel).
TRANSIENT: tuple[type[BaseException], ...] = (
    coredis.exceptions.ConnectionError,
    TimeoutError,
    coredis.exceptions.ClusterError,
    coredis.exceptions.ClusterDownError,
    coredis.exceptions.AskError,
    coredis.exceptions.TryAgainError,
    coredis.exceptions.ReadOnlyError,
    coredis.exceptions.StalePrimaryError,
)


@contextmanager
def redis_errors() -> Iterator[None]:
    """Map a Redis failure inside the block to ``BackendUnavailable``."""
    try:
        yield
    except RedisError as exc:
        raise BackendUnavailable(f"Redis failed: {exc}") from exc
