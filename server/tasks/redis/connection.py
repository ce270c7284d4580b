"""The connections to one Redis, shared by the store, admission and the cluster: a Redis at
a URL, or the primary that Redis Sentinel names."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass
from types import TracebackType
from typing import Any, TypeVar

import coredis
import coredis.exceptions
import trio
from coredis.connection import TCPLocation

from server.exception_groups import first_leaf
from server.library_internals import SlotKeepingPool, SlotKeepingSentinelPool
from server.tasks.redis import scripts
from server.tasks.redis.errors import TRANSIENT
from server.tasks.redis.keys import Keys

log = logging.getLogger("tether.redis")

# How often the sentinels are asked where the primary is.
PRIMARY_CHECK_S = 0.5
# What a primary that Sentinel demoted (or a new connection that reached a replica) answers.
PRIMARY_MOVED = (coredis.exceptions.ReadOnlyError, coredis.exceptions.StalePrimaryError)
# The pause before a command that Redis could not take (``TRANSIENT``) is sent again.
RESEND_PAUSE_S = 0.1

T = TypeVar("T")


@dataclass(frozen=True)
class Sentinels:
    """A primary found through Redis Sentinel: the sentinels' addresses, the name they
    monitor it by, their own password (if any), and the database on the primary."""

    addresses: tuple[tuple[str, int], ...]
    service: str
    password: str | None = None
    db: int = 0

    def __str__(self) -> str:
        where = ",".join(f"{host}:{port}" for host, port in self.addresses)
        return f"the primary {self.service!r} of the sentinels {where}"


# Where the Redis is: a URL (redis://host:port/db) or sentinels.
RedisTarget = str | Sentinels


class FollowingPrimary(coredis.Redis[str]):
    """A client of the primary that Sentinel names. After a failover, a connection to the
    old primary either died with it (the pool asks the sentinels where the primary is for
    every new connection, and drops the connections to the old one when the answer
    changes) or reaches a demoted primary, now a replica, that answers READONLY: then the
    pool's connections are dropped and the command is sent once more, to the primary the
    sentinels name now. A refused write changed nothing, so sending it again is safe."""

    async def execute_command(self, command: Any) -> Any:
        try:
            return await super().execute_command(command)
        except PRIMARY_MOVED:
            self.connection_pool.disconnect()
            return await super().execute_command(command)


def _client(target: RedisTarget, sentinel: coredis.Sentinel[str] | None, size: int) -> Any:
    if sentinel is None:
        assert isinstance(target, str)
        pool = SlotKeepingPool.from_url(target, decode_responses=True, max_connections=size)
        return coredis.Redis(connection_pool=pool, decode_responses=True)
    assert isinstance(target, Sentinels)
    return sentinel.primary_for(
        target.service,
        redis_class=FollowingPrimary,
        connection_pool_class=SlotKeepingSentinelPool,
        max_connections=size,
    )


def sentinel_manager(target: Sentinels, timeout_s: float) -> coredis.Sentinel[str]:
    """The clients of the sentinels (entered with ``async with``, as a Redis client is)."""
    return coredis.Sentinel(
        [TCPLocation(host, port) for host, port in target.addresses],
        sentinel_kwargs={
            "password": target.password,
            "connect_timeout": timeout_s,
            "stream_timeout": timeout_s,
        },
        decode_responses=True,
        db=target.db,
    )


class RedisConnection:
    """Two clients. Commands share a few multiplexed connections; a blocking read (a
    reader waiting on a log written elsewhere, the control stream) holds one of its own
    until it returns. Apart, a crowd of waiting readers can never leave the appends and
    the heartbeat without a connection. Their connections live while the connection is
    entered (``async with``, for as long as ``RedisCluster.serve`` runs)."""

    def __init__(
        self, target: RedisTarget, *, prefix: str, timeout_s: float, max_connections: int
    ) -> None:
        self.target = target
        self.keys = Keys(prefix)
        self.timeout_s = timeout_s
        self._sentinel = (
            sentinel_manager(target, timeout_s) if isinstance(target, Sentinels) else None
        )
        self.commands: coredis.Redis[str] = _client(target, self._sentinel, 64)
        self.waiting: coredis.Redis[str] = _client(target, self._sentinel, max_connections)
        self.reserve = self.commands.register_script(scripts.RESERVE)
        self.release = self.commands.register_script(scripts.RELEASE)
        self.create = self.commands.register_script(scripts.CREATE)
        self.append = self.commands.register_script(scripts.APPEND)
        self.finish = self.commands.register_script(scripts.FINISH)
        self.session = self.commands.register_script(scripts.SESSION)
        self._entered: AsyncExitStack | None = None

    @property
    def url(self) -> str:
        """Where the Redis is, for messages (no password)."""
        return str(self.target)

    async def follow_primary(self) -> None:
        """With sentinels: ask them where the primary is every ``PRIMARY_CHECK_S``, and
        drop the connections to the old one as soon as they name another. A primary the
        sentinels replaced while it was up (a forced failover, a partition that healed)
        goes on answering as one until they demote it, seconds later, and what is written
        there meanwhile is lost then; its READONLY once demoted is only the last resort.
        Without sentinels, returns at once; otherwise runs until cancelled."""
        pools = [
            client.connection_pool
            for client in (self.commands, self.waiting)
            if isinstance(client.connection_pool, coredis.SentinelConnectionPool)
        ]
        if not pools:
            return
        while True:
            await trio.sleep(PRIMARY_CHECK_S)
            for pool in pools:
                try:
                    await pool.get_primary_location()  # drops the pool's connections if moved
                except coredis.exceptions.RedisError as exc:
                    log.warning("asking the sentinels for the primary failed: %s", exc)

    async def through_failover(self, send: Callable[[], Awaitable[T]]) -> T:
        """``send()``, made again while Redis cannot be reached or a demoted primary
        refuses it (a failover under way), for ``timeout_s`` at most; for commands that
        may be sent twice. Raises what the last one raised."""
        deadline = trio.current_time() + self.timeout_s
        while True:
            try:
                return await send()
            except Exception as exc:  # coredis may wrap what it raises in a group
                leaf = first_leaf(exc)
                if not isinstance(leaf, TRANSIENT) or trio.current_time() >= deadline:
                    raise
                if isinstance(leaf, PRIMARY_MOVED):
                    self.primary_moved()
            await trio.sleep(RESEND_PAUSE_S)

    def primary_moved(self) -> None:
        """A write was refused as by a replica: drop every connection, so that the next
        command asks the sentinels where the primary is now. Synchronous."""
        self.commands.connection_pool.disconnect()
        self.waiting.connection_pool.disconnect()

    async def __aenter__(self) -> RedisConnection:
        async with AsyncExitStack() as stack:
            if self._sentinel is not None:
                await stack.enter_async_context(self._sentinel)
            await stack.enter_async_context(self.commands)
            await stack.enter_async_context(self.waiting)
            self._entered = stack.pop_all()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> bool | None:
        entered, self._entered = self._entered, None
        assert entered is not None
        return await entered.__aexit__(exc_type, exc, tb)
