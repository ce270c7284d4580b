"""Records and logs in Redis, with a local copy of the tasks this process runs.

The tasks this process runs are also kept in a local in-memory store: their readers and
watchers here are served from memory as soon as an event is appended, with no round trip,
and only readers of tasks run elsewhere read Redis (``Tailer``). Appends are written
behind (``WriteBehind``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, cast

from server import fastjson
from server.events import Event, EventType, record_changes, terminal_type
from server.record import TaskRecord
from server.tasks.backend import LogWatch
from server.tasks.errors import BackendUnavailable
from server.tasks.memory import MemoryStore
from server.tasks.redis.admission import RedisAdmission
from server.tasks.redis.connection import RedisConnection
from server.tasks.redis.errors import RedisError, redis_errors
from server.tasks.redis.keys import decode_record, encode_fields
from server.tasks.redis.tailing import Tailer
from server.tasks.redis.writer import WriteBehind

log = logging.getLogger("tether.redis")


class RedisStore:
    def __init__(
        self,
        conn: RedisConnection,
        admission: RedisAdmission,
        replica_id: str,
        *,
        retention_s: float,
    ) -> None:
        self._conn = conn
        self._keys = conn.keys
        self._admission = admission
        self._replica_id = replica_id
        self._retention_ms = max(1, int(retention_s * 1000))
        self._local = MemoryStore()
        self.writer = WriteBehind(conn)
        self.tailer = Tailer(conn)
        # Tasks that ended here while Redis did not take their terminal event: Redis shows
        # them running under this live replica, which no reaper ends. Written again by
        # ``write_unwritten_ends`` once Redis answers.
        self._unwritten_ends: dict[str, TaskRecord] = {}

    async def create(self, record: TaskRecord) -> None:
        keys = self._keys.task(record.id)
        record.last_seq = 1  # the task:queued event the create script writes
        with redis_errors():
            await self._conn.create(
                keys=[keys.rec, keys.log],
                args=["{}", *encode_fields(record, owner=self._replica_id)],
            )
        await self._local.create(record)

    async def save(self, record: TaskRecord) -> None:
        fields = encode_fields(record)
        # last_seq is the append script's to move: a save racing an append must not
        # move it back.
        index = fields.index("last_seq")
        del fields[index : index + 2]
        mapping = dict(zip(fields[::2], fields[1::2], strict=True))
        with redis_errors():
            await self._conn.through_failover(
                partial(self._conn.commands.hset, self._keys.task(record.id).rec, mapping)
            )
        await self._local.save(record)

    async def get(self, task_id: str) -> TaskRecord | None:
        local = await self._local.get(task_id)
        if local is not None:
            return local
        return (await self.load([task_id]))[0]

    async def load(self, task_ids: list[str]) -> list[TaskRecord | None]:
        """The records as Redis holds them (None for a task it does not hold)."""
        with redis_errors():
            results = await self._conn.through_failover(partial(self._load, task_ids))
        out: list[TaskRecord | None] = []
        for i in range(len(task_ids)):
            raw, content, reasoning, sources = results[4 * i : 4 * i + 4]
            out.append(decode_record(cast(dict[str, str], raw), content, reasoning, sources))
        return out

    async def _load(self, task_ids: list[str]) -> list[Any]:
        # Not a transaction: on a cluster the tasks' keys live in many slots, and the
        # pipeline sends each node the commands of its slots.
        async with self._conn.commands.pipeline(transaction=False) as pipe:
            for task_id in task_ids:
                keys = self._keys.task(task_id)
                pipe.hgetall(keys.rec)
                pipe.get(keys.content)
                pipe.get(keys.reasoning)
                pipe.lrange(keys.sources, 0, -1)
        return list(pipe.results or ())

    async def list_tasks(
        self,
        user: str,
        *,
        chat_id: str | None = None,
        session_id: str | None = None,
        include_finished: bool = False,
    ) -> list[TaskRecord]:
        index = self._keys.adm(f"user:{user}")
        with redis_errors():
            task_ids = sorted(await self._conn.commands.smembers(index))
        records = await self.load(task_ids) if task_ids else []
        gone = [t for t, r in zip(task_ids, records, strict=True) if r is None]
        if gone:
            with redis_errors():
                await self._conn.commands.srem(index, gone)
        found = [
            r
            for r in records
            if r is not None
            and r.user == user
            and (include_finished or r.active)
            and (chat_id is None or r.chat_id == chat_id)
            and (session_id is None or r.session_id == session_id)
        ]
        return sorted(found, key=lambda r: r.created_at)

    # -- the log -----------------------------------------------------------------------------

    async def append(self, record: TaskRecord, type_: EventType, data: dict[str, Any]) -> Event:
        """Append to the local copy at once (readers here see the event as they would on
        the memory backend) and queue the write to Redis for the next pipeline; the task
        does not wait for Redis's answer. Each task's writes go out in order. A write that
        Redis refused (the log closed elsewhere, the task lost in a restart, Redis down)
        fails the task's next append, so the task ends at once; readers here may then have
        seen one event that Redis never got. Waits only while Redis is too far behind;
        cancelled then, it writes nothing."""
        failure = self.writer.failure(record.id)
        if failure is not None:
            raise failure
        await self.writer.wait_for_room()
        content, reasoning, source = record_changes(type_, data)
        self.writer.queue(
            record.id,
            self._keys.task(record.id).all(),
            [
                str(record.last_seq + 1),
                type_,
                fastjson.dumps(data),
                content,
                reasoning,
                "" if source is None else fastjson.dumps(source),
            ],
        )
        return await self._local.append(record, type_, data)

    async def finish(self, record: TaskRecord) -> Event | None:
        # Listed until Redis has the end: if Redis fails, or the manager's budget for the
        # end runs out first, write_unwritten_ends writes it later.
        self._unwritten_ends[record.id] = record
        # The end goes after the task's last event. Both steps are bounded so that the
        # local copy is ended within the manager's budget for the end (timeout_s) even
        # when Redis is away.
        try:
            await self.writer.flushed(record.id, self._conn.timeout_s / 2)
            written = await self._conn.through_failover(
                partial(self.end, record, self._replica_id), self._conn.timeout_s / 3
            )
        except RedisError as exc:
            # Readers here still see the task end; the end is written to Redis later.
            await self._finish_locally(record)
            raise BackendUnavailable(f"Redis failed: {exc}") from exc
        except BaseException:
            # Cancelled (the manager's budget for the end ran out): the same, and the
            # local end has no checkpoint, so it is written even in a cancelled scope.
            await self._finish_locally(record)
            raise
        self._unwritten_ends.pop(record.id, None)
        if written is None:
            # Ended elsewhere meanwhile (reaped while Redis could not hear from us): the
            # local copy ends as Redis says, so that readers here see that end too.
            ended = (await self.load([record.id]))[0]
            if ended is not None and not ended.active:
                await self._finish_locally(ended)
            return None
        return await self._finish_locally(record) or written

    async def write_unwritten_ends(self) -> list[str]:
        """Write the terminal events Redis did not take when their tasks ended here (it
        failed for longer than the backend timeout: a long failover, say). Returns the
        tasks whose end it wrote. Raises ``RedisError``; a task whose log kept moving is
        given up (and logged)."""
        written: list[str] = []
        for task_id, record in list(self._unwritten_ends.items()):
            if self._local.has(task_id) and (await self._local.get(task_id) or record).active:
                continue  # still ending here
            try:
                if await self.end(record, self._replica_id) is not None:
                    written.append(task_id)
            except BackendUnavailable as exc:
                log.warning("task=%s: its end was not written: %s", task_id, exc)
            del self._unwritten_ends[task_id]
        return written

    async def end(self, record: TaskRecord, replica: str) -> Event | None:
        """Write the terminal event as ``record`` says, then free the task's place. If
        the log moved on meanwhile (an append this process gave up waiting for, or an
        owner still writing while reaped), the record is brought up to Redis's log and
        the write tried again. None if the log was closed already. Raises ``RedisError``."""
        keys = self._keys.task(record.id).all()
        for _ in range(10):
            seq = record.last_seq + 1
            ended = record.copy()
            ended.last_seq = seq
            data = ended.to_dict()
            type_ = terminal_type(record.status)
            result: Any = await self._conn.finish(
                keys=keys,
                args=[
                    str(seq),
                    type_,
                    fastjson.dumps(data),
                    str(self._retention_ms),
                    record.content,
                    record.reasoning,
                    fastjson.dumps(record.sources),
                    *encode_fields(ended),
                ],
            )
            if result == -2:
                current = (await self.load([record.id]))[0]
                if current is not None:
                    record.last_seq = current.last_seq
                    record.content, record.reasoning = current.content, current.reasoning
                    record.sources = current.sources
                continue
            await self._admission.release_place(record.id, replica)
            if result != 1:
                return None
            return Event(record.id, record.chat_id, record.message_id, seq, type_, data)
        raise BackendUnavailable(f"could not end task {record.id}: its log kept moving")

    async def _finish_locally(self, record: TaskRecord) -> Event | None:
        if not self._local.has(record.id):
            return None
        return await self._local.finish(record)

    async def read(self, task_id: str, after: int, limit: int | None = None) -> list[Event]:
        if self._local.has(task_id):
            return await self._local.read(task_id, after, limit)
        return await self.tailer.read(task_id, after, limit)

    async def wait_beyond(self, task_id: str, after: int) -> bool:
        if self._local.has(task_id):
            return await self._local.wait_beyond(task_id, after)
        return await self.tailer.wait_beyond(task_id, after)

    @contextmanager
    def reading(self, task_id: str) -> Iterator[None]:
        # Redis keeps an ended log for the retention time whoever reads it; only the
        # local copy is held.
        with self._local.reading(task_id):
            yield

    def watch(
        self, task_id: str, on_append: Callable[[Event], None], after: int = 0
    ) -> LogWatch | None:
        local = self._local.watch(task_id, on_append, after)
        if local is not None:
            return local
        return self.tailer.watch(task_id, on_append, after)

    async def delete(self, record: TaskRecord) -> None:
        with redis_errors():
            await self._conn.commands.delete(self._keys.task(record.id).all())
            await self._conn.commands.srem(self._keys.adm(f"user:{record.user}"), [record.id])
        await self._local.delete(record)
        self.tailer.forget(record.id)

    async def expire(
        self, now: float, retention_s: float, max_retained: int | None = None
    ) -> list[str]:
        # Redis expires its keys by itself (set with the terminal event); the local copies
        # go as the memory store lets them go.
        expired = await self._local.expire(now, retention_s, max_retained)
        for task_id in expired:
            self.tailer.forget(task_id)
        return expired
