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
from typing import Any, cast

import trio

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

# The pause between two tries of the terminal events Redis did not take.
_END_RETRY_PAUSE_S = 0.25


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
        self._retention_s = retention_s
        # Terminal events Redis did not take yet: the record as it ended, and when to give
        # up on it.
        self._unwritten: dict[str, tuple[TaskRecord, float]] = {}
        self._unwritten_added = trio.Event()
        self._local = MemoryStore()
        self.writer = WriteBehind(conn)
        self.tailer = Tailer(conn)

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
        values = dict(zip(fields[::2], fields[1::2], strict=True))
        rec = self._keys.task(record.id).rec
        with redis_errors():
            # A phase change or the result, at the end of an answer: through a failover,
            # as the appends go.
            await self._conn.through_failover(lambda: self._conn.commands.hset(rec, values))
        await self._local.save(record)

    async def get(self, task_id: str) -> TaskRecord | None:
        local = await self._local.get(task_id)
        if local is not None:
            return local
        return (await self.load([task_id]))[0]

    async def load(self, task_ids: list[str]) -> list[TaskRecord | None]:
        """The records as Redis holds them (None for a task it does not hold)."""
        with redis_errors():
            async with self._conn.commands.pipeline(transaction=False) as pipe:
                for task_id in task_ids:
                    keys = self._keys.task(task_id)
                    pipe.hgetall(keys.rec)
                    pipe.get(keys.content)
                    pipe.get(keys.reasoning)
                    pipe.lrange(keys.sources, 0, -1)
            results = list(pipe.results or ())
        out: list[TaskRecord | None] = []
        for i in range(len(task_ids)):
            raw, content, reasoning, sources = results[4 * i : 4 * i + 4]
            out.append(decode_record(cast(dict[str, str], raw), content, reasoning, sources))
        return out

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
        """Write the terminal event. If Redis does not take it (it cannot be reached, a
        failover is under way) or the caller's deadline cuts the write, it is written
        later (``write_unwritten_ends``) and the local copy ends now, so that readers
        here see the end at once."""
        unwritten: TaskRecord | None = record.copy()
        written: Event | None = None
        try:
            await self.writer.flushed(record.id)  # the end goes after the task's last event
            written = await self.end(record, self._replica_id)
            unwritten = None
        except (RedisError, BackendUnavailable) as exc:
            log.warning("task=%s: the terminal event waits for Redis: %s", record.id, exc)
        finally:
            if unwritten is not None:
                self._end_later(unwritten)
                # The local end does not wait (no checkpoint): it is made even when the
                # caller's deadline has passed.
                local = await self._finish_locally(record)
        if unwritten is not None:
            return local
        if written is None:
            # Ended elsewhere meanwhile (reaped while Redis could not hear from us): the
            # local copy ends as Redis says, so that readers here see that end too.
            ended = (await self.load([record.id]))[0]
            if ended is not None and not ended.active:
                await self._finish_locally(ended)
            return None
        return await self._finish_locally(record) or written

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

    def _end_later(self, record: TaskRecord) -> None:
        """Have ``write_unwritten_ends`` write the task's terminal event. Synchronous."""
        self._unwritten[record.id] = (record, trio.current_time() + self._retention_s)
        self._unwritten_added.set()

    async def write_unwritten_ends(self) -> None:
        """Write the terminal events that Redis did not take when their tasks ended, until
        it answers again, each for the retention time at most (by then it would have
        expired): so a task this process ran never stays ``running`` in Redis. The
        terminal script writes once, whoever calls it: a task reaped meanwhile keeps the
        reaper's end. Runs until cancelled."""
        while True:
            if not self._unwritten:
                await self._unwritten_added.wait()
                self._unwritten_added = trio.Event()
            await self.write_unwritten_ends_once()
            if self._unwritten:
                await trio.sleep(_END_RETRY_PAUSE_S)

    async def write_unwritten_ends_once(self) -> int:
        """Try each unwritten terminal event once (bounded); returns how many are left."""
        for task_id, (record, give_up_at) in list(self._unwritten.items()):
            if trio.current_time() >= give_up_at:
                del self._unwritten[task_id]
                log.error("task=%s: its terminal event was never written to Redis", task_id)
                continue
            with trio.move_on_after(self._conn.timeout_s):
                try:
                    await self.end(record, self._replica_id)
                except Exception as exc:  # noqa: BLE001 - tried again after a pause
                    log.debug("task=%s: the terminal event still waits: %s", task_id, exc)
                    continue
                del self._unwritten[task_id]
                log.info("task=%s: its terminal event was written once Redis answered", task_id)
        return len(self._unwritten)

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
