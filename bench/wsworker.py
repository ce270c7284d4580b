"""A WebSocket client worker process: many lean ``/ws`` clients, driven over stdin/stdout.

One bench process cannot read 15,000 events/s from hundreds of connections and still leave
the server its CPU, so the scale scenarios spread their clients over a few of these workers.
Each client is a trio socket driven by a wsproto client state machine (handshake, framing,
masking, ping and close answers; no per-message channel): one task per connection reads
whatever bytes are there, feeds them to wsproto and handles every text message they complete,
and per event the worker keeps only the seq bookkeeping and the arrival time of each model
token.

    python -m bench.wsworker

Commands, one JSON object per line on stdin, each answered by one JSON line on stdout:

- ``{"cmd": "connect", "host", "port", "path", "n", "mode": "tether"|"floor", "label"}``:
  open ``n`` connections (``path`` may carry ``?batch=1``; ``label``, default ``""``, tells
  them apart in ``analyze``), read each one's ``session`` message; answers
  ``{"sessions": [...]}``.
- ``{"cmd": "chat", "bodies": [...]}``: send ``{"type": "chat", "request": body}`` on
  the i-th connection that has not sent one yet, for body i (the rest send nothing); answers
  ``{"sent_at": t}`` at once. A body's last user message is its marker.
- ``{"cmd": "subscribe", "subs": [{"task_id", "marker", "after"}, ...]}``: follow task i
  (a task started elsewhere, the model request of which carries ``marker``) on the i-th
  connection that has neither chatted nor subscribed yet, with ``{"type": "subscribe",
  "task_id", "after"}``; from then on the connection counts as one with a task, like a
  chatting one. Answers ``{"sent_at": t, "sent": n}``.
- ``{"cmd": "streaming", "deadline_s"}``: wait until every chatting connection has its first
  token (or its terminal event, or is closed), for at most ``deadline_s``; answers
  ``{"at": t}``, the moment the last of them got there (``null`` if some never did).
- ``{"cmd": "wait", "stall_s", "hard_s", "started_at"}``: wait until every chatting connection
  has its terminal event (or is closed), or no event arrived for ``stall_s`` after
  ``started_at + hard_s``; answers ``{"complete", "pending": [task ids], "last_event_at"}``.
- ``{"cmd": "analyze", "schedule": {marker: t0}, "rate", "tokens", "window": [t1, t2],
  "records": {task_id: server record}, "label", "lag_from"}``: per-connection checks (see
  ``_Conn``) and the lags; with ``label``, of the connections opened with that label only;
  with ``lag_from``, lags only of the tokens the fake scheduled from that moment on.
- ``{"cmd": "stop"}``: on every connection with a task, send ``{"type": "stop", "task_id"}``.
- ``{"cmd": "close"}``: close every connection; ``{"cmd": "quit"}``: exit.

Times are ``time.monotonic()`` (CLOCK_MONOTONIC, the same clock in every process).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import trio
from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import (
    AcceptConnection,
    CloseConnection,
    Event,
    Message,
    Ping,
    RejectConnection,
    Request,
    TextMessage,
)
from wsproto.utilities import LocalProtocolError, RemoteProtocolError

TOKEN = re.compile(r"tok(\d+) ")
TERMINAL = frozenset({"task:completed", "task:cancelled", "task:failed"})
FLOOR_TERMINAL = {"done": "task:completed", "failed": "task:failed"}


class WsClosed(Exception):
    pass


class Ws:
    """One client connection: a trio socket and a wsproto client state machine."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.proto = WSConnection(ConnectionType.CLIENT)
        self.parts: list[str] = []  # fragments of an unfinished text message
        self.accepted = False
        self.closed = False
        self.close_reason = ""
        self.send_lock = trio.Lock()

    @classmethod
    async def open(cls, host: str, port: int, path: str) -> Ws:
        """Connect and send the handshake request; ``receive`` reads the answer."""
        ws = cls(await trio.open_tcp_stream(host, port))
        try:
            await ws.send(Request(host=f"{host}:{port}", target=path))
        except BaseException:
            await trio.aclose_forcefully(ws.stream)
            raise
        return ws

    async def send(self, event: Event) -> None:
        async with self.send_lock:  # bytes go out in the order wsproto made them
            try:
                data = self.proto.send(event)
            except LocalProtocolError as exc:
                raise WsClosed(str(exc)) from None
            await self.stream.send_all(data)

    async def send_text(self, text: str) -> None:
        await self.send(Message(data=text))

    async def receive(self) -> list[str]:
        """Read once (whatever bytes are there); every text message they complete."""
        try:
            data = await self.stream.receive_some(65536)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            data = b""
        if not data:
            self.closed = True
            self.close_reason = self.close_reason or (
                "EOF" if self.accepted else "closed during the handshake"
            )
            raise WsClosed(self.close_reason)
        try:
            self.proto.receive_data(data)
        except RemoteProtocolError as exc:  # a bad handshake answer
            self.closed = True
            self.close_reason = f"handshake: {exc}"
            raise WsClosed(self.close_reason) from None
        out: list[str] = []
        for event in self.proto.events():
            if isinstance(event, TextMessage):
                if event.message_finished:
                    if self.parts:
                        self.parts.append(event.data)
                        out.append("".join(self.parts))
                        self.parts = []
                    else:
                        out.append(event.data)
                else:
                    self.parts.append(event.data)
            elif isinstance(event, Ping):
                await self.send(event.response())
            elif isinstance(event, CloseConnection):
                self.close_reason = f"{int(event.code)} {event.reason or ''}".strip()
                if not self.closed:
                    self.closed = True
                    if self.proto.state in (ConnectionState.OPEN, ConnectionState.REMOTE_CLOSING):
                        with contextlib.suppress(
                            WsClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError
                        ):
                            await self.send(event.response())
                raise WsClosed(self.close_reason)
            elif isinstance(event, AcceptConnection):
                self.accepted = True
            elif isinstance(event, RejectConnection):
                self.closed = True
                self.close_reason = f"handshake answered {event.status_code}"
                raise WsClosed(self.close_reason)
        return out

    async def aclose(self) -> None:
        if not self.closed:
            self.closed = True
            if self.proto.state is ConnectionState.OPEN:
                with contextlib.suppress(
                    WsClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError
                ):
                    await self.send(CloseConnection(code=1000))
        await self.stream.aclose()


@dataclass
class _Conn:
    """One client: its connection, its task, and what arrived for it."""

    ws: Ws
    label: str = ""
    session_id: str = ""
    marker: str = ""
    message_id: str = ""
    task_id: str = ""
    chat_sent_at: float = 0.0
    task_at: float = 0.0
    seqs: int = 0  # events received
    highest: int = 0
    out_of_order: int = 0
    terminal: str = ""
    tokens: dict[int, float] = field(default_factory=dict)  # token index -> first arrival
    messages: int = 0  # WebSocket messages received
    errors: list[str] = field(default_factory=list)
    session_ready: trio.Event = field(default_factory=trio.Event)


class Worker:
    def __init__(self) -> None:
        self.conns: list[_Conn] = []
        self.mode = "tether"
        self.last_event_at = 0.0
        self.nursery: trio.Nursery | None = None
        self.changed = trio.Event()

    # -- reading -----------------------------------------------------------------------

    def _event(self, conn: _Conn, ev: dict[str, Any], now: float) -> None:
        seq = int(ev.get("seq", 0))
        conn.seqs += 1
        if seq <= conn.highest:
            conn.out_of_order += 1
        else:
            conn.highest = seq
        kind = ev.get("type")
        if kind == "delta":
            content = (ev.get("data") or {}).get("content")
            if content:
                for match in TOKEN.finditer(content):
                    conn.tokens.setdefault(int(match.group(1)), now)
        elif kind in TERMINAL:
            conn.terminal = str(kind)
            self.changed.set()
        if not conn.task_id:
            conn.task_id = str(ev.get("task_id", ""))

    def _message(self, conn: _Conn, raw: str, now: float) -> None:
        conn.messages += 1
        msg = json.loads(raw)
        if self.mode == "floor":
            choices = msg.get("choices")
            if choices:
                content = (choices[0].get("delta") or {}).get("content")
                if content:
                    for match in TOKEN.finditer(content):
                        conn.tokens.setdefault(int(match.group(1)), now)
                self.last_event_at = now
                return
        kind = msg.get("type")
        if kind == "event":
            self._event(conn, msg["event"], now)
            self.last_event_at = now
        elif kind == "events":
            for ev in msg["events"]:
                self._event(conn, ev, now)
            self.last_event_at = now
        elif kind == "session":
            conn.session_id = str(msg.get("session_id", ""))
            conn.session_ready.set()
        elif kind == "task":
            conn.task_id = conn.task_id or str(msg.get("task_id", ""))
            conn.task_at = now
        elif kind in FLOOR_TERMINAL:
            conn.terminal = FLOOR_TERMINAL[kind]
            self.last_event_at = now
            self.changed.set()
        elif kind == "error" and len(conn.errors) < 3:
            conn.errors.append(json.dumps(msg)[:200])

    async def _reader(self, conn: _Conn) -> None:
        try:
            while True:
                messages = await conn.ws.receive()
                if messages:
                    now = time.monotonic()
                    for raw in messages:
                        self._message(conn, raw, now)
        except (WsClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            conn.ws.closed = True
            self.changed.set()
            conn.session_ready.set()

    # -- commands ----------------------------------------------------------------------

    async def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        assert self.nursery is not None
        self.mode = str(cmd.get("mode", "tether"))
        n = int(cmd["n"])
        limiter = trio.CapacityLimiter(int(cmd.get("concurrency", 50)))
        start = len(self.conns)
        slots: list[_Conn | None] = [None] * n
        failures: list[str] = []

        async def one(i: int) -> None:
            async with limiter:
                for attempt in range(5):
                    ws: Ws | None = None
                    try:
                        with trio.fail_after(30):
                            ws = await Ws.open(cmd["host"], int(cmd["port"]), cmd["path"])
                            conn = _Conn(ws, label=str(cmd.get("label", "")))
                            assert self.nursery is not None
                            self.nursery.start_soon(self._reader, conn)
                            await conn.session_ready.wait()
                        if not ws.accepted:  # the handshake failed: try again
                            raise WsClosed(ws.close_reason)
                        slots[i] = conn
                        return
                    except (
                        OSError,
                        WsClosed,
                        trio.TooSlowError,
                        trio.BrokenResourceError,
                        trio.ClosedResourceError,
                    ) as exc:
                        if ws is not None:
                            await _close_quietly(ws)  # and its reader ends
                        if attempt == 4:
                            failures.append(f"{type(exc).__name__}: {exc}")
                        await trio.sleep(0.2)

        async with trio.open_nursery() as nursery:
            for i in range(n):
                nursery.start_soon(one, i)
        self.conns += [c for c in slots if c is not None]
        return {
            "sessions": [c.session_id for c in self.conns[start:]],
            "failures": failures[:5],
            "failed": len(failures),
        }

    async def chat(self, cmd: dict[str, Any]) -> dict[str, Any]:
        bodies: list[dict[str, Any]] = cmd["bodies"]
        sent_at = time.monotonic()
        idle = [c for c in self.conns if not c.chat_sent_at]
        for conn, body in zip(idle, bodies, strict=False):
            messages = body.get("messages") or [{}]
            conn.marker = str(messages[-1].get("content", ""))
            conn.message_id = str(body.get("message_id", ""))
            conn.chat_sent_at = time.monotonic()
            try:
                await conn.ws.send_text(json.dumps({"type": "chat", "request": body}))
            except (WsClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                conn.errors.append(f"chat send: {exc}")
        return {"sent_at": sent_at, "sent": min(len(bodies), len(idle))}

    async def subscribe(self, cmd: dict[str, Any]) -> dict[str, Any]:
        subs: list[dict[str, Any]] = cmd["subs"]
        sent_at = time.monotonic()
        idle = [c for c in self.conns if not c.chat_sent_at]
        for conn, sub in zip(idle, subs, strict=False):
            conn.marker = str(sub.get("marker", ""))
            conn.task_id = str(sub["task_id"])
            conn.chat_sent_at = time.monotonic()
            message = {"type": "subscribe", "task_id": conn.task_id, "after": sub.get("after", 0)}
            try:
                await conn.ws.send_text(json.dumps(message))
            except (WsClosed, trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                conn.errors.append(f"subscribe send: {exc}")
        return {"sent_at": sent_at, "sent": min(len(subs), len(idle))}

    def _chatting(self) -> list[_Conn]:
        return [c for c in self.conns if c.chat_sent_at]

    async def streaming(self, cmd: dict[str, Any]) -> dict[str, Any]:
        with trio.move_on_after(float(cmd["deadline_s"])):
            while True:
                firsts = [
                    min(c.tokens.values()) if c.tokens else None
                    for c in self._chatting()
                    if not c.terminal and not c.ws.closed
                ]
                if None not in firsts:
                    return {"at": max(firsts, default=time.monotonic())}
                self.changed = trio.Event()
                with trio.move_on_after(0.05):
                    await self.changed.wait()
        return {"at": None}

    async def wait(self, cmd: dict[str, Any]) -> dict[str, Any]:
        started = float(cmd.get("started_at") or time.monotonic())
        hard, stall = float(cmd["hard_s"]), float(cmd["stall_s"])
        deadline = float(cmd.get("deadline_s", hard + 120))
        complete = False
        while True:
            pending = [c for c in self._chatting() if not c.terminal and not c.ws.closed]
            if not pending:
                complete = True
                break
            now = time.monotonic()
            if now - started > hard and now - max(self.last_event_at, started) > stall:
                break
            if now - started > deadline:
                break
            self.changed = trio.Event()
            with trio.move_on_after(0.25):
                await self.changed.wait()
        return {
            "complete": complete,
            "last_event_at": self.last_event_at,
            "pending": [c.task_id for c in self._chatting() if not c.terminal and c.task_id],
        }

    def analyze(self, cmd: dict[str, Any]) -> dict[str, Any]:
        """Per client: ``lost`` (seq gaps, and tokens missing from a completed stream, or
        one for a task the server forgot before its end reached a connected client),
        ``out_of_order``, ``undelivered`` (the server wrote more than reached a still
        connected client), ``closed`` (connection closed before the end), ``not_completed``;
        lags (token arrival minus the fake's schedule for it) and the tokens that arrived
        in ``window``."""
        schedule: dict[str, float] = cmd.get("schedule") or {}
        records: dict[str, dict[str, Any]] = cmd.get("records") or {}
        rate, tokens = float(cmd["rate"]), int(cmd["tokens"])
        t1, t2 = cmd.get("window") or (0.0, 0.0)
        label = cmd.get("label")
        lag_from = float(cmd.get("lag_from") or 0.0)
        floor = self.mode == "floor"
        lost = out_of_order = undelivered = closed = not_completed = expired = 0
        in_window = delivered = messages = 0
        terminals: dict[str, int] = {}
        close_reasons: dict[str, int] = {}
        lags: list[float] = []
        ttid: list[float] = []
        samples: list[str] = []
        for c in self._chatting():
            if label is not None and c.label != label:
                continue
            messages += c.messages
            terminals[c.terminal or "none"] = terminals.get(c.terminal or "none", 0) + 1
            if c.task_at and not floor:
                ttid.append(round((c.task_at - c.chat_sent_at) * 1000, 3))
            out_of_order += c.out_of_order
            if not floor:
                lost += c.highest - c.seqs + c.out_of_order  # gaps below the highest seq
            record = records.get(c.task_id, {})
            if not floor and not c.terminal and c.task_id and not record and not c.ws.closed:
                expired += 1
                lost += 1
            elif (
                record.get("status")
                or ("completed" if c.terminal == "task:completed" else c.terminal or "")
            ) != "completed":
                not_completed += 1
                if len(samples) < 5:
                    samples.append(
                        f"{c.task_id}: {record.get('status') or c.terminal}, "
                        f"client got {c.highest}, {c.errors[:1]}"
                    )
            if not c.terminal:
                if c.ws.closed:
                    closed += 1
                    close_reasons[c.ws.close_reason] = close_reasons.get(c.ws.close_reason, 0) + 1
                elif not floor:
                    undelivered += max(0, int(record.get("last_seq", c.highest)) - c.highest)
            if c.terminal == "task:completed":
                lost += sum(1 for i in range(tokens) if i not in c.tokens)
            delivered += len(c.tokens)
            start = schedule.get(c.marker)
            for index, at in c.tokens.items():
                if t1 <= at < t2:
                    in_window += 1
                if start is not None and start + index / rate >= lag_from:
                    lags.append(round((at - (start + index / rate)) * 1000, 3))
        return {
            "lost": lost,
            "out_of_order": out_of_order,
            "undelivered": undelivered,
            "closed": closed,
            "close_reasons": close_reasons,
            "not_completed": not_completed,
            "not_completed_sample": samples,
            "expired_before_delivery": expired,
            "lags": lags,
            "ttid": ttid,
            "tokens_delivered": delivered,
            "tokens_in_window": in_window,
            "messages": messages,
            "terminals": terminals,
        }

    async def stop(self) -> dict[str, Any]:
        sent = 0
        for c in self._chatting():
            if c.task_id and not c.ws.closed:
                await c.ws.send_text(json.dumps({"type": "stop", "task_id": c.task_id}))
                sent += 1
        return {"sent": sent}

    async def close(self) -> dict[str, Any]:
        n = len(self.conns)
        async with trio.open_nursery() as nursery:
            for c in self.conns:
                nursery.start_soon(_close_quietly, c.ws)
        self.conns = []
        return {"closed": n}


async def _close_quietly(ws: Ws) -> None:
    with trio.move_on_after(2):
        try:
            await ws.aclose()
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass


async def _lines(stream: trio.abc.ReceiveStream) -> Any:
    buf = b""
    while True:
        while b"\n" not in buf:
            data = await stream.receive_some(1 << 20)
            if not data:
                return
            buf += data
        line, _, buf = buf.partition(b"\n")
        yield line


async def serve() -> None:
    worker = Worker()
    stdin = trio.lowlevel.FdStream(os.dup(sys.stdin.fileno()))
    out = sys.stdout
    async with trio.open_nursery() as nursery:
        worker.nursery = nursery
        out.write(json.dumps({"ready": True, "pid": os.getpid()}) + "\n")
        out.flush()
        async for line in _lines(stdin):
            if not line.strip():
                continue
            cmd = json.loads(line)
            name = cmd.get("cmd")
            try:
                if name == "connect":
                    answer = await worker.connect(cmd)
                elif name == "chat":
                    answer = await worker.chat(cmd)
                elif name == "subscribe":
                    answer = await worker.subscribe(cmd)
                elif name == "streaming":
                    answer = await worker.streaming(cmd)
                elif name == "wait":
                    answer = await worker.wait(cmd)
                elif name == "analyze":
                    answer = worker.analyze(cmd)
                elif name == "stop":
                    answer = await worker.stop()
                elif name == "close":
                    answer = await worker.close()
                elif name == "quit":
                    await worker.close()
                    out.write('{"bye": true}\n')
                    out.flush()
                    break
                else:
                    answer = {"error": f"unknown command {name!r}"}
            except Exception as exc:  # report, keep serving
                answer = {"error": f"{type(exc).__name__}: {exc}"}
            out.write(json.dumps(answer) + "\n")
            out.flush()
        nursery.cancel_scope.cancel()


def main() -> None:
    try:
        trio.run(serve)
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
