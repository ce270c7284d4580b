"""The append-only event log of one task, read through cursors.

A reader holds nothing but the last ``seq`` it has seen; it reads what lies beyond it and,
when it is caught up, waits for the next append. Slow readers therefore cost no queue and
no memory, resuming is the same operation as reading, and replay is free. The log accepts
exactly one terminal event and nothing after it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import trio

from server.events import Event, EventType


class LogClosed(Exception):
    """An append after the terminal event."""


class EventLog:
    def __init__(self, task_id: str, chat_id: str | None, message_id: str | None) -> None:
        self.task_id = task_id
        self.chat_id = chat_id
        self.message_id = message_id
        # Plain content deltas, most of a log, are kept as their text alone (about 60 bytes
        # instead of 360 for an Event and its dict) and made into Events when read.
        self._events: list[Event | str] = []
        # Readers following this log right now; retention does not drop a log under them.
        self.readers = 0
        # Called synchronously after every append with the new event: a WebSocket
        # connection follows many logs with one writer, woken by these, instead of one
        # waiting task per log.
        self.watchers: list[Callable[[Event], None]] = []
        # Set and dropped on the next append: waiters wake, re-read, and wait on a new
        # one. Made only when someone waits, so that an append nobody waits on (most of
        # them: WebSocket followers use ``watchers``) allocates nothing.
        self._changed: trio.Event | None = None
        # The last event set by ``wake`` rather than by an append.
        self._woken: trio.Event | None = None

    @property
    def last_seq(self) -> int:
        return len(self._events)

    @property
    def closed(self) -> bool:
        last = self._events[-1] if self._events else None
        return isinstance(last, Event) and last.terminal

    def append(self, type_: EventType, data: dict[str, Any]) -> Event:
        if self.closed:
            raise LogClosed(f"task {self.task_id} already ended; {type_} not written")
        event = Event(
            task_id=self.task_id,
            chat_id=self.chat_id,
            message_id=self.message_id,
            seq=len(self._events) + 1,
            type=type_,
            data=data,
        )
        content = data.get("content") if type_ == "delta" and len(data) == 1 else None
        self._events.append(content if type(content) is str else event)
        changed, self._changed = self._changed, None
        if changed is not None:
            changed.set()
        for watcher in self.watchers:
            watcher(event)
        return event

    def read(self, after: int, limit: int | None = None) -> list[Event]:
        """Events with ``seq > after`` (at most ``limit``), in order."""
        start = max(after, 0)
        end = None if limit is None else start + limit
        return [
            item if isinstance(item, Event) else self._delta(seq, item)
            for seq, item in enumerate(self._events[start:end], start + 1)
        ]

    def _delta(self, seq: int, content: str) -> Event:
        return Event(
            task_id=self.task_id,
            chat_id=self.chat_id,
            message_id=self.message_id,
            seq=seq,
            type="delta",
            data={"content": content},
        )

    async def wait_beyond(self, after: int) -> bool:
        """Wait for an event with ``seq > after``: True once one exists (or on ``wake``:
        read again), False if none ever will (the log is closed before it). Cancelling it
        just stops the wait.
        """
        while self.last_seq <= after:
            if self.closed:
                return False
            if self._changed is None:
                self._changed = trio.Event()
            changed = self._changed
            await changed.wait()
            if self._woken is changed:
                return True
        return True

    def wake(self) -> None:
        """Let every waiter go (``wait_beyond`` returns True, with or without a new event):
        the store that holds the log has news for its readers (see
        ``RedisStore.let_readers_go``)."""
        changed, self._changed = self._changed, None
        if changed is not None:
            self._woken = changed
            changed.set()
