"""WebSocket /ws: a session's live events, with resume, and chat/stop/ping commands.

Shape of one connection: a nursery holding a receive loop (commands), one follower per
followed task (each reads its task's event log through a cursor) and one writer. Followers
hand messages to the writer through a small bounded channel, so a client that reads slowly
makes its own followers wait on their cursors: it costs no queue and no memory, and never
slows the task or another connection. A follower that falls more than ``ws_max_lag_events``
behind its task, or a writer stuck longer than ``ws_send_timeout_s`` on one message, closes
the connection with code 4008; the client reconnects with ``?session_id=`` and subscribes
with ``after`` set to the last ``seq`` it saw, losing nothing.
"""

from __future__ import annotations

import json
from typing import Any

import trio
from quart import Blueprint, Response, websocket

from server.api.common import error_response, runtime
from server.runtime import Runtime
from server.schemas import RequestError, parse_chat_request
from server.sessions import Session, SessionRegistry

blueprint = Blueprint("ws", __name__)

CLOSE_TOO_SLOW = 4008
CLOSE_NOT_FOUND = 4404


class _TooSlow(Exception):
    pass


class WsConnection:
    def __init__(self, rt: Runtime, user: str) -> None:
        self.rt = rt
        self.user = user
        self.session: Session | None = None
        self._nursery: trio.Nursery | None = None
        self._followers: dict[str, trio.CancelScope] = {}
        self._cursors: dict[str, int] = {}
        self._out_send, self._out_recv = trio.open_memory_channel[str](64)
        self.too_slow = trio.Event()

    # -- following ------------------------------------------------------------------------

    def follow(self, task_id: str, after: int) -> None:
        """Follow a task from ``after`` (replacing any follower of it). Synchronous."""
        if self._nursery is None:
            return
        old = self._followers.pop(task_id, None)
        if old is not None:
            old.cancel()
        self._cursors[task_id] = after
        scope = trio.CancelScope()
        self._followers[task_id] = scope
        self._nursery.start_soon(self._follow, task_id, after, scope)

    def unfollow(self, task_id: str) -> bool:
        scope = self._followers.pop(task_id, None)
        self._cursors.pop(task_id, None)
        if scope is not None:
            scope.cancel()
        return scope is not None

    async def _follow(self, task_id: str, after: int, scope: trio.CancelScope) -> None:
        """Replay the log past ``after`` then follow it live; one cursor, so the seam
        between replay and live has no gap and no duplicate."""
        backend = self.rt.manager.backend
        cursor = after
        with scope:
            while True:
                events = await backend.read(task_id, cursor, 256)
                if not events:
                    await backend.wait_beyond(task_id, cursor)
                    if not await backend.read(task_id, cursor, 1):
                        break  # closed log with nothing new, or the task expired
                    continue
                for event in events:
                    await self._out_send.send(
                        json.dumps({"type": "event", "event": event.to_dict()})
                    )
                    cursor = event.seq
                    if self._followers.get(task_id) is scope:
                        self._cursors[task_id] = cursor
                    if event.terminal:
                        if self._followers.get(task_id) is scope:
                            del self._followers[task_id]
                            del self._cursors[task_id]
                        return

    async def _watch_lag(self) -> None:
        """Close a connection whose followers fall too far behind their tasks. Followers
        that wait on a full writer cannot check this themselves."""
        backend = self.rt.manager.backend
        max_lag = self.rt.settings.ws_max_lag_events
        while True:
            await trio.sleep(0.5)
            for task_id, cursor in list(self._cursors.items()):
                record = await backend.get(task_id)
                if record is not None and record.last_seq - cursor > max_lag:
                    self.too_slow.set()
                    return

    # -- sending --------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        await self._out_send.send(json.dumps(message))

    def send_now(self, message: dict[str, Any]) -> None:
        """Queue a reply ahead of anything a follower started by this command sends."""
        try:
            self._out_send.send_nowait(json.dumps(message))
        except trio.WouldBlock:
            assert self._nursery is not None
            self._nursery.start_soon(self.send, message)

    async def _writer(self) -> None:
        timeout = self.rt.settings.ws_send_timeout_s
        async for text in self._out_recv:
            with trio.move_on_after(timeout) as waited:
                await websocket.send(text)
            if waited.cancelled_caught:
                self.too_slow.set()
                return

    # -- commands -------------------------------------------------------------------------

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._writer)
            nursery.start_soon(self._watch_lag)
            assert self.session is not None
            await self.send({"type": "session", "session_id": self.session.id})
            nursery.start_soon(self._receive_loop)
            await self.too_slow.wait()
            nursery.cancel_scope.cancel()
        # Only reached when the client fell behind: tell it how to resume, if it listens.
        with trio.move_on_after(1.0):
            await websocket.close(CLOSE_TOO_SLOW,
                                  "too slow: reconnect with session_id, subscribe with after")

    async def _receive_loop(self) -> None:
        while True:
            raw = await websocket.receive()
            await self._handle(raw)

    async def _handle(self, raw: str | bytes) -> None:
        ref: str | None = None
        try:
            try:
                message = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                raise RequestError(400, "invalid_json", "The message is not valid JSON.") from None
            if not isinstance(message, dict):
                raise RequestError(400, "invalid_request", "A message must be a JSON object.")
            kind = message.get("type")
            ref = kind if isinstance(kind, str) else None
            if kind == "ping":
                await self.send({"type": "pong"})
            elif kind == "chat":
                await self._chat(message)
            elif kind == "subscribe":
                task_id = await self._own_task(message)
                after = message.get("after", 0)
                if not isinstance(after, int) or isinstance(after, bool) or after < 0:
                    raise RequestError(400, "invalid_request",
                                       "'after' must be a non-negative integer.")
                self.follow(task_id, after)
            elif kind == "unsubscribe":
                task_id = await self._own_task(message)
                self.unfollow(task_id)
            elif kind == "stop":
                task_id = await self._own_task(message)
                if task_id not in self._followers and self.rt.manager.is_running(task_id):
                    record = await self.rt.manager.backend.get(task_id)
                    # Follow from where the task is, so its terminal event reaches us.
                    self.follow(task_id, record.last_seq if record else 0)
                self.rt.manager.stop(task_id, "stop")
            elif kind is None:
                raise RequestError(400, "invalid_request", "Missing field 'type'.")
            else:
                raise RequestError(400, "unknown_type", f"Unknown message type {kind!r}.")
        except RequestError as exc:
            await self.send({"type": "error", "error": {"code": exc.code, "message": exc.message},
                             "ref": ref})

    async def _own_task(self, message: dict[str, Any]) -> str:
        task_id = message.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise RequestError(400, "invalid_request", "Missing field 'task_id'.")
        if await self.rt.manager.get(self.user, task_id) is None:
            raise RequestError(404, "not_found", f"No task {task_id!r}.")
        return task_id

    async def _chat(self, message: dict[str, Any]) -> None:
        body = message.get("request")
        if not isinstance(body, dict):
            raise RequestError(400, "invalid_request", "Missing field 'request' (an object).")
        assert self.session is not None
        chat = parse_chat_request({**body, "session_id": self.session.id, "background": False},
                                  default_model=self.rt.settings.default_model)
        unknown = [t for t in chat.tool_ids if t not in self.rt.tools]
        if unknown:
            raise RequestError(400, "invalid_request", f"Unknown tool_ids: {', '.join(unknown)}.")
        if self.rt.models.resolve(chat.model) is None:
            raise RequestError(404, "model_not_found", f"The model {chat.model!r} does not exist.")
        record = await self.rt.manager.spawn(self.user, chat)
        # spawn() scheduled this connection's follower but it has not run yet: the answer
        # is queued first.
        self.send_now({"type": "task", "task_id": record.id, "chat_id": record.chat_id,
                       "message_id": record.message_id})


def sessions() -> SessionRegistry:
    registry = runtime().extensions["sessions"]
    assert isinstance(registry, SessionRegistry)
    return registry


@blueprint.websocket("/ws")
async def ws() -> Response | None:
    rt = runtime()
    try:
        user = rt.auth.user_for(websocket.headers.get("Authorization"),
                                websocket.args.get("token"))
    except RequestError as exc:
        return error_response(exc)  # an HTTP 401 instead of the upgrade
    await websocket.accept()
    conn = WsConnection(rt, user)
    try:
        session = sessions().attach(user, websocket.args.get("session_id"), conn)
    except RequestError as exc:
        await websocket.send(json.dumps({"type": "error", "error": {
            "code": exc.code, "message": exc.message}, "ref": "session"}))
        await websocket.close(CLOSE_NOT_FOUND, exc.message)
        return None
    conn.session = session
    try:
        await conn.run()
    finally:
        sessions().detach(session, conn)
    return None
