"""Where task state lives: the registry, the event logs and the retained results.

``TaskBackend`` is the seam for more than one process: the in-memory backend serves one
process (the embedded default); a Redis backend implements the same coroutines with
streams for the logs. Nothing outside ``server.tasks`` knows which backend is in use, and
nothing outside the task manager calls one.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, Protocol

import trio

from server.schemas import CancelReason, Event, TaskRecord


def apply_event(record: TaskRecord, type_: str, data: dict[str, Any]) -> None:
    """What an event changes in its task's record: the fields the log carries."""
    if type_ == "delta":
        record.content += data.get("content", "")
        record.reasoning += data.get("reasoning", "")
    elif type_ == "source":
        record.sources.append(data)


class Control(Protocol):
    """What other processes ask of this one, through the backend."""

    def stop(self, task_id: str, reason: CancelReason) -> object:
        """Stop a task run here (as a local stop would)."""
        ...

    def follow(self, session_id: str, task_id: str) -> None:
        """A task of the session started elsewhere: this process's connections to the
        session follow it."""
        ...


class LogWatch(Protocol):
    def close(self) -> None:
        """Stop the calls; idempotent."""
        ...


def new_replica_id() -> str:
    """This process's name among the replicas of a task space: host, pid and a nonce."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class TaskBackend(Protocol):
    """Every coroutine here is one short step on shared state; only ``wait_beyond`` waits.
    Cancelling a step before it returns leaves the state as it was or fully changed.

    The records a backend hands out are copies: a change reaches the shared state only
    through ``save``, ``append`` or ``finish``, so that another process sees it too."""

    replica_id: str

    async def admit(self, record: TaskRecord, *, max_total: int, max_per_user: int) -> bool:
        """Register ``record`` and write its ``task:queued`` event (seq 1), if the limits
        allow it: checked, reserved and written as one step."""
        ...

    async def save(self, record: TaskRecord) -> None:
        """Persist the record's own fields: all but those its events carry (``content``,
        ``reasoning``, ``sources``), which ``append`` keeps in step with the log."""
        ...

    async def get(self, task_id: str) -> TaskRecord | None: ...

    async def list_tasks(
        self,
        user: str,
        *,
        chat_id: str | None = None,
        session_id: str | None = None,
        include_finished: bool = False,
    ) -> list[TaskRecord]: ...

    async def append(self, record: TaskRecord, type_: str, data: dict[str, Any]) -> Event:
        """Append a non-terminal event to the task's log, apply it to the stored record
        (``apply_event``) and set ``record.last_seq``. Raises ``LogClosed`` once the log
        has its terminal event. Appends of one task must not overlap (the task's emitter
        orders them): the next seq follows ``record.last_seq``."""
        ...

    async def finish(self, record: TaskRecord) -> Event | None:
        """End the task as ``record`` says (its ``status`` is terminal): write the
        ``task:<status>`` event carrying the record, whose ``last_seq`` is that event's
        own seq, persist the whole record and release its admission, as one step. None,
        with nothing written, if the log already has its terminal event: a task ends
        once, whoever ends it."""
        ...

    async def read(self, task_id: str, after: int, limit: int | None = None) -> list[Event]: ...

    async def wait_beyond(self, task_id: str, after: int) -> bool:
        """Wait for an event past ``after``: True once there is one, False if there never
        will be (the log is closed before it, or the task is unknown or expired). Cancel
        just stops the wait."""
        ...

    def reading(self, task_id: str) -> AbstractContextManager[None]:
        """Mark a reader following the task's log, so that retention keeps it meanwhile."""
        ...

    def watch(self, task_id: str, on_append: Callable[[Event], None],
              after: int = 0) -> LogWatch | None:
        """Call ``on_append`` with each event appended to the task's log past ``after``
        until the returned watch is closed; None if the task is unknown or expired. Events
        past ``after`` that exist already may be reported too. A watch counts as a reader
        for retention. ``on_append`` must not block or raise."""
        ...

    async def expire(self, now: float, retention_s: float,
                     max_retained: int | None = None) -> list[str]:
        """Forget ended tasks that ended more than ``retention_s`` ago, and the oldest
        ended ones past ``max_retained``, that nobody is reading; return their ids."""
        ...

    async def counts(self) -> tuple[int, dict[str, int]]:
        """Active tasks in all and per user."""
        ...

    async def claim_session(self, session_id: str, user: str) -> bool:
        """Make an unknown session ``user``'s; False if it is another user's."""
        ...

    async def session_presence(self, session_id: str, user: str, delta: int) -> None:
        """Count ``delta`` connections of this process to the session (+1, -1)."""
        ...

    async def session_connected_elsewhere(self, session_id: str) -> bool:
        """Whether another live process holds a connection to the session."""
        ...

    async def request_stop(self, task_id: str, reason: CancelReason) -> bool:
        """Deliver a stop to the process that runs the task (not this one); False if no
        process runs it."""
        ...

    async def announce_task(self, session_id: str, task_id: str) -> None:
        """Tell the other processes with connections to the session about its new task."""
        ...

    async def serve(self, control: Control, done: trio.Event, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """The backend's own work, until ``done`` is set (after every task's terminal
        write): what other processes ask of this one goes to ``control``. It ends on
        ``done``, not by cancellation, and in bounded time."""
        ...


async def next_events(
    backend: TaskBackend, task_id: str, cursor: int, *, limit: int = 256,
    wait_s: float = math.inf,
) -> list[Event] | None:
    """The events past ``cursor``, waiting up to ``wait_s`` for the first of them.

    The one cursor step every reader takes: a list of events, an empty list when the wait
    ran out (time for a keep-alive), or None when none will ever come (the log closed
    before them, or the task expired). Cancelling it only stops the wait.
    """
    while True:
        events = await backend.read(task_id, cursor, limit)
        if events:
            return events
        with trio.move_on_after(wait_s):
            if not await backend.wait_beyond(task_id, cursor):
                return None
            continue
        return []
