"""The connections to one Redis (a server, or a Redis Cluster through any of its nodes),
shared by the store, admission and the cluster."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar
from urllib.parse import urlsplit

import coredis
import trio
from coredis.connection import TCPLocation

from server.library_internals import (
    SlotKeepingClusterPool,
    SlotKeepingPool,
    report_cluster_failure,
)
from server.tasks.redis import scripts
from server.tasks.redis.errors import TRANSIENT
from server.tasks.redis.keys import Keys, hash_slot

Client = coredis.Redis[str] | coredis.RedisCluster[str]
T = TypeVar("T")


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


def build_client(url: str, mode: str, max_connections: int) -> Client:
    """A client for the Redis at ``url``, as ``mode`` (``single`` or ``cluster``) says: the
    one place clients are made. On a cluster, ``max_connections`` holds per node: a
    blocking read holds a connection to the node that serves its slot."""
    if mode == "cluster":
        parsed = urlsplit(url)
        return coredis.RedisCluster(
            connection_pool=SlotKeepingClusterPool.from_url(
                url,
                startup_nodes=[TCPLocation(parsed.hostname or "127.0.0.1", parsed.port or 6379)],
                decode_responses=True,
                max_connections=max_connections,
                max_connections_per_node=True,
            ),
            decode_responses=True,
        )
    return coredis.Redis(
        connection_pool=SlotKeepingPool.from_url(
            url, decode_responses=True, max_connections=max_connections
        ),
        decode_responses=True,
    )


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


class RedisConnection:
    """Two clients. Commands share a few multiplexed connections; a blocking read (a
    reader waiting on a log written elsewhere, the control stream) holds one of its own
    until it returns. Apart, a crowd of waiting readers can never leave the appends and
    the heartbeat without a connection. They are made by ``open`` (cluster or not is
    known then) and their connections live while the cluster serves
    (``RedisCluster.serve``)."""

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
        url: str,
        *,
        prefix: str,
        timeout_s: float,
        max_connections: int,
        mode: str = "auto",
    ) -> None:
        self.url = url
        self.keys = Keys(prefix)
        self.timeout_s = timeout_s
        self.mode = mode
        self._max_connections = max_connections

    @property
    def clustered(self) -> bool:
        return self.mode == "cluster"

    async def open(self) -> None:
        """Learn whether the Redis is a cluster (if the mode is ``auto``), and make the
        clients. Raises ``RedisError`` or ``trio.TooSlowError`` if the Redis does not
        answer."""
        if self.mode == "auto":
            self.mode = await detect_mode(self.url, self.timeout_s)
        self.commands = build_client(self.url, self.mode, 64)
        self.waiting = build_client(self.url, self.mode, self._max_connections)
        self.reserve = OneSlotScript(self.commands, scripts.RESERVE)
        self.release = OneSlotScript(self.commands, scripts.RELEASE)
        self.create = OneSlotScript(self.commands, scripts.CREATE)
        self.append = OneSlotScript(self.commands, scripts.APPEND)
        self.finish = OneSlotScript(self.commands, scripts.FINISH)
        self.session = OneSlotScript(self.commands, scripts.SESSION)

    def slot_group(self, key: str) -> int | None:
        """Which keys one command may take together: on a cluster, those of one hash
        slot; on one server, all (None)."""
        return hash_slot(key) if self.clustered else None

    def noticed(self, failure: BaseException) -> None:
        """Tell the clients of a failure seen outside their own retries (a pipeline's),
        so that a cluster client looks for a new primary (see report_cluster_failure)."""
        if isinstance(failure, Exception):
            for client in (self.commands, self.waiting):
                if isinstance(client, coredis.RedisCluster):
                    report_cluster_failure(client, failure)

    async def through_failover(
        self, call: Callable[[], Awaitable[T]], within_s: float | None = None
    ) -> T:
        """``call()``, made again after a pause (growing to 0.5 s) while it fails in a
        way a moment may cure (``TRANSIENT``: a Redis Cluster failing over or moving a
        slot), for at most ``within_s`` (``timeout_s`` if None); then its failure is
        raised. For steps that are safe to repeat. Cancelling it cancels the call or the
        pause."""
        deadline = trio.current_time() + (self.timeout_s if within_s is None else within_s)
        pause = 0.05
        while True:
            try:
                return await call()
            except TRANSIENT as exc:
                self.noticed(exc)
                if trio.current_time() + pause > deadline:
                    raise
            await trio.sleep(pause)
            pause = min(2 * pause, 0.5)
