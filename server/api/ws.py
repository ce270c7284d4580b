"""WebSocket /ws: a session's live events, with resume, and chat/stop/ping commands.

This module is the adapter: ASGI in and out (``AsgiWebSocket``), the commands
(``WsConnection``), the one sending task (``WsWriter``) and the watchdog over sends
(``WsHub``). What to send next is decided by ``ws_delivery.Delivery``, which does no I/O.

Shape of one connection: a receive loop (commands) and one writer, the pump, which is the
only task that sends. Each followed task is a cursor and a watch on its event log; an
append marks the task ready and wakes the pump, which reads past the cursor and sends.
One writer per connection instead of one task per followed log means one wake-up for
however many tasks appended meanwhile, and it batches for free: when the pump comes back
to a task it sends everything that piled up since, as one ``events`` message to a client
that asked for batches (``?batch=1``) and as consecutive ``event`` messages otherwise.
The pump's order is control before data (``ws_delivery`` says how).

A client that reads slowly makes the pump wait on its sends: it costs no queue and no
memory (cursors, not buffers), and never slows a task or another connection. A follower
more than ``ws_max_lag_events`` behind its task, or one send stuck longer than
``ws_send_timeout_s`` (seen by the ``WsHub`` watchdog), closes the connection with code
4008; the client reconnects with ``?session_id=`` and subscribes with ``after`` set to the
last ``seq`` it saw, losing nothing.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from typing import Any, Protocol, assert_never, cast
from urllib.parse import parse_qsl

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

from server.api.admission import check_chat, refusal
from server.api.origin import check_origin
from server.api.skip import StepEnded, skip_step
from server.api.ws_commands import (
    ChatCommand,
    PingCommand,
    SkipCommand,
    StopCommand,
    SubscribeCommand,
    UnsubscribeCommand,
    message_object,
    parse_command,
)
from server.api.ws_delivery import (
    Delivery,
    Done,
    FindTask,
    LogEvent,
    LogState,
    ReadLog,
    Send,
    Wait,
)
from server.events import Event
from server.runtime import Runtime
from server.schemas import RequestError
from server.sessions import Session
from server.tasks.errors import TaskRefused

log = logging.getLogger("tether.ws")

CLOSE_TOO_SLOW = 4008
# RFC 6455's "service restart": this server is going away, another one will answer.
CLOSE_RESTART = 1012
# RFC 6455's "try again later": the shared task store did not answer.
CLOSE_TRY_LATER = 1013
CLOSE_NOT_FOUND = 4404
_RESTART_CLOSE = (CLOSE_RESTART, "server restarting: reconnect with session_id")
# Replies waiting for the pump before the receive loop stops reading more commands.
_MAX_PENDING_REPLIES = 64
PATH = "/ws"


class AsgiWebSocket:
    """The three ASGI calls an accepted ``/ws`` connection makes, straight to hypercorn.

    ``/ws`` is served below the web framework: quart's websocket wrapper costs two tasks,
    a queue and a context per connection, and a layer on every frame, and a connection
    here sends a frame per event. Cancelling a call cancels the ASGI call under it."""

    def __init__(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        self._receive = receive
        self._send = send

    async def send(self, text: str) -> None:
        """Send one text message (a no-op once the client has gone)."""
        await self._send({"type": "websocket.send", "text": text, "bytes": None})

    async def receive(self) -> str | bytes | None:
        """The next message from the client, or None once it has gone."""
        message = await self._receive()
        if message["type"] != "websocket.receive":
            return None
        text = message.get("text")
        return text if text is not None else message.get("bytes") or b""

    async def close(self, code: int, reason: str) -> None:
        await self._send({"type": "websocket.close", "code": code, "reason": reason})


class TextSocket(Protocol):
    async def send(self, text: str) -> None:
        """Send one text message (a no-op once the client has gone)."""
        ...


class _LogPosition(Protocol):
    @property
    def active(self) -> bool: ...

    @property
    def last_seq(self) -> int: ...


class EventSource(Protocol):
    """The task logs the writer reads (the task store)."""

    async def read(
        self, task_id: str, after: int, limit: int | None = None
    ) -> Sequence[LogEvent]: ...

    async def position(self, task_id: str) -> _LogPosition | None: ...


class WsWriter:
    """A connection's only sending task (the pump), doing the I/O its ``Delivery`` asks
    for: reads of the task logs, and sends, shielded and timed for the ``WsHub``."""

    def __init__(
        self, ws: TextSocket, logs: EventSource, *, batch: bool, max_lag_events: int
    ) -> None:
        self._ws = ws
        self._logs = logs
        self._wake = trio.Event()
        # Made when a reply has to wait for room (rare), not with every connection.
        self._reply_room: trio.Event | None = None
        self.delivery = Delivery(batch=batch, max_lag_events=max_lag_events, wake=self._set_wake)
        self.sending_since: float | None = None

    def _set_wake(self) -> None:
        self._wake.set()  # the current event: ``run`` replaces it after each wait

    @property
    def too_slow(self) -> bool:
        return self.delivery.too_slow

    @property
    def restarting(self) -> bool:
        return self.delivery.restarting

    def restart(self) -> None:
        """Close with 1012 once nothing is ready to send."""
        self.delivery.restart()

    def give_up(self) -> None:
        """The client fell too far behind: end the connection (4008) after the message
        in flight."""
        self.delivery.give_up()

    async def reply(self, message: dict[str, Any]) -> None:
        """Queue a reply for the pump; waits only while too many replies are pending (a
        client that sends commands and does not read its answers). Cancelling it drops
        the reply."""
        while self.delivery.pending_replies >= _MAX_PENDING_REPLIES:
            room = self._reply_room = trio.Event()
            await room.wait()
        self.delivery.reply(json.dumps(message))

    async def run(self) -> None:
        """The connection's only writer: replies, then ended tasks, then the rest. Returns
        when the client fell too far behind, or when the server restarts and nothing is
        left to send; cancelled when the client goes (a message in flight is finished
        first)."""
        delivery = self.delivery
        while True:
            step = delivery.next_step()
            match step:
                case Done():
                    return
                case Wait():
                    # No checkpoint between ``next_step`` finding nothing and this wait,
                    # nor between the wait and the reset: a mark cannot fall in between.
                    await self._wake.wait()
                    self._wake = trio.Event()
                case Send(texts=texts, replies=True):
                    if self._reply_room is not None:
                        self._reply_room.set()
                        self._reply_room = None
                    await self._send(texts)
                    delivery.sent()
                case _:
                    task_id = delivery.delivering
                    try:
                        await self._deliver(step)
                    except Exception:  # a bug or a backend failure costs this follower, not all
                        log.exception("delivering task %s failed", task_id)
                        delivery.abandon()

    async def _deliver(self, step: ReadLog | FindTask | Send) -> None:
        """One step of a follower's turn; cancelling it cancels a read (a send is
        shielded)."""
        match step:
            case ReadLog(task_id=task_id, after=after, limit=limit):
                self.delivery.receive_events(await self._logs.read(task_id, after, limit))
            case FindTask(task_id=task_id):
                position = await self._logs.position(task_id)
                self.delivery.receive_log_state(
                    None if position is None else LogState(position.active, position.last_seq)
                )
            case Send(texts=texts):
                await self._send(texts)
                self.delivery.sent()

    async def _send(self, texts: Sequence[str]) -> None:
        """Send whole messages. Shielded: the pump is cancelled only when the connection
        ends, and a frame cut half-way would corrupt the close frame that may follow. A
        send to a client that is gone returns at once; one to a client that does not read
        is noticed by the ``WsHub`` watchdog through ``sending_since``."""
        with trio.CancelScope(shield=True):
            for text in texts:
                self.sending_since = trio.current_time()  # per message: "one send stuck"
                await self._ws.send(text)
        self.sending_since = None


class WsHub:
    """The app's live WebSocket connections, and the one watchdog over their sends.

    A send that a client does not read can block for as long as TCP lets it; the pump
    cannot time it out itself without cutting a frame. One sweep over every connection
    every half second costs far less than a timer per connection.
    """

    def __init__(self, send_timeout_s: float) -> None:
        # The writers of the live connections: what the watchdog watches.
        self.writers: set[WsWriter] = set()
        self._send_timeout_s = send_timeout_s
        # How a connection told to restart closes: the server's restart, or (while the
        # task store cannot hear this process) a try-again-later.
        self.restart_close = _RESTART_CLOSE

    async def run(self) -> None:
        """Sweep until cancelled (the app's shutdown); cancelling it just ends the sweeps.
        A send timeout of 0 or less turns the watchdog off."""
        if self._send_timeout_s <= 0:
            return
        period = max(0.05, min(0.5, self._send_timeout_s / 2))
        while True:
            await trio.sleep(period)
            deadline = trio.current_time() - self._send_timeout_s
            for writer in self.writers:
                since = writer.sending_since
                if since is not None and since < deadline:
                    writer.give_up()

    def close_all(self) -> None:
        """The server is shutting down: every connection sends what is ready for it (the
        terminal events of its tasks, stopped by now) and closes with 1012, which tells
        the client to reconnect, to another replica if there is one."""
        self.restart_close = _RESTART_CLOSE
        for writer in self.writers:
            writer.restart()

    def reach_changed(self, reachable: bool) -> None:
        """The task store's news (``TaskManager.add_reach_listener``). Cut off from it,
        this process's connections would wait for events it cannot have: each sends
        what is ready and closes with 1013, and its client reconnects (to a replica that
        can reach the store, as readiness sends it) and resumes from its cursors."""
        if reachable:
            self.restart_close = _RESTART_CLOSE
            return
        self.restart_close = (
            CLOSE_TRY_LATER,
            "this replica cannot reach its task store: reconnect with session_id",
        )
        for writer in self.writers:
            writer.restart()


class WsConnection:
    def __init__(self, rt: Runtime, user: str, ws: AsgiWebSocket, *, batch: bool) -> None:
        self.rt = rt
        self.user = user
        self._ws = ws
        self.writer = WsWriter(
            ws, rt.manager.store, batch=batch, max_lag_events=rt.settings.ws_max_lag_events
        )
        self.session: Session | None = None
        # Whether the client named its session (``?session_id=``): a session made for
        # this connection has no tasks yet, and listing them would cost a read of every
        # task of the user on a shared store.
        self.named_session = False
        self._running = False
        # While this connection's own chat is being admitted, tasks started in the session
        # wait here: its own must be answered (``task``) before its events, and another's
        # (spawned meanwhile elsewhere in the session) is followed right after.
        self._spawning = False
        self._deferred: list[str] = []

    # -- following ------------------------------------------------------------------------

    def auto_follow(self, task_id: str) -> None:
        """A task was started in this session: follow it from the start. While this
        connection's own ``chat`` is being admitted, it follows later (its own after its
        ``task`` answer)."""
        if self._spawning:
            self._deferred.append(task_id)
        else:
            self.follow(task_id, 0)

    def follow(self, task_id: str, after: int) -> None:
        """Follow a task from ``after`` (replacing any follower of it). Synchronous: the
        replay of what is already in the log goes out with the pump's next round. An
        unknown or expired task is not followed (nothing would ever come)."""
        if not self._running:
            return
        delivery = self.writer.delivery
        delivery.unfollow(task_id)

        def on_append(event: Event) -> None:
            delivery.mark(task_id, event.terminal)

        watch = self.rt.manager.store.watch(task_id, on_append, after)
        if watch is None:
            return
        delivery.follow(task_id, after, watch)

    # -- commands -------------------------------------------------------------------------

    async def run(self, hub: WsHub) -> None:
        """Serve the connection until the client goes or falls too far behind (then close
        it with 4008). The pump runs in this task; the receive loop ends it all when the
        client goes."""
        hub.writers.add(self.writer)
        try:
            async with trio.open_nursery() as nursery:
                self._running = True
                assert self.session is not None
                await self.writer.reply(
                    {
                        "type": "session",
                        "session_id": self.session.id,
                        "tasks": await self._session_tasks(),
                    }
                )
                nursery.start_soon(self._receive_loop, nursery.cancel_scope)
                await self.writer.run()
                nursery.cancel_scope.cancel()
        finally:
            self._running = False
            hub.writers.discard(self.writer)
            self.writer.delivery.unfollow_all()
            if self.session is not None:
                self.rt.sessions.detach(self.session, self)
        if self.writer.restarting and not self.writer.too_slow:
            await self._ws.close(*hub.restart_close)
        elif self.writer.too_slow:
            # The close frame queues behind what the kernel already holds for the client:
            # a slow reader gets it after those messages; a dead one is dropped by
            # TCP_USER_TIMEOUT (see cli.py). The session was detached above, so waiting
            # here holds nothing else.
            await self._ws.close(
                CLOSE_TOO_SLOW, "too slow: reconnect with session_id, subscribe with after"
            )

    async def _session_tasks(self) -> list[dict[str, Any]]:
        """The session's tasks still running or retained, oldest first, with where their
        logs are: a connection re-attaching with ``?session_id=`` resubscribes to each with
        the ``after`` it last saw (tasks already running are not followed on their own)."""
        assert self.session is not None
        if not self.named_session:
            return []
        records = await self.rt.manager.store.list_tasks(
            self.user, session_id=self.session.id, include_finished=True
        )
        return [
            {
                "task_id": r.id,
                "chat_id": r.chat_id,
                "message_id": r.message_id,
                "status": r.status,
                "phase": r.phase,
                "last_seq": r.last_seq,
            }
            for r in records
        ]

    async def _receive_loop(self, connection: trio.CancelScope) -> None:
        while (raw := await self._ws.receive()) is not None:
            await self._handle(raw)
        connection.cancel()  # the client has gone

    async def _handle(self, raw: str | bytes) -> None:
        """Answer one message. Cancelling it (the client went) drops its answer; a stop
        already asked for stands."""
        ref: str | None = None
        try:
            message = message_object(raw)
            kind = message.get("type")
            ref = kind if isinstance(kind, str) else None
            if kind == "chat":
                # The bound is on the message as it came, before any field is looked at.
                self._check_size(len(raw))
            match command := parse_command(message):
                case PingCommand():
                    await self.writer.reply({"type": "pong"})
                case ChatCommand(request=request):
                    await self._chat(request)
                case SubscribeCommand(task_id=task_id, after=after):
                    await self._own_task(task_id)
                    with await self.rt.manager.resume_span_of(task_id, "ws", after):
                        self.follow(task_id, after)
                case UnsubscribeCommand(task_id=task_id):
                    self.writer.delivery.unfollow(await self._own_task(task_id))
                case StopCommand(task_id=task_id):
                    await self._stop(await self._own_task(task_id))
                case SkipCommand(task_id=task_id, step=step):
                    answer = await skip_step(self.rt, self.user, task_id, step)
                    await self.writer.reply({"type": "skip", **answer})
                case _:  # a command added to the union without its case here
                    assert_never(command)
        except (RequestError, TaskRefused) as failure:
            exc = refusal(failure) if isinstance(failure, TaskRefused) else failure
            error: dict[str, Any] = {"code": exc.code, "message": exc.message}
            if exc.param is not None:
                error["param"] = exc.param
            reply: dict[str, Any] = {"type": "error", "error": error, "ref": ref}
            if isinstance(exc, StepEnded):
                reply["step"] = exc.step_state
            await self.writer.reply(reply)
        except Exception:  # a bug must cost one message, not the connection
            log.exception("WebSocket message failed")
            await self.writer.reply(
                {
                    "type": "error",
                    "error": {"code": "internal_error", "message": "Internal error."},
                    "ref": ref,
                }
            )

    async def _own_task(self, task_id: str) -> str:
        """The task id, if it names a task of this connection's user; ``not_found`` (as
        for an unknown id) otherwise."""
        if not await self.rt.manager.owns(self.user, task_id):
            raise RequestError(404, "not_found", f"No task {task_id!r}.", param="task_id")
        return task_id

    async def _stop(self, task_id: str) -> None:
        """Stop a task anywhere; its terminal event reaches this connection. Cancelling it
        may leave the stop unasked."""
        record = await self.rt.manager.store.get(task_id)
        following = self.writer.delivery.is_following(task_id)
        if not following and record is not None and record.active:
            # Follow from where the task is, so its terminal event reaches us.
            self.follow(task_id, record.last_seq)
        await self.rt.manager.stop(task_id, "stop")

    def _check_size(self, size: int) -> None:
        if size > self.rt.settings.max_body_bytes:
            raise RequestError(
                413,
                "payload_too_large",
                f"The request is larger than {self.rt.settings.max_body_bytes} bytes.",
            )

    async def _chat(self, body: dict[str, Any]) -> None:
        """Admit and spawn a chat task bound to the session, answer ``task``, then follow
        it. Cancelling it before the spawn starts nothing; after, the task runs on in the
        session."""
        arrived = time.perf_counter()
        assert self.session is not None
        chat = await check_chat(
            self.rt, self.user, {**body, "session_id": self.session.id, "background": False}
        )
        self._spawning = True
        record = None
        try:
            record = await self.rt.manager.spawn(self.user, chat)
        finally:
            self._spawning = False
            others = [t for t in self._deferred if record is None or t != record.id]
            self._deferred = []
            for task_id in others:
                self.follow(task_id, 0)
        self.rt.metrics.time_to_task_id.labels("ws").observe(time.perf_counter() - arrived)
        # The answer goes out first; the follower then replays the task's log from seq 1.
        await self.writer.reply(
            {
                "type": "task",
                "task_id": record.id,
                "chat_id": record.chat_id,
                "message_id": record.message_id,
            }
        )
        self.follow(record.id, 0)


async def serve(
    rt: Runtime, hub: WsHub, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
) -> None:
    """One ``/ws`` connection of a session, as an ASGI call. Cancelled when the server
    shuts down; ends when the client goes: the connection leaves its session, whose grace
    period then decides its tasks' fate."""
    if (await receive())["type"] != "websocket.connect":
        return
    try:
        user, batch, session_id = _upgrade(rt, scope)
    except RequestError as exc:
        await _refuse(scope, send, exc)
        return
    await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
    ws = AsgiWebSocket(receive, send)
    conn = WsConnection(rt, user, ws, batch=batch)
    conn.named_session = session_id is not None
    try:
        session = await rt.sessions.attach(user, session_id, conn)
    except TaskRefused as failure:
        refused = refusal(failure)
        await ws.send(
            json.dumps(
                {
                    "type": "error",
                    "error": {"code": refused.code, "message": refused.message},
                    "ref": "session",
                }
            )
        )
        await ws.close(
            CLOSE_NOT_FOUND if refused.status == 404 else CLOSE_TRY_LATER, refused.message
        )
        return
    conn.session = session
    await conn.run(hub)


def _upgrade(rt: Runtime, scope: Scope) -> tuple[str, bool, str | None]:
    """The upgrade's user, whether it asked for batches, and its ``session_id``; raises
    ``RequestError`` for a refused origin or key. The headers and query, read into dicts
    here, are dropped on return rather than held for the connection's lifetime."""
    headers = {
        name.decode("latin-1").lower(): value.decode("latin-1")
        for name, value in cast(Any, scope)["headers"]
    }
    args = dict(parse_qsl(cast(Any, scope)["query_string"].decode("latin-1")))
    check_origin(headers.get("origin"), headers.get("host"), rt.settings.ws_allowed_origins)
    user = rt.auth.user_for(headers.get("authorization"), args.get("token"))
    return user, args.get("batch", "") in ("1", "true"), args.get("session_id")


async def _refuse(scope: Scope, send: ASGISendCallable, exc: RequestError) -> None:
    """Answer the upgrade with the error as HTTP (401 or 403 with the OpenAI error body), where
    the server can (hypercorn can); else refuse it with a close."""
    if "websocket.http.response" not in (cast(Any, scope).get("extensions") or {}):
        await send({"type": "websocket.close", "code": 1008, "reason": exc.message})
        return
    body = json.dumps(exc.body()).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
        *((k.lower().encode(), v.encode()) for k, v in exc.headers.items()),
    ]
    await send(
        cast(
            Any, {"type": "websocket.http.response.start", "status": exc.status, "headers": headers}
        )
    )
    await send(
        cast(Any, {"type": "websocket.http.response.body", "body": body, "more_body": False})
    )
