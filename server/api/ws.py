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
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import trio
from quart import Blueprint, Response, websocket

from server.api.common import error_response, runtime
from server.runtime import Runtime
from server.schemas import RequestError, parse_chat_request
from server.sessions import Session
from server.tasks.backend import next_events

blueprint = Blueprint("ws", __name__)
log = logging.getLogger("tether.ws")

CLOSE_TOO_SLOW = 4008
CLOSE_NOT_FOUND = 4404


class _TooSlow(Exception):
    pass


@dataclass(eq=False)
class _Follower:
    """One followed task: where its reader is, and the scope that ends it."""

    cursor: int
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)


class WsConnection:
    def __init__(self, rt: Runtime, user: str) -> None:
        self.rt = rt
        self.user = user
        self.session: Session | None = None
        self._nursery: trio.Nursery | None = None
        self._followers: dict[str, _Follower] = {}
        self._send_lock = trio.Lock()
        # The connection's own websocket, not the context-local proxy: followers may be
        # started from another connection's task (a chat in the same session), and would
        # otherwise resolve the proxy to that connection.
        self._ws = websocket._get_current_object()  # type: ignore[attr-defined]
        self.too_slow = trio.Event()
        self._spawning = False
        self._sending_since: float | None = None

    # -- following ------------------------------------------------------------------------

    def auto_follow(self, task_id: str) -> None:
        """A task was started in this session: follow it from the start. While this
        connection's own ``chat`` is spawning, it follows later, after its ``task`` answer."""
        if not self._spawning:
            self.follow(task_id, 0)

    def follow(self, task_id: str, after: int) -> None:
        """Follow a task from ``after`` (replacing any follower of it). Synchronous."""
        if self._nursery is None:
            return
        self.unfollow(task_id)
        follower = _Follower(after)
        self._followers[task_id] = follower
        self._nursery.start_soon(self._follow, task_id, follower)

    def unfollow(self, task_id: str) -> bool:
        follower = self._followers.pop(task_id, None)
        if follower is not None:
            follower.scope.cancel()
        return follower is not None

    async def _follow(self, task_id: str, follower: _Follower) -> None:
        """Replay the log past the follower's cursor then follow it live; one cursor, so
        the seam between replay and live has no gap and no duplicate."""
        backend = self.rt.manager.backend
        try:
            with follower.scope, backend.reading(task_id):
                while (events := await next_events(backend, task_id, follower.cursor)):
                    for event in events:
                        await self._write('{"type":"event","event":' + event.json + "}")
                        follower.cursor = event.seq
                        if event.terminal:
                            return
        finally:
            if self._followers.get(task_id) is follower:
                del self._followers[task_id]

    async def _watch_lag(self) -> None:
        """Close a connection whose followers fall too far behind their tasks. Followers
        that wait on a full writer cannot check this themselves."""
        backend = self.rt.manager.backend
        max_lag = self.rt.settings.ws_max_lag_events
        send_timeout = self.rt.settings.ws_send_timeout_s
        while True:
            await trio.sleep(min(0.5, send_timeout / 2))
            since = self._sending_since
            if since is not None and trio.current_time() - since > send_timeout:
                self.too_slow.set()
                return
            for task_id, follower in list(self._followers.items()):
                record = await backend.get(task_id)
                if record is not None and record.last_seq - follower.cursor > max_lag:
                    self.too_slow.set()
                    return

    # -- sending --------------------------------------------------------------------------

    async def send(self, message: dict[str, Any]) -> None:
        await self._write(json.dumps(message))

    async def _write(self, text: str) -> None:
        """Send one message; followers and replies take turns on the lock.

        The send itself is shielded: cancelling a follower (unsubscribe, resubscribe, the
        connection closing) half-way through a frame would corrupt the stream for every
        other follower. A send to a client that is gone returns at once; one to a client
        that does not read is noticed by ``_watch_lag`` through ``_sending_since``.
        Writing directly, without a writer task in between, saves a task switch per event.
        """
        async with self._send_lock:
            self._sending_since = trio.current_time()
            with trio.CancelScope(shield=True):
                await self._ws.send(text)
            self._sending_since = None

    # -- commands -------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until the client goes (quart-trio cancels this) or falls
        too far behind (then close it with 4008)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                nursery.start_soon(self._watch_lag)
                assert self.session is not None
                await self.send({"type": "session", "session_id": self.session.id})
                nursery.start_soon(self._receive_loop)
                await self.too_slow.wait()
                nursery.cancel_scope.cancel()
        finally:
            self._nursery = None
            if self.session is not None:
                self.rt.sessions.detach(self.session, self)
        # Only reached when the client fell behind. The close frame queues behind what
        # the kernel already holds for the client: a slow reader gets it after those
        # messages; a dead one is dropped by TCP_USER_TIMEOUT (see cli.py). The session
        # was detached above, so waiting here holds nothing else.
        await self._ws.close(CLOSE_TOO_SLOW,
                              "too slow: reconnect with session_id, subscribe with after")

    async def _receive_loop(self) -> None:
        while True:
            raw = await self._ws.receive()
            await self._handle(raw)

    async def _handle(self, raw: str | bytes) -> None:
        ref: str | None = None
        try:
            try:
                message = json.loads(raw)
            except (ValueError, UnicodeDecodeError, RecursionError):
                raise RequestError(400, "invalid_json", "The message is not valid JSON.") from None
            if not isinstance(message, dict):
                raise RequestError(400, "invalid_request", "A message must be a JSON object.")
            kind = message.get("type")
            ref = kind if isinstance(kind, str) else None
            if kind == "ping":
                await self.send({"type": "pong"})
            elif kind == "chat":
                await self._chat(message, len(raw))
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
        except Exception:  # a bug must cost one message, not the connection
            log.exception("WebSocket message failed")
            await self.send({"type": "error", "error": {"code": "internal_error",
                                                        "message": "Internal error."},
                             "ref": ref})

    async def _own_task(self, message: dict[str, Any]) -> str:
        task_id = message.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise RequestError(400, "invalid_request", "Missing field 'task_id'.")
        if await self.rt.manager.get(self.user, task_id) is None:
            raise RequestError(404, "not_found", f"No task {task_id!r}.")
        return task_id

    async def _chat(self, message: dict[str, Any], size: int) -> None:
        arrived = time.perf_counter()
        if size > self.rt.settings.max_body_bytes:
            raise RequestError(413, "payload_too_large",
                               f"The request is larger than {self.rt.settings.max_body_bytes} "
                               "bytes.")
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
        self._spawning = True
        try:
            record = await self.rt.manager.spawn(self.user, chat)
        finally:
            self._spawning = False
        self.rt.metrics.time_to_task_id.labels("ws").observe(time.perf_counter() - arrived)
        # The answer goes out first; the follower then replays the task's log from seq 1.
        await self.send({"type": "task", "task_id": record.id, "chat_id": record.chat_id,
                         "message_id": record.message_id})
        self.follow(record.id, 0)


@blueprint.websocket("/ws")
async def ws() -> Response | None:
    """One WebSocket connection of a session. Cancelled when the client goes:
    the connection leaves its session, whose grace period then decides its tasks' fate."""
    rt = runtime()
    try:
        user = rt.auth.user_for(websocket.headers.get("Authorization"),
                                websocket.args.get("token"))
    except RequestError as exc:
        return error_response(exc)  # an HTTP 401 instead of the upgrade
    await websocket.accept()
    conn = WsConnection(rt, user)
    try:
        session = rt.sessions.attach(user, websocket.args.get("session_id"), conn)
    except RequestError as exc:
        await websocket.send(json.dumps({"type": "error", "error": {
            "code": exc.code, "message": exc.message}, "ref": "session"}))
        await websocket.close(CLOSE_NOT_FOUND, exc.message)
        return None
    conn.session = session
    await conn.run()
    return None
