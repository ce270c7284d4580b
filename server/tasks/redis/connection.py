"""The connections to one Redis, shared by the store, admission and the cluster: one
server at a URL, a Redis Cluster through any of its nodes, or the primary that Redis
Sentinel names."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import coredis
import coredis.exceptions
import trio
from coredis.connection import TCPLocation

from server.exception_groups import first_leaf
from server.library_internals import (
    SlotKeepingClusterPool,
    SlotKeepingPool,
    SlotKeepingSentinelPool,
    report_cluster_failure,
)
from server.tasks.redis import scripts
from server.tasks.redis.errors import TRANSIENT
from server.tasks.redis.keys import Keys, hash_slot

Client = coredis.Redis[str] | coredis.RedisCluster[str]
T = TypeVar("T")

log = logging.getLogger("tether.redis")

# How often the sentinels are asked where the primary is.
PRIMARY_CHECK_S = 0.5
# What a primary that Sentinel demoted (or a new connection that reached a replica) answers.
PRIMARY_MOVED = (coredis.exceptions.ReadOnlyError, coredis.exceptions.StalePrimaryError)


class CrossSlot(ValueError):
    """A script was about to be sent with keys of more than one hash slot (a bug: a Redis
    Cluster would refuse it with CROSSSLOT, and one server would not run it whole)."""


def one_slot(keys: list[str]) -> int | None:
    """The one hash slot of ``keys`` (None for none); raises ``CrossSlot`` otherwise."""
    slots = {hash_slot(key) for key in keys}
    if len(slots) > 1:
        raise CrossSlot(f"a script's keys span hash slots {sorted(slots)}: {keys}")
    return next(iter(slots), None)


async def detect_mode(url: str, timeout_s: float) -> str:
    """``cluster`` if the server at ``url`` runs with cluster mode on (``INFO cluster``),
    else ``single``. Raises what coredis raises (``RedisError``), or ``trio.TooSlowError``
    past ``timeout_s``; cancelling it closes its connection."""
    probe = coredis.Redis.from_url(url, decode_responses=True)
    with trio.fail_after(timeout_s):
        async with probe:
            found = await probe.info("cluster")
    return "cluster" if str(found.get("cluster_enabled", 0)) == "1" else "single"


class OneSlotScript:
    """A registered script whose every call is checked to touch keys of one hash slot
    before it is sent (on one server as on a cluster: a single-server run catches a call
    site that would fail on a cluster)."""

    def __init__(self, client: Client, source: str) -> None:
        self._script = client.register_script(source)
        self.sha = self._script.sha
        self.calls = 0

    def check(self, keys: list[str]) -> None:
        """Count a call of the script with ``keys`` (sent here, or in a pipeline); raises
        ``CrossSlot`` if they span hash slots."""
        one_slot(keys)
        self.calls += 1

    async def __call__(self, *, keys: list[str], args: list[str]) -> Any:
        self.check(keys)
        return await self._script(keys=keys, args=args)


@dataclass(frozen=True)
class Sentinels:
    """A primary found through Redis Sentinel: the sentinels' addresses, the name they
    monitor it by, their own password (if any), the database on the primary, and the
    primary's password and ACL user (if any)."""

    addresses: tuple[tuple[str, int], ...]
    service: str
    password: str | None = field(default=None, repr=False)
    db: int = 0
    primary_password: str | None = field(default=None, repr=False)
    primary_username: str | None = None

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
        password=target.primary_password,
        username=target.primary_username,
    )


def build_client(
    target: RedisTarget, mode: str, max_connections: int, sentinel: coredis.Sentinel[str] | None
) -> Client:
    """A client for the Redis at ``target``: the one place clients are made. A URL is one
    server or, as ``mode`` says, a Redis Cluster (``max_connections`` then holds per node:
    a blocking read holds a connection to the node that serves its slot); sentinels name
    the primary, followed through a failover (``FollowingPrimary``)."""
    if isinstance(target, Sentinels):
        assert sentinel is not None
        return sentinel.primary_for(
            target.service,
            redis_class=FollowingPrimary,
            connection_pool_class=SlotKeepingSentinelPool,
            max_connections=max_connections,
        )
    if mode == "cluster":
        parsed = urlsplit(target)
        return coredis.RedisCluster(
            connection_pool=SlotKeepingClusterPool.from_url(
                target,
                startup_nodes=[TCPLocation(parsed.hostname or "127.0.0.1", parsed.port or 6379)],
                decode_responses=True,
                max_connections=max_connections,
                max_connections_per_node=True,
            ),
            decode_responses=True,
        )
    return coredis.Redis(
        connection_pool=SlotKeepingPool.from_url(
            target, decode_responses=True, max_connections=max_connections
        ),
        decode_responses=True,
    )


class RedisConnection:
    """Two clients. Commands share a few multiplexed connections; a blocking read (a
    reader waiting on a log written elsewhere, the control stream) holds one of its own
    until it returns. Apart, a crowd of waiting readers can never leave the appends and
    the heartbeat without a connection. They are made by ``open`` (whether a URL names a
    cluster is known then), and their connections live while the connection is entered
    (``async with``, for as long as ``RedisCluster.serve`` runs)."""

    commands: Client
    waiting: Client
    reserve: OneSlotScript
    release: OneSlotScript
    create: OneSlotScript
    append: OneSlotScript
    finish: OneSlotScript
    session: OneSlotScript

    def __init__(
        self,
        target: RedisTarget,
        *,
        prefix: str,
        timeout_s: float,
        max_connections: int,
        mode: str = "auto",
        follow_reads: int = 32,
    ) -> None:
        self.target = target
        # On a cluster: the blocking reads of followed tasks held at once (``Tailer``).
        self.follow_reads = max(1, follow_reads)
        self.keys = Keys(prefix)
        self.timeout_s = timeout_s
        # Behind sentinels, one server (the primary): never a cluster.
        self.mode = "single" if isinstance(target, Sentinels) else mode
        self._max_connections = max_connections
        self._sentinel = (
            sentinel_manager(target, timeout_s) if isinstance(target, Sentinels) else None
        )
        self._entered: AsyncExitStack | None = None
        self._opened = False

    @property
    def url(self) -> str:
        """Where the Redis is, for messages (no password)."""
        return str(self.target)

    @property
    def clustered(self) -> bool:
        return self.mode == "cluster"

    async def open(self) -> None:
        """Learn whether the Redis is a cluster (if the mode is ``auto``), and make the
        clients. Raises ``RedisError`` or ``trio.TooSlowError`` if the Redis does not
        answer."""
        if self.mode == "auto":
            assert isinstance(self.target, str)
            self.mode = await detect_mode(self.target, self.timeout_s)
        self.commands = build_client(self.target, self.mode, 64, self._sentinel)
        self.waiting = build_client(self.target, self.mode, self._max_connections, self._sentinel)
        self.reserve = OneSlotScript(self.commands, scripts.RESERVE)
        self.release = OneSlotScript(self.commands, scripts.RELEASE)
        self.create = OneSlotScript(self.commands, scripts.CREATE)
        self.append = OneSlotScript(self.commands, scripts.APPEND)
        self.finish = OneSlotScript(self.commands, scripts.FINISH)
        self.session = OneSlotScript(self.commands, scripts.SESSION)
        self._opened = True

    def slot_group(self, key: str) -> int | None:
        """Which keys one command may take together: on a cluster, those of one hash
        slot; on one server, all (None)."""
        return hash_slot(key) if self.clustered else None

    def noticed(self, failure: BaseException) -> None:
        """Tell the clients of a failure seen outside their own retries (a pipeline's):
        a cluster client looks for a new primary (see report_cluster_failure), and a
        primary that refused a write as a replica does (see ``primary_moved``)."""
        leaf = first_leaf(failure)
        if isinstance(leaf, PRIMARY_MOVED):
            self.primary_moved()
        if isinstance(leaf, Exception):
            for client in (self.commands, self.waiting):
                if isinstance(client, coredis.RedisCluster):
                    report_cluster_failure(client, leaf)

    async def through_failover(
        self, call: Callable[[], Awaitable[T]], within_s: float | None = None
    ) -> T:
        """``call()``, made again after a pause (growing to 0.5 s) while it fails in a
        way a moment may cure (``TRANSIENT``: a connection lost, a Redis Cluster failing
        over or moving a slot, a primary that Sentinel replaced), for at most
        ``within_s`` (``timeout_s`` if None); then its failure is raised. For steps that
        are safe to repeat. Cancelling it cancels the call or the pause."""
        deadline = trio.current_time() + (self.timeout_s if within_s is None else within_s)
        pause = 0.05
        while True:
            try:
                return await call()
            except Exception as exc:  # coredis may wrap what it raises in a group
                if not isinstance(first_leaf(exc), TRANSIENT):
                    raise
                self.noticed(exc)
                if trio.current_time() + pause > deadline:
                    raise
            await trio.sleep(pause)
            pause = min(2 * pause, 0.5)

    def primary_moved(self) -> None:
        """A write was refused as by a replica: drop every connection, so that the next
        command asks the sentinels where the primary is now. Synchronous."""
        self.commands.connection_pool.disconnect()
        self.waiting.connection_pool.disconnect()

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

    async def __aenter__(self) -> RedisConnection:
        if not self._opened:
            await self.open()
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
