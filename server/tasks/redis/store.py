"""Records and logs in Redis, with a local copy of the tasks this process runs.

The tasks this process runs are also kept in a local in-memory store: their readers and
watchers here are served from memory, with no round trip of their own, as soon as Redis
has taken an event (not before: see ``RedisStore.append``), and only readers of tasks run
elsewhere read Redis (``Tailer``). Appends are written behind (``WriteBehind``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any, cast

import trio

from server import fastjson
from server.events import Event, EventType, record_changes, terminal_type
from server.record import ACTIVE_STATUSES, TaskRecord
from server.tasks.backend import LogPosition, LogWatch
from server.tasks.errors import BackendUnavailable
from server.tasks.log import LogClosed
from server.tasks.memory import MemoryStore
from server.tasks.redis.admission import RedisAdmission
from server.tasks.redis.connection import RedisConnection
from server.tasks.redis.errors import RedisError, redis_errors
from server.tasks.redis.keys import decode_record, encode_fields
from server.tasks.redis.tailing import Tailer
from server.tasks.redis.writer import WriteBehind

log = logging.getLogger("tether.redis")

CUT_OFF = "This replica cannot reach Redis: resume from another one."

# What a task ended elsewhere takes from the end in the log.
_ENDING_FIELDS = (
    "status",
    "phase",
    "error",
    "cancel_reason",
    "finish_reason",
    "ended_at",
    "last_seq",
    "content",
    "reasoning",
    "sources",
)


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
        # Tasks ended here whose end Redis did not answer: ``settle`` writes it later.
        self._unsettled: dict[str, TaskRecord] = {}
        self.tailer = Tailer(conn)
        # Cut off from Redis (``let_readers_go``).
        self._cut_off = False

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

    async def user_of(self, task_id: str) -> str | None:
        if self._local.has(task_id):
            return await self._local.user_of(task_id)
        return await self.tailer.user_of(task_id)

    async def position(self, task_id: str) -> LogPosition | None:
        if self._local.has(task_id):
            return await self._local.position(task_id)
        return await self.tailer.position(task_id)

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
        index = self._keys.user_tasks(user)
        with redis_errors():
            task_ids = [str(t) for t in await self._conn.commands.zrange(index, 0, -1)]
        chosen, gone = await self._choose(task_ids, chat_id, session_id, include_finished)
        if gone:
            with redis_errors():
                await self._conn.commands.zrem(index, gone)
        records = await self.load(chosen) if chosen else []
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

    async def _choose(
        self,
        task_ids: list[str],
        chat_id: str | None,
        session_id: str | None,
        include_finished: bool,
    ) -> tuple[list[str], list[str]]:
        """The tasks among ``task_ids`` that a listing wants, told by the few fields that
        choose (a user may have thousands, and a session's listing wants few of them:
        their whole records are read after), and those Redis no longer holds."""
        wanted = {"chat_id": chat_id, "session_id": session_id}
        fields = ["id", "status", *(name for name, value in wanted.items() if value is not None)]
        with redis_errors():
            async with self._conn.commands.pipeline(transaction=False) as pipe:
                for task_id in task_ids:
                    pipe.hmget(self._keys.task(task_id).rec, fields)
            rows = list(pipe.results or ())
        chosen: list[str] = []
        gone: list[str] = []
        for task_id, row in zip(task_ids, rows, strict=True):
            values = dict(zip(fields, cast(list[str | None], row), strict=True))
            if values["id"] is None:
                gone.append(task_id)
            elif (
                include_finished or fastjson.loads(values["status"] or "null") in ACTIVE_STATUSES
            ) and all(
                fastjson.loads(values[name] or "null") == value
                for name, value in wanted.items()
                if value is not None
            ):
                chosen.append(task_id)
        return chosen, gone

    # -- the log -----------------------------------------------------------------------------

    async def append(self, record: TaskRecord, type_: EventType, data: dict[str, Any]) -> Event:
        """Queue the write to Redis for the next pipeline and return the event; the task
        does not wait for Redis's answer. Each task's writes go out in order. A write that
        Redis refused (the log closed elsewhere, the task no longer ours, the task lost in
        a restart, Redis down) fails the task's next append, so the task ends at once.
        Waits only while Redis is too far behind; cancelled then, it writes nothing.

        Readers here see the event once Redis has taken it, never before (``_written``):
        a replica cut off from Redis and reaped meanwhile has shown its readers nothing
        that the log every replica reads lacks, and the reaper's terminal event, which
        follows the last event Redis took, reaches them through ``finish``. The cost is
        one pipelined round trip of delay for readers here."""
        failure = self.writer.failure(record.id)
        if failure is not None:
            raise failure
        if self._local.open_end(record.id) is None:
            raise LogClosed(f"task {record.id} already ended; {type_} not written")
        await self.writer.wait_for_room()
        seq = record.last_seq + 1
        content, reasoning, source = record_changes(type_, data)
        self.writer.queue(
            record.id,
            self._keys.task(record.id).all(),
            [
                str(seq),
                type_,
                fastjson.dumps(data),
                content,
                reasoning,
                "" if source is None else fastjson.dumps(source),
                self._replica_id,
            ],
            lambda: self._written(record.id, seq, type_, data),
        )
        record.last_seq = seq
        return Event(record.id, record.chat_id, record.message_id, seq, type_, data)

    def _written(self, task_id: str, seq: int, type_: EventType, data: dict[str, Any]) -> None:
        """Redis took the event: show it here, if the local copy is in step (a copy
        that missed an answer, or was closed, is brought to Redis's log by ``finish``)."""
        if self._local.open_end(task_id) == seq - 1:
            self._local.apply(task_id, type_, data)

    async def finish(self, record: TaskRecord) -> Event | None:
        """Write the terminal event, then bring the local copy to Redis's log, so that
        readers here see the end every replica reads, whoever wrote it (this replica, or
        a reaper that ended the task while Redis could not hear from us: ``record`` then
        takes the end Redis holds). If Redis does not answer (or the call is cancelled),
        the end is left to ``settle``: readers here wait for it."""
        # The end goes after the task's last event. Both steps are bounded, so that a
        # Redis that is away leaves the end to ``settle`` within the manager's budget.
        await self.writer.flushed(record.id, self._conn.timeout_s / 2)
        settled = False
        try:
            written = await self._conn.through_failover(
                partial(self.end, record, self._replica_id), self._conn.timeout_s / 3
            )
            if written is not None:
                record.last_seq = written.seq
            await self._mirror(record, written)
            settled = True
        except RedisError as exc:
            raise BackendUnavailable(f"Redis failed: {exc}") from exc
        finally:
            if not settled and self._local.open_end(record.id) is not None:
                self._unsettled[record.id] = record.copy()
        return written

    async def _mirror(self, record: TaskRecord, written: Event | None) -> None:
        """Bring the local copy up to Redis's log and end it as Redis did; ``record``
        takes the record as it ended there. Raises ``RedisError`` or
        ``BackendUnavailable``."""
        after = self._local.open_end(record.id)
        if after is None:
            return
        if written is not None and written.seq == after + 1:
            events = [written]  # the usual end: every event before it is here already
        else:
            events = await self.tailer.read(record.id, after)
        for event in events:
            if self._local.open_end(record.id) == event.seq - 1:
                self._local.apply(record.id, event.type, event.data)
        if self._local.open_end(record.id) is not None:
            # Redis lost the task (a restart) and the end was written anew after a gap:
            # the local copy ends with the record as the task knows it.
            await self._local.finish(record)
        ended = await self._local.get(record.id) if written is None else None
        if ended is not None:  # ended elsewhere: the task ends as the log says
            for name in _ENDING_FIELDS:
                setattr(record, name, getattr(ended, name))

    async def settle(self, interval_s: float) -> None:
        """Every ``interval_s``, try again to end the tasks whose end Redis did not
        answer, and bring their local copies to Redis's log (the end may be a reaper's
        by then): readers here wait for that end. Runs until cancelled."""
        while True:
            await trio.sleep(interval_s)
            await self.settle_once()

    async def settle_once(self) -> int:
        """Try each end Redis did not answer once (each try bounded); returns how many
        are still not written."""
        for task_id, record in list(self._unsettled.items()):
            with trio.move_on_after(self._conn.timeout_s):
                try:
                    await self._mirror(record, await self.end(record, self._replica_id))
                except Exception as exc:  # noqa: BLE001 - tried again until Redis answers
                    self._conn.noticed(exc)
                    log.warning("task=%s: its end is still not written: %s", task_id, exc)
                    continue
                del self._unsettled[task_id]
                log.info("task=%s: its end was written once Redis answered", task_id)
        return len(self._unsettled)

    async def close_unsettled(self) -> None:
        """The process is leaving: end the local copies of tasks whose end Redis never
        answered as their records say, so that no reader here waits for ever (the
        records in Redis wait for a reaper)."""
        unsettled, self._unsettled = self._unsettled, {}
        for record in unsettled.values():
            await self._finish_locally(record)

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
            await self.release_place(record.id, record.user, replica)
            if result != 1:
                return None
            return Event(record.id, record.chat_id, record.message_id, seq, type_, data)
        raise BackendUnavailable(f"could not end task {record.id}: its log kept moving")

    async def release_place(self, task_id: str, user: str, replica: str) -> None:
        """Free the place ``replica`` held for the ended task, and delete the retained
        tasks past ``TETHER_MAX_RETAINED_TASKS`` (oldest first) that it pushed out. A
        failure is logged: what was not deleted expires with its retention."""
        for evicted in await self._admission.release_place(task_id, user, replica):
            try:
                await self._conn.commands.delete(self._keys.task(evicted).all())
            except RedisError as exc:
                log.warning("task=%s: not deleted past the retained tasks: %s", evicted, exc)
            self.tailer.forget(evicted)

    async def _finish_locally(self, record: TaskRecord) -> Event | None:
        if not self._local.has(record.id):
            return None
        return await self._local.finish(record)

    async def read(self, task_id: str, after: int, limit: int | None = None) -> list[Event]:
        if self._local.has(task_id):
            return await self._local.read(task_id, after, limit)
        return await self.tailer.read(task_id, after, limit)

    async def wait_beyond(self, task_id: str, after: int) -> bool:
        """See ``TaskStore.wait_beyond``. Raises ``BackendUnavailable`` while this replica
        is cut off from Redis (``let_readers_go``): nothing it could wait for would come."""
        if self._cut_off:
            raise BackendUnavailable(CUT_OFF)
        if self._local.has(task_id):
            beyond = await self._local.wait_beyond(task_id, after)
        else:
            beyond = await self.tailer.wait_beyond(task_id, after)
        if self._cut_off:
            raise BackendUnavailable(CUT_OFF)
        return beyond

    def let_readers_go(self, cut_off: bool) -> None:
        """This replica is cut off from Redis (its heartbeat may have lapsed, and a
        survivor may end its tasks): every reader waiting for a log's next events gets
        ``BackendUnavailable``, and so does every reader that comes to wait, until it is
        back (False). Its readers' clients resume elsewhere, where Redis can be heard.
        The waits are woken, not each guarded by a cancel scope: a wait costs nothing more."""
        self._cut_off = self.tailer.cut_off = cut_off
        if cut_off:
            self._local.wake_all()
            self.tailer.wake_all()

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
            await self._conn.commands.zrem(self._keys.user_tasks(record.user), [record.id])
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
