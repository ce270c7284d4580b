"""A WebSocket client for ``/ws`` (trio-websocket) that timestamps every message it gets.

Events are kept per task as ``Arrival`` records, whether they come one per message
(``{"type": "event", "event": ...}``) or batched (``{"type": "events", "events": [...]}``,
which a server may send to a client that connected with ``?batch=1``; a server that does
not batch ignores the parameter); every other message (``session``, ``task``, ``pong``,
``error``) is a reply, handed out in order.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url


@dataclass
class Arrival:
    at: float  # monotonic arrival time
    seq: int
    type: str
    data: dict[str, Any]


@dataclass
class WsClient:
    ws: WebSocketConnection
    session_id: str = ""
    events: dict[str, list[Arrival]] = field(default_factory=dict)
    replies: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    closed: bool = False
    close_reason: str = ""
    last_event_at: float = 0.0
    batches: int = 0  # ``events`` messages received
    _changed: trio.Event = field(default_factory=trio.Event)
    _waiters: int = 0

    def _notify(self) -> None:
        if self._waiters:
            self._changed.set()
            self._changed = trio.Event()

    def _event(self, ev: dict[str, Any], now: float) -> None:
        arrival = Arrival(now, int(ev["seq"]), str(ev["type"]), ev.get("data") or {})
        self.events.setdefault(str(ev["task_id"]), []).append(arrival)

    async def _reader(self) -> None:
        try:
            while True:
                raw = await self.ws.get_message()
                now = time.monotonic()
                message = json.loads(raw)
                kind = message.get("type")
                if kind == "event":
                    self._event(message["event"], now)
                    self.last_event_at = now
                elif kind == "events":
                    self.batches += 1
                    for ev in message["events"]:
                        self._event(ev, now)
                    self.last_event_at = now
                else:
                    self.replies.append((now, message))
                self._notify()
        except ConnectionClosed as exc:
            self.closed = True
            reason = exc.reason
            self.close_reason = f"{reason.code} {reason.reason or ''}".strip() if reason else ""
            self._notify()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 30.0) -> bool:
        self._waiters += 1
        try:
            with trio.move_on_after(timeout):
                while not predicate():
                    if self.closed:
                        return predicate()
                    await self._changed.wait()
                return True
            return False
        finally:
            self._waiters -= 1

    async def send(self, message: dict[str, Any]) -> float:
        sent_at = time.monotonic()
        await self.ws.send_message(json.dumps(message))
        return sent_at

    async def reply(self, timeout: float = 30.0) -> tuple[float, dict[str, Any]]:
        """The next reply (non-event message), with its arrival time."""
        if not await self.wait_until(lambda: bool(self.replies), timeout):
            raise TimeoutError(f"no WebSocket reply in {timeout} s (closed={self.closed})")
        return self.replies.pop(0)

    async def request(
        self, message: dict[str, Any], timeout: float = 30.0
    ) -> tuple[float, dict[str, Any]]:
        """Send a command and wait for its reply; returns (round trip s, reply)."""
        sent_at = await self.send(message)
        at, answer = await self.reply(timeout)
        return at - sent_at, answer

    async def chat(
        self, request: dict[str, Any], timeout: float = 30.0
    ) -> tuple[float, dict[str, Any]]:
        """Send a ``chat`` and wait for its own ``task`` (or ``error``) reply, matched by
        ``message_id``, so several chats may be in flight on one connection."""
        message_id = request.get("message_id")
        sent_at = await self.send({"type": "chat", "request": request})

        def find() -> int | None:
            for i, (_, reply) in enumerate(self.replies):
                if reply.get("type") == "task" and reply.get("message_id") == message_id:
                    return i
                if reply.get("type") == "error" and reply.get("ref") == "chat":
                    return i
            return None

        if not await self.wait_until(lambda: find() is not None, timeout):
            raise TimeoutError(f"no answer to a chat in {timeout} s")
        index = find()
        assert index is not None
        at, reply = self.replies.pop(index)
        return at - sent_at, reply

    async def ping(self) -> float:
        rtt, answer = await self.request({"type": "ping"})
        if answer.get("type") != "pong":
            raise RuntimeError(f"ping answered {answer!r}")
        return rtt

    def terminal(self, task_id: str) -> Arrival | None:
        for arrival in self.events.get(task_id, ()):
            if arrival.type in ("task:completed", "task:cancelled", "task:failed"):
                return arrival
        return None

    async def wait_terminal(self, task_id: str, timeout: float = 30.0) -> Arrival | None:
        await self.wait_until(lambda: self.terminal(task_id) is not None, timeout)
        return self.terminal(task_id)

    async def wait_event(self, task_id: str, type_: str, timeout: float = 30.0) -> Arrival | None:
        def find() -> Arrival | None:
            for arrival in self.events.get(task_id, ()):
                if arrival.type == type_:
                    return arrival
            return None

        await self.wait_until(lambda: find() is not None, timeout)
        return find()


@asynccontextmanager
async def ws_client(
    url: str, *, connect_timeout: float = 10.0, batch: bool = False
) -> AsyncIterator[WsClient]:
    """Connect, read the ``session`` message, and keep reading in the background.
    ``batch``: ask for batched events (``batch=1`` in the query)."""
    if batch:
        url += ("&" if "?" in url else "?") + "batch=1"
    async with open_websocket_url(
        url,
        max_message_size=16 * 1024 * 1024,
        connect_timeout=connect_timeout,
        disconnect_timeout=2.0,
    ) as ws:
        client = WsClient(ws)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client._reader)
            _, first = await client.reply(connect_timeout)
            if first.get("type") != "session":
                raise RuntimeError(f"first WebSocket message was {first!r}")
            client.session_id = str(first["session_id"])
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
