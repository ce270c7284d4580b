"""Reading the logs of tasks run by other processes: reads, waits and watches.

A reader here of a task run elsewhere reads its stream; waiting for more is a blocking
``XREAD`` on a connection of its own (``RedisConnection.waiting``), and a watch is a task in
the cluster's nursery that tails the stream and reports each entry.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import trio

from server import fastjson
from server.events import Event
from server.tasks.redis.connection import RedisConnection
from server.tasks.redis.errors import RedisError, redis_errors
from server.tasks.redis.keys import decode_event

log = logging.getLogger("tether.redis")

_MAX_IDENTITIES = 10_000


class RemoteWatch:
    def __init__(self) -> None:
        self.scope = trio.CancelScope()

    def close(self) -> None:
        self.scope.cancel()


class Tailer:
    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn
        # chat_id and message_id of tasks read from Redis, which every event carries.
        self._identities: dict[str, tuple[str | None, str | None]] = {}
        # Where watches run: the cluster's nursery, while it serves.
        self.nursery: trio.Nursery | None = None

    def forget(self, task_id: str) -> None:
        self._identities.pop(task_id, None)

    async def read(self, task_id: str, after: int, limit: int | None = None) -> list[Event]:
        start = f"(0-{after}" if after > 0 else "-"
        with redis_errors():
            entries = await self._conn.commands.xrange(
                self._conn.keys.task(task_id).log, start, "+", count=limit
            )
            if not entries:
                return []
            chat_id, message_id = await self._identity(task_id)
        return [decode_event(task_id, chat_id, message_id, e) for e in entries]

    async def _identity(self, task_id: str) -> tuple[str | None, str | None]:
        known = self._identities.get(task_id)
        if known is None:
            raw = await self._conn.commands.hmget(
                self._conn.keys.task(task_id).rec, ["chat_id", "message_id"]
            )
            known = (
                fastjson.loads(raw[0]) if raw[0] else None,
                fastjson.loads(raw[1]) if raw[1] else None,
            )
            if len(self._identities) > _MAX_IDENTITIES:
                self._identities.clear()
            self._identities[task_id] = known
        return known

    async def _log_state(self, task_id: str) -> tuple[bool, bool, int]:
        """Whether the task exists, whether its log is closed, and its last seq."""
        raw = await self._conn.commands.hmget(
            self._conn.keys.task(task_id).rec, ["id", "closed", "last_seq"]
        )
        return raw[0] is not None, raw[1] is not None, int(raw[2] or 0)

    async def wait_beyond(self, task_id: str, after: int) -> bool:
        """See ``TaskStore.wait_beyond``; blocks on Redis, a connection held meanwhile."""
        log_key = self._conn.keys.task(task_id).log
        with redis_errors():
            while True:
                exists, closed, last = await self._log_state(task_id)
                if last > after:
                    return True
                if not exists or closed:
                    return False
                found = await self._conn.waiting.xread({log_key: f"0-{after}"}, count=1, block=5000)
                if found:
                    return True

    def watch(
        self, task_id: str, on_append: Callable[[Event], None], after: int = 0
    ) -> RemoteWatch | None:
        if self.nursery is None:
            return None
        remote = RemoteWatch()
        self.nursery.start_soon(self._tail, task_id, after, on_append, remote)
        return remote

    async def _tail(
        self, task_id: str, after: int, on_append: Callable[[Event], None], watch: RemoteWatch
    ) -> None:
        """Follow a log written elsewhere with blocking reads, until it ends or the
        watch is closed."""
        log_key = self._conn.keys.task(task_id).log
        cursor = after
        with watch.scope:
            try:
                chat_id, message_id = await self._identity(task_id)
                while True:
                    found = await self._conn.waiting.xread(
                        {log_key: f"0-{cursor}"}, count=256, block=5000
                    )
                    if not found:
                        exists, closed, last = await self._log_state(task_id)
                        if not exists or (closed and last <= cursor):
                            return
                        continue
                    for entry in found[log_key]:
                        event = decode_event(task_id, chat_id, message_id, entry)
                        cursor = event.seq
                        on_append(event)
                        if event.terminal:
                            return
            except RedisError as exc:
                log.warning("following task %s failed: %s", task_id, exc)
