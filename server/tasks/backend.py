"""Where task state lives, behind three small protocols.

- ``TaskStore``: the records and their event logs, and retention. Every process reads and
  writes tasks through it.
- ``Admission``: the places of active tasks, in all and per user: reserved before a task
  exists, released once it has ended.
- ``Cluster``: what one process asks of the others and answers for them: presence in
  WebSocket sessions, stops for tasks run elsewhere, news of a session's new task, and the
  process's own background work (a heartbeat, reaping dead replicas). One process alone
  has no others: its cluster is a null object.

The in-memory implementations (``server.tasks.memory``) serve one process, the embedded
default; the Redis ones (``server.tasks.redis``) share one task space between processes
and replicas. ``Backend`` holds one of each; nothing outside ``server.tasks`` knows which
is in use. Every coroutine here is one short step on shared state unless it says it
waits; cancelling a step before it returns leaves the state as it was or fully changed.
"""

from __future__ import annotations

import math
import os
import secrets
import socket
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any, Protocol

import trio

from server.events import Event, EventType
from server.record import CancelReason, TaskRecord


class Control(Protocol):
    """What other processes ask of this one, through the cluster."""

    def cancel(self, task_id: str, reason: CancelReason) -> object:
        """Cancel a task run here (as a local stop would)."""
        ...

    def follow(self, session_id: str, task_id: str) -> None:
        """A task of the session started elsewhere: this process's connections to the
        session follow it."""
        ...

    def skip(self, task_id: str, step: str, by: str) -> object:
        """Skip one step of a task run here (as a local skip would)."""
        ...

    def running_here(self) -> list[str]:
        """The tasks this process runs."""
        ...

    def lost(self, task_id: str, why: str) -> object:
        """A task run here was ended by another process (this one could not be heard, and
        was taken for dead): stop it at once, writing nothing more."""
        ...

    def reach_changed(self, reachable: bool) -> None:
        """This process was cut off from the task store (False: the store has let its
        readers go, and the process lets its other connections go), or is back (True)."""
        ...


class NoControl:
    """A ``Control`` that runs no task: for a backend served without a task manager (the
    bench's and the tests' direct uses of a store)."""

    def cancel(self, task_id: str, reason: CancelReason) -> None:
        return None

    def follow(self, session_id: str, task_id: str) -> None:
        return None

    def skip(self, task_id: str, step: str, by: str) -> None:
        return None

    def running_here(self) -> list[str]:
        return []

    def lost(self, task_id: str, why: str) -> None:
        return None

    def reach_changed(self, reachable: bool) -> None:
        return None


@dataclass(frozen=True, slots=True)
class LogPosition:
    """Where a task's log is: whether the task is still active, and its last seq."""

    active: bool
    last_seq: int


class LogWatch(Protocol):
    def close(self) -> None:
        """Stop the calls; idempotent."""
        ...


class TaskStore(Protocol):
    """The records and their logs. The records it hands out are copies: a change reaches
    the shared state only through ``save``, ``append`` or ``finish``, so that another
    process sees it too."""

    async def create(self, record: TaskRecord) -> None:
        """Store a new record and write its ``task:queued`` event (seq 1), as one step;
        ``record.last_seq`` is set to it."""
        ...

    async def save(self, record: TaskRecord) -> None:
        """Persist the record's own fields: all but those its events carry (``LOGGED``),
        which ``append`` keeps in step with the log."""
        ...

    async def get(self, task_id: str) -> TaskRecord | None: ...

    async def user_of(self, task_id: str) -> str | None:
        """The user the task belongs to, without the rest of its record (a follower's
        check); None if it is unknown or expired."""
        ...

    async def position(self, task_id: str) -> LogPosition | None:
        """Where the task's log is, without the rest of its record (a follower's check of
        whether more will come); None if it is unknown or expired."""
        ...

    async def list_tasks(
        self,
        user: str,
        *,
        chat_id: str | None = None,
        session_id: str | None = None,
        include_finished: bool = False,
    ) -> list[TaskRecord]:
        """The user's tasks (running ones only, unless ``include_finished``), oldest
        first."""
        ...

    async def append(self, record: TaskRecord, type_: EventType, data: dict[str, Any]) -> Event:
        """Append a non-terminal event to the task's log, apply it to the stored record
        (``events.record_changes``) and set ``record.last_seq``. Raises ``LogClosed`` once
        the log has its terminal event. Appends of one task must not overlap (the task's
        emitter orders them): the next seq follows ``record.last_seq``."""
        ...

    async def finish(self, record: TaskRecord) -> Event | None:
        """End the task as ``record`` says (its ``status`` is terminal): write the
        terminal event carrying the record, whose ``last_seq`` is that event's own seq,
        and persist the whole record, as one step. None, with nothing written, if the log
        already has its terminal event: a task ends once, whoever ends it."""
        ...

    async def read(self, task_id: str, after: int, limit: int | None = None) -> list[Event]:
        """The task's events past ``after`` (at most ``limit``), in order."""
        ...

    async def wait_beyond(self, task_id: str, after: int) -> bool:
        """Wait for an event past ``after``: True once there is one, False if there never
        will be (the log is closed before it, or the task is unknown or expired). Cancel
        just stops the wait."""
        ...

    def reading(self, task_id: str) -> AbstractContextManager[None]:
        """Mark a reader following the task's log, so that retention keeps it meanwhile."""
        ...

    def watch(
        self, task_id: str, on_append: Callable[[Event], None], after: int = 0
    ) -> LogWatch | None:
        """Call ``on_append`` with each event appended to the task's log past ``after``
        until the returned watch is closed; None if the task is unknown or expired. Events
        past ``after`` that exist already may be reported too. A watch counts as a reader
        for retention. ``on_append`` must not block or raise."""
        ...

    async def expire(
        self, now: float, retention_s: float, max_retained: int | None = None
    ) -> list[str]:
        """Forget ended tasks that ended more than ``retention_s`` ago, and the oldest
        ended ones past ``max_retained``, that nobody is reading; return their ids."""
        ...

    async def delete(self, record: TaskRecord) -> None:
        """Forget an ended task now, its record and its log (``DELETE
        /v1/responses/{id}``); idempotent."""
        ...


class Admission(Protocol):
    async def reserve(self, record: TaskRecord, *, max_total: int, max_per_user: int) -> bool:
        """Take a place for the task if the limits allow it (checked and taken as one
        step); idempotent for one task."""
        ...

    async def release(self, record: TaskRecord) -> None:
        """Give the task's place back; idempotent."""
        ...

    async def counts(self) -> tuple[int, dict[str, int]]:
        """Active tasks in all and per user."""
        ...


class Cluster(Protocol):
    replica_id: str

    @property
    def reachable(self) -> bool:
        """Whether this process is sure that the others can hear it (its heartbeat is
        current): while not, it is not ready, and its tasks may be taken for dead."""
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

    async def send_stop(self, task_id: str, reason: CancelReason) -> bool:
        """Deliver a stop to the process that runs the task (not this one); False if no
        process runs it."""
        ...

    async def announce_task(self, session_id: str, task_id: str) -> None:
        """Tell the other processes with connections to the session about its new task."""
        ...

    async def send_skip(self, task_id: str, step: str, by: str) -> bool:
        """Deliver a skip to the process that runs the task (not this one); False if no
        process runs it."""
        ...

    async def serve(
        self,
        control: Control,
        done: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """The backend's own work, until ``done`` is set (after every task's terminal
        write): what other processes ask of this one goes to ``control``. It ends on
        ``done``, not by cancellation, and in bounded time."""
        ...


class Backend(Protocol):
    """One task space: its store, its admission and the cluster of processes sharing it."""

    @property
    def store(self) -> TaskStore: ...

    @property
    def admission(self) -> Admission: ...

    @property
    def cluster(self) -> Cluster: ...


def new_replica_id() -> str:
    """This process's name among the replicas of a task space: host, pid and a nonce."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


async def next_events(
    store: TaskStore,
    task_id: str,
    cursor: int,
    *,
    limit: int = 256,
    wait_s: float = math.inf,
) -> list[Event] | None:
    """The events past ``cursor``, waiting up to ``wait_s`` for the first of them.

    The one cursor step every reader takes: a list of events, an empty list when the wait
    ran out (time for a keep-alive), or None when none will ever come (the log closed
    before them, or the task expired). Cancelling it only stops the wait.
    """
    while True:
        events = await store.read(task_id, cursor, limit)
        if events:
            return events
        with trio.move_on_after(wait_s):
            if not await store.wait_beyond(task_id, cursor):
                return None
            continue
        return []
