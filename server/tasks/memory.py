"""The in-memory task backend: one process, no persistence.

The store keeps its own copy of each record and hands out copies, as a shared store would:
the task manager's record and the stored one agree only through ``save``, ``append`` and
``finish``, so code that forgets to persist a change fails here too, not only on Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import trio

from server.events import Event, EventType, record_changes, terminal_type
from server.record import PUBLIC_FIELDS, CancelReason, TaskRecord
from server.tasks.backend import Control, LogPosition, new_replica_id
from server.tasks.log import EventLog


class UnknownTask(KeyError):
    pass


class MemoryStore:
    def __init__(self) -> None:
        self._records: dict[str, TaskRecord] = {}
        self._logs: dict[str, EventLog] = {}
        # The tasks of each session and chat, in creation order: a connection attaching
        # to its session lists that session's tasks, and with thousands of tasks here a
        # scan of them all per connection made a burst of connections quadratic.
        self._by_session: dict[str, dict[str, None]] = {}
        self._by_chat: dict[str, dict[str, None]] = {}

    async def create(self, record: TaskRecord) -> None:
        log = EventLog(record.id, record.chat_id, record.message_id)
        record.last_seq = log.append("task:queued", {}).seq
        self._records[record.id] = record.copy()
        self._logs[record.id] = log
        for index, key in ((self._by_session, record.session_id), (self._by_chat, record.chat_id)):
            if key is not None:
                index.setdefault(key, {})[record.id] = None

    async def save(self, record: TaskRecord) -> None:
        stored = self._records.get(record.id)
        if stored is None:
            return
        self._records[record.id] = replace(
            record.copy(),
            content=stored.content,
            reasoning=stored.reasoning,
            sources=stored.sources,
            last_seq=stored.last_seq,
        )

    def has(self, task_id: str) -> bool:
        """Whether the task's record and log are here (created and not yet expired)."""
        return task_id in self._logs

    def open_end(self, task_id: str) -> int | None:
        """The last seq of the task's log while it is open (None: closed, or not here)."""
        log = self._logs.get(task_id)
        return None if log is None or log.closed else log.last_seq

    async def get(self, task_id: str) -> TaskRecord | None:
        record = self._records.get(task_id)
        return None if record is None else record.copy()

    async def user_of(self, task_id: str) -> str | None:
        record = self._records.get(task_id)
        return None if record is None else record.user

    async def position(self, task_id: str) -> LogPosition | None:
        record = self._records.get(task_id)
        return None if record is None else LogPosition(record.active, record.last_seq)

    async def list_tasks(
        self,
        user: str,
        *,
        chat_id: str | None = None,
        session_id: str | None = None,
        include_finished: bool = False,
    ) -> list[TaskRecord]:
        if session_id is not None:
            ids: Iterable[str] = self._by_session.get(session_id, {})
        elif chat_id is not None:
            ids = self._by_chat.get(chat_id, {})
        else:
            ids = self._records
        records = [
            r.copy()
            for r in map(self._records.__getitem__, ids)
            if r.user == user
            and (include_finished or r.active)
            and (chat_id is None or r.chat_id == chat_id)
            and (session_id is None or r.session_id == session_id)
        ]
        return sorted(records, key=lambda r: r.created_at)

    def _log(self, task_id: str) -> EventLog:
        log = self._logs.get(task_id)
        if log is None:
            raise UnknownTask(task_id)
        return log

    async def append(self, record: TaskRecord, type_: EventType, data: dict[str, Any]) -> Event:
        event = self.apply(record.id, type_, data)
        record.last_seq = event.seq
        return event

    def apply(self, task_id: str, type_: EventType, data: dict[str, Any]) -> Event:
        """Append an event to the task's log and its stored record, as it stands in a log
        kept elsewhere (a terminal event's data is the record as it ended). Synchronous."""
        event = self._log(task_id).append(type_, data)
        stored = self._records[task_id]
        if event.terminal:  # the public fields as it ended; the internal ones as kept
            ended = TaskRecord.from_dict(data)
            self._records[task_id] = replace(
                stored, **{name: getattr(ended, name) for name in PUBLIC_FIELDS}
            )
            return event
        content, reasoning, source = record_changes(type_, data)
        stored.content += content
        stored.reasoning += reasoning
        if source is not None:
            stored.sources.append(source)
        stored.last_seq = event.seq
        return event

    async def finish(self, record: TaskRecord) -> Event | None:
        log = self._log(record.id)
        if log.closed:
            return None
        record.last_seq = log.last_seq + 1
        self._records[record.id] = record.copy()
        return log.append(terminal_type(record.status), record.to_dict())

    async def read(self, task_id: str, after: int, limit: int | None = None) -> list[Event]:
        log = self._logs.get(task_id)
        return [] if log is None else log.read(after, limit)

    async def wait_beyond(self, task_id: str, after: int) -> bool:
        log = self._logs.get(task_id)
        if log is None:  # unknown or expired: nothing more will come
            return False
        return await log.wait_beyond(after)

    def wake_all(self) -> None:
        """Let every waiter of every log go (see ``EventLog.wake``)."""
        for log in self._logs.values():
            log.wake()

    @contextmanager
    def reading(self, task_id: str) -> Iterator[None]:
        log = self._logs.get(task_id)
        if log is not None:
            log.readers += 1
        try:
            yield
        finally:
            if log is not None:
                log.readers -= 1

    def watch(
        self, task_id: str, on_append: Callable[[Event], None], after: int = 0
    ) -> _MemoryWatch | None:
        log = self._logs.get(task_id)
        if log is None:
            return None
        return _MemoryWatch(log, on_append)

    async def expire(
        self, now: float, retention_s: float, max_retained: int | None = None
    ) -> list[str]:
        ended = [
            r
            for r in self._records.values()
            if not r.active and r.ended_at is not None and not self._logs[r.id].readers
        ]
        expired = [r.id for r in ended if now - (r.ended_at or now) >= retention_s]
        if max_retained is not None:
            kept = [r for r in ended if now - (r.ended_at or now) < retention_s]
            retained = sum(1 for r in self._records.values() if not r.active)
            excess = retained - len(expired) - max_retained
            if excess > 0:
                kept.sort(key=lambda r: r.ended_at or 0.0)
                expired += [r.id for r in kept[:excess]]
        for task_id in expired:
            self._forget(self._records[task_id])
        return expired

    async def delete(self, record: TaskRecord) -> None:
        if record.id in self._records:
            self._forget(self._records[record.id])

    def _forget(self, record: TaskRecord) -> None:
        del self._records[record.id]
        del self._logs[record.id]
        for index, key in ((self._by_session, record.session_id), (self._by_chat, record.chat_id)):
            ids = index.get(key) if key is not None else None
            if ids is not None:
                ids.pop(record.id, None)
                if not ids:
                    del index[key]  # type: ignore[arg-type]


class LocalAdmission:
    """Admission counts of one process, kept incrementally so that admitting a task is
    O(1) even with thousands of tasks in the registry."""

    def __init__(self) -> None:
        self._places: dict[str, str] = {}  # task -> user
        self._by_user: dict[str, int] = {}

    async def reserve(self, record: TaskRecord, *, max_total: int, max_per_user: int) -> bool:
        if record.id in self._places:
            return True
        user_count = self._by_user.get(record.user, 0)
        if len(self._places) >= max_total or user_count >= max_per_user:
            return False
        self._places[record.id] = record.user
        self._by_user[record.user] = user_count + 1
        return True

    async def release(self, record: TaskRecord) -> None:
        user = self._places.pop(record.id, None)
        if user is None:
            return
        remaining = self._by_user.get(user, 1) - 1
        if remaining <= 0:
            self._by_user.pop(user, None)
        else:
            self._by_user[user] = remaining

    async def counts(self) -> tuple[int, dict[str, int]]:
        return len(self._places), dict(self._by_user)


class SingleProcess:
    """The cluster of one process: its session registry knows every session and
    connection, and a task not running here runs nowhere."""

    def __init__(self) -> None:
        self.replica_id = new_replica_id()

    @property
    def reachable(self) -> bool:
        return True

    async def claim_session(self, session_id: str, user: str) -> bool:
        return True

    async def session_presence(self, session_id: str, user: str, delta: int) -> None:
        return None

    async def session_connected_elsewhere(self, session_id: str) -> bool:
        return False

    async def send_stop(self, task_id: str, reason: CancelReason) -> bool:
        return False

    async def announce_task(self, session_id: str, task_id: str) -> None:
        return None

    async def send_skip(self, task_id: str, step: str, by: str) -> bool:
        return False

    async def serve(
        self,
        control: Control,
        done: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        task_status.started()  # nothing to do in the background


@dataclass(frozen=True)
class MemoryBackend:
    """The embedded default: one process's tasks, in its memory."""

    store: MemoryStore = field(default_factory=MemoryStore)
    admission: LocalAdmission = field(default_factory=LocalAdmission)
    cluster: SingleProcess = field(default_factory=SingleProcess)


class _MemoryWatch:
    def __init__(self, log: EventLog, on_append: Callable[[Event], None]) -> None:
        self._log: EventLog | None = log
        self._on_append = on_append
        log.watchers.append(on_append)
        log.readers += 1

    def close(self) -> None:
        log, self._log = self._log, None
        if log is not None:
            log.watchers.remove(self._on_append)
            log.readers -= 1
