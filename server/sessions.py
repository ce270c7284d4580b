"""WebSocket sessions: which connections belong to a session, and its reconnect grace.

A session belongs to one user and may have several connections at once (two browser
tabs). Tasks started with its ``session_id`` (and not ``background: true``) are bound to
it: when its last connection closes, they go on for the grace period; a connection to the
same session within it keeps them; after it they are stopped with reason ``disconnect``.
This module holds that state and the grace timers; it moves no bytes.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field
from typing import Protocol

import trio

from server.record import TaskRecord
from server.tasks.errors import TaskRefused, UnknownSession
from server.tasks.manager import TaskManager

log = logging.getLogger("tether.sessions")

# The pauses between tries of a connection's count that the shared store did not take.
_UNCOUNTED_PAUSE_S = 0.25
_UNCOUNTED_PAUSE_MAX_S = 5.0


class SessionConnection(Protocol):
    def auto_follow(self, task_id: str) -> None:
        """Start following a new task of the session (synchronously schedules it)."""
        ...


@dataclass(eq=False)
class Session:
    id: str
    user: str
    connections: set[SessionConnection] = field(default_factory=set)
    grace: trio.CancelScope | None = None


def new_session_id() -> str:
    return "sess_" + secrets.token_hex(12)


class SessionRegistry:
    def __init__(self, manager: TaskManager, grace_s: float) -> None:
        self._manager = manager
        self._grace_s = grace_s
        self._sessions: dict[str, Session] = {}
        self._nursery: trio.Nursery | None = None
        manager.add_spawn_listener(self._on_spawn)
        manager.add_follow_listener(self._on_remote_spawn)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the nursery of the grace timers. Cancelling it drops pending timers (the
        task manager's shutdown stops the tasks anyway)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            task_status.started()
            await trio.sleep_forever()

    async def check_owner(self, user: str, session_id: str) -> None:
        """Raise ``UnknownSession`` for another user's session; an unknown one becomes
        ``user``'s (in every process sharing the task space)."""
        session = self._sessions.get(session_id)
        if session is not None and session.user != user:
            raise UnknownSession(session_id)
        if not await self._manager.cluster.claim_session(session_id, user):
            raise UnknownSession(session_id)

    def _local(self, user: str, session_id: str) -> Session:
        session = self._sessions.get(session_id)
        if session is None:
            session = Session(session_id, user)
            self._sessions[session_id] = session
        return session

    async def attach(self, user: str, session_id: str | None, conn: SessionConnection) -> Session:
        """Join a connection to its session (a new one without ``session_id``). Raises
        ``UnknownSession`` for another user's, ``BackendUnavailable`` if the shared store
        fails."""
        session_id = session_id or new_session_id()
        await self.check_owner(user, session_id)
        await self._manager.cluster.session_presence(session_id, user, +1)
        session = self._local(user, session_id)
        if session.grace is not None:
            session.grace.cancel()
            session.grace = None
        session.connections.add(conn)
        return session

    def detach(self, session: Session, conn: SessionConnection) -> None:
        """Called when a connection closes (synchronously, also from a cancelled handler);
        the session's grace period starts when its last connection anywhere has gone."""
        session.connections.discard(conn)
        if self._nursery is not None:
            self._nursery.start_soon(self._left, session)

    async def _left(self, session: Session) -> None:
        """Count the closed connection out, then start the grace if it was the last here.
        A count the shared store does not take is given again until it does (a process
        cut off from Redis closes its WebSockets just when it cannot count them out): a
        count left behind would make every other process think the client is still here,
        and its session's tasks would never be stopped."""
        pause = _UNCOUNTED_PAUSE_S
        while True:
            try:
                await self._manager.cluster.session_presence(session.id, session.user, -1)
                break
            except TaskRefused as exc:
                if pause == _UNCOUNTED_PAUSE_S:
                    log.warning(
                        "session %s: a closed connection was not counted out yet: %s",
                        session.id,
                        exc.message,
                    )
                    self._grace_if_last(session)  # not held back by the count
                await trio.sleep(pause)
                pause = min(2 * pause, _UNCOUNTED_PAUSE_MAX_S)
        if pause == _UNCOUNTED_PAUSE_S:
            self._grace_if_last(session)

    def _grace_if_last(self, session: Session) -> None:
        if not session.connections and session.grace is None:
            self._start_grace(session)

    def _start_grace(self, session: Session) -> None:
        if self._nursery is None:
            return
        scope = trio.CancelScope()
        session.grace = scope
        self._nursery.start_soon(self._grace_timer, session, scope)

    async def _grace_timer(self, session: Session, scope: trio.CancelScope) -> None:
        with scope:
            await trio.sleep(max(self._grace_s, 0))
            if session.grace is not scope or session.connections:
                return
            session.grace = None
            if self._sessions.get(session.id) is session:
                del self._sessions[session.id]
            try:
                if await self._manager.cluster.session_connected_elsewhere(session.id):
                    return  # the client came back through another process
                for record in await self._manager.store.list_tasks(
                    session.user, session_id=session.id
                ):
                    if record.session_bound:
                        await self._manager.stop(record.id, "disconnect")
            except TaskRefused as exc:
                log.warning(
                    "session %s: its tasks could not be stopped: %s", session.id, exc.message
                )

    def _on_spawn(self, record: TaskRecord) -> None:
        if record.session_id is None:
            return
        if not record.session_bound:
            session = self._sessions.get(record.session_id)
        else:
            session = self._local(record.user, record.session_id)
            if not session.connections and session.grace is None:
                # Started over HTTP for a session nobody here is connected to: its tasks
                # live for the grace period unless a connection comes, here or elsewhere
                # (grace 0: not at all).
                self._start_grace(session)
        for conn in list(session.connections if session else ()):
            conn.auto_follow(record.id)
        if self._nursery is not None:
            self._nursery.start_soon(self._announce, record.session_id, record.id)

    async def _announce(self, session_id: str, task_id: str) -> None:
        try:
            await self._manager.cluster.announce_task(session_id, task_id)
        except TaskRefused as exc:
            log.warning("task %s not announced to its session elsewhere: %s", task_id, exc.message)

    def _on_remote_spawn(self, session_id: str, task_id: str) -> None:
        session = self._sessions.get(session_id)
        for conn in list(session.connections if session else ()):
            conn.auto_follow(task_id)
