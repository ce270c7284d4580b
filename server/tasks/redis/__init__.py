"""The Redis task backend: one task space shared by every process and replica.

Its parts: ``keys`` (the layout and how records and events are written), ``scripts`` (the
Lua steps, each on one hash slot), ``connection`` (the clients), ``errors`` (Redis failing,
mapped once), ``writer`` (appends written behind), ``tailing`` (reading logs written
elsewhere), ``store``, ``admission`` and ``replicas`` (the cluster: heartbeats, control
streams, reaping and sessions).
"""

from __future__ import annotations

from dataclasses import dataclass

import trio

from server.exception_groups import first_leaf
from server.tasks.backend import new_replica_id
from server.tasks.redis.admission import RedisAdmission
from server.tasks.redis.connection import RedisConnection, RedisTarget, Sentinels
from server.tasks.redis.replicas import RedisCluster
from server.tasks.redis.store import RedisStore


@dataclass(frozen=True)
class RedisBackend:
    store: RedisStore
    admission: RedisAdmission
    cluster: RedisCluster

    @property
    def replica_id(self) -> str:
        return self.cluster.replica_id


def redis_backend(
    target: RedisTarget,
    *,
    prefix: str = "tether",
    replica_id: str | None = None,
    retention_s: float = 600.0,
    max_retained: int = 20_000,
    replica_ttl_s: float = 10.0,
    timeout_s: float = 5.0,
    max_connections: int = 1000,
    mode: str = "auto",
    follow_reads: int = 32,
) -> RedisBackend:
    """A task space in the Redis at ``target`` (a URL, or the primary that sentinels
    name), under ``prefix``; it connects when its cluster serves."""
    replica = replica_id or new_replica_id()
    conn = RedisConnection(
        target,
        prefix=prefix,
        timeout_s=timeout_s,
        max_connections=max_connections,
        mode=mode,
        follow_reads=follow_reads,
    )
    admission = RedisAdmission(conn, replica, retention_s=retention_s, max_retained=max_retained)
    store = RedisStore(conn, admission, replica, retention_s=retention_s)
    cluster = RedisCluster(
        conn, store, admission, replica, replica_ttl_s=replica_ttl_s, retention_s=retention_s
    )
    return RedisBackend(store=store, admission=admission, cluster=cluster)


async def ping(target: RedisTarget, timeout_s: float = 5.0) -> str | None:
    """Why the Redis at ``target`` cannot be used, or None if it answers a PING."""
    try:
        with trio.fail_after(timeout_s):
            async with RedisConnection(
                target, prefix="", timeout_s=timeout_s, max_connections=1
            ) as conn:
                await conn.commands.ping()
    except trio.TooSlowError:
        return f"no answer in {timeout_s:.0f} s"
    except Exception as exc:  # noqa: BLE001 - coredis wraps what it raises in groups
        leaf = first_leaf(exc)
        return str(leaf) or type(leaf).__name__
    return None


__all__ = ["RedisBackend", "RedisTarget", "Sentinels", "ping", "redis_backend"]
