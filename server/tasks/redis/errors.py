"""Redis failing, as the rest of the server sees it: ``BackendUnavailable`` (a 503 to an
HTTP caller, a failed task to a running one), never a coredis exception."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import coredis.exceptions
import trio

from server.tasks.errors import BackendUnavailable

RedisError = coredis.exceptions.RedisError

# Failures that a moment's wait may cure: a connection lost, a Redis Cluster moving a slot
# (MOVED, ASK, TRYAGAIN) or failing over (CLUSTERDOWN, READONLY from a demoted primary),
# or coredis giving up its own redirections ("Maximum retries exhausted").
TRANSIENT: tuple[type[BaseException], ...] = (
    coredis.exceptions.ConnectionError,
    TimeoutError,
    coredis.exceptions.ClusterError,
    coredis.exceptions.ClusterDownError,
    coredis.exceptions.AskError,
    coredis.exceptions.TryAgainError,
    coredis.exceptions.ReadOnlyError,
)


@contextmanager
def redis_errors() -> Iterator[None]:
    """Map a Redis failure inside the block to ``BackendUnavailable``."""
    try:
        yield
    except RedisError as exc:
        raise BackendUnavailable(f"Redis failed: {exc}") from exc


T = TypeVar("T")


async def through_failover(call: Callable[[], Awaitable[T]], within_s: float) -> T:
    """``call()``, made again after a pause (growing to 0.5 s) while it fails in a way a
    moment may cure (``TRANSIENT``: a Redis Cluster failing over or moving a slot), for at
    most ``within_s``; then its failure is raised. For steps that are safe to repeat.
    Cancelling it cancels the call or the pause."""
    deadline = trio.current_time() + within_s
    pause = 0.05
    while True:
        try:
            return await call()
        except TRANSIENT:
            if trio.current_time() + pause > deadline:
                raise
        await trio.sleep(pause)
        pause = min(2 * pause, 0.5)
