"""Global admission: the places of active tasks, counted in Redis for every replica.

A reservation and its release are idempotent scripts on the ``{adm}`` keys; each replica's
places are listed under it (``owned:<replica>``), so that a reaper can free a dead one's.
"""

from __future__ import annotations

import logging
from typing import Any

from server.record import TaskRecord
from server.tasks.redis.connection import RedisConnection
from server.tasks.redis.errors import RedisError, redis_errors

log = logging.getLogger("tether.redis")


class RedisAdmission:
    def __init__(
        self, conn: RedisConnection, replica_id: str, *, retention_s: float, max_retained: int
    ) -> None:
        self._conn = conn
        self._replica_id = replica_id
        self._retention_ms = max(1, int(retention_s * 1000))
        self._max_retained = max_retained

    async def reserve(self, record: TaskRecord, *, max_total: int, max_per_user: int) -> bool:
        keys = self._conn.keys
        with redis_errors():
            reserved: Any = await self._conn.reserve(
                keys=[
                    keys.adm("counts"),
                    keys.adm(f"owned:{self._replica_id}"),
                    keys.user_tasks(record.user),
                    keys.adm("replicas"),
                ],
                args=[record.id, record.user, str(max_total), str(max_per_user), self._replica_id],
            )
        return bool(reserved)

    async def release(self, record: TaskRecord) -> None:
        await self.release_place(record.id, record.user, self._replica_id)

    async def release_place(self, task_id: str, user: str, replica: str) -> list[str]:
        """Free the place ``replica`` holds for the task (a dead replica's, when reaped),
        and start the task's retention in the indexes. Returns the retained tasks past
        ``TETHER_MAX_RETAINED_TASKS``, oldest first, for the caller to delete. A failure is
        logged: the place waits for the next release or reaping."""
        keys = self._conn.keys
        try:
            evicted: Any = await self._conn.release(
                keys=[
                    keys.adm("counts"),
                    keys.adm(f"owned:{replica}"),
                    keys.adm("ended"),
                    keys.user_tasks(user),
                ],
                args=[task_id, str(self._retention_ms), str(self._max_retained), user],
            )
        except RedisError as exc:
            log.warning("could not release the place of %s: %s", task_id, exc)
            return []
        return [str(t) for t in evicted or ()]

    async def counts(self) -> tuple[int, dict[str, int]]:
        with redis_errors():
            raw = await self._conn.commands.hgetall(self._conn.keys.adm("counts"))
        per_user = {k[2:]: int(v) for k, v in raw.items() if k.startswith("u:")}
        return int(raw.get("*", 0)), per_user
