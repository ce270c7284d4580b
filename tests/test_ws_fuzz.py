"""A property-based fuzzer for ``/ws``: random sequences of valid and invalid messages, on one
or two connections of a session, against a real server.

Each example starts a server and its fakes, sends the sequence, and checks what the API
promises whatever a client sends: every bad message gets exactly one ``error`` reply and the
connection stays open (a final ``ping`` is answered ``pong`` after all the other replies);
every good ``chat`` gets its ``task``; the log of every task started is gapless with one
terminal event, last; and the server still answers ``/healthz``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx2
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

from fakes.model import FakeModel, TextReply
from fakes.pages import FakePages
from fakes.search import FakeSearxng
from server.app import create_app
from server.cli import serve_app
from tests.conftest import WAIT, Fakes, Tether, base_settings
from tests.helpers import assert_log_well_formed, chat_body
from tests.test_ws import WsClient, connect


@dataclass(frozen=True)
class Msg:
    """One message to send, on connection ``conn``, and whether it must be refused."""

    conn: int
    payload: str | bytes
    bad: bool
    kind: str  # what it is, for the failure report
    starts_task: bool = False
    task_ref: int | None = None  # which earlier task it names (index into those started)


_TEXT = st.text(max_size=40)
_ODD_AFTERS = st.one_of(
    st.integers(max_value=-1),
    st.floats(allow_nan=True),
    st.text(max_size=5),
    st.booleans(),
    st.none(),
    st.lists(st.integers()),
)


@st.composite
def messages(draw: st.DrawFn) -> Msg:
    conn = draw(st.integers(0, 1))
    kind = draw(
        st.sampled_from(
            [
                "chat",
                "bad_chat",
                "subscribe",
                "subscribe_odd",
                "unsubscribe",
                "stop",
                "skip",
                "unknown_task",
                "ping",
                "garbage",
                "not_object",
                "binary",
                "unknown_type",
                "no_type",
            ]
        )
    )
    if kind == "chat":
        text = draw(_TEXT) or "hi"
        return Msg(
            conn,
            json.dumps({"type": "chat", "request": chat_body(text)}),
            False,
            kind,
            starts_task=True,
        )
    if kind == "bad_chat":
        request = draw(
            st.sampled_from(
                [
                    None,
                    [],
                    {"messages": []},
                    {"messages": "x"},
                    {"messages": [{"role": "user", "content": "x"}], "tool_ids": ["nope"]},
                ]
            )
        )
        return Msg(conn, json.dumps({"type": "chat", "request": request}), True, kind)
    if kind in ("subscribe", "unsubscribe", "stop"):
        ref = draw(st.integers(0, 5))
        after = draw(st.integers(0, 50))
        body: dict[str, Any] = (
            {"type": kind, "after": after} if kind == "subscribe" else {"type": kind}
        )
        return Msg(conn, json.dumps(body), False, kind, task_ref=ref)
    if kind == "skip":
        # The fuzzer's chats search nothing and call no tool: every step it names is one
        # the task never began (or a bad step), so every skip is an error.
        step = draw(st.one_of(st.sampled_from(["web_search", "call_0", "page:x"]), _TEXT))
        body = {"type": "skip", "step": step}
        return Msg(conn, json.dumps(body), True, kind, task_ref=draw(st.integers(0, 5)))
    if kind == "subscribe_odd":
        return Msg(
            conn,
            json.dumps({"type": "subscribe", "after": draw(_ODD_AFTERS)}),
            True,
            kind,
            task_ref=draw(st.integers(0, 5)),
        )
    if kind == "unknown_task":
        verb = draw(st.sampled_from(["subscribe", "unsubscribe", "stop", "skip"]))
        task_id = draw(st.one_of(st.just("task_" + "0" * 24), _TEXT, st.integers(), st.none()))
        return Msg(conn, json.dumps({"type": verb, "task_id": task_id}), True, kind)
    if kind == "ping":
        return Msg(conn, json.dumps({"type": "ping"}), False, kind)
    if kind == "garbage":
        return Msg(conn, draw(_TEXT.filter(lambda t: not _is_json(t))), True, kind)
    if kind == "not_object":
        value = draw(
            st.one_of(
                st.integers(), st.lists(st.integers(), max_size=3), st.text(max_size=5), st.none()
            )
        )
        return Msg(conn, json.dumps(value), True, kind)
    if kind == "binary":
        return Msg(conn, draw(st.binary(max_size=40)), True, kind)
    if kind == "unknown_type":
        name = draw(
            _TEXT.filter(
                lambda t: t not in ("chat", "subscribe", "unsubscribe", "stop", "skip", "ping")
            )
        )
        return Msg(conn, json.dumps({"type": name}), True, kind)
    return Msg(conn, json.dumps({"task_id": "x"}), True, kind)  # no_type


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


class Replies:
    """What one connection has been answered (``event``/``events`` messages aside)."""

    def __init__(self, client: WsClient) -> None:
        self.client = client
        self.seen: list[dict[str, Any]] = []

    async def next_reply(self) -> dict[str, Any]:
        while True:
            message = await self.client.recv()
            if message["type"] not in ("event", "events"):
                self.seen.append(message)
                return message

    async def task_answer(self) -> str:
        while (reply := await self.next_reply())["type"] != "task":
            pass
        return str(reply["task_id"])

    async def through_final_ping(self, pongs_before: int) -> None:
        """Send a last ``ping`` and read until its ``pong``: replies go out in the order
        their messages came, so every earlier reply has come by then."""
        await self.client.send({"type": "ping"})
        while sum(r["type"] == "pong" for r in self.seen) < pongs_before + 1:
            await self.next_reply()


@asynccontextmanager
async def serving() -> AsyncIterator[tuple[Tether, Fakes]]:
    """A server and its fakes for one example (hypothesis runs each example on its own,
    outside pytest's fixtures)."""
    async with trio.open_nursery() as nursery:
        fakes = Fakes(FakeModel(), FakeSearxng(), FakePages())
        for fake in (fakes.model, fakes.search, fakes.pages):
            await fake.start(nursery)
        fakes.search.configure(page_base_url=fakes.pages.base_url)
        settings_ = base_settings(fakes)
        app = create_app(settings_)
        stop = trio.Event()
        binds = await nursery.start(partial(serve_app, app, settings_, shutdown_trigger=stop.wait))
        async with httpx2.AsyncClient(base_url=binds[0], timeout=WAIT, trust_env=False) as client:
            yield Tether(binds[0], app.extensions["tether"], client, stop), fakes
        stop.set()
        nursery.cancel_scope.cancel()


@settings(max_examples=30, deadline=None, derandomize=True, database=None)
@given(sequence=st.lists(messages(), min_size=1, max_size=25))
def test_any_message_sequence_keeps_the_connection_and_every_log_well_formed(
    sequence: list[Msg],
) -> None:
    trio.run(_exercise, sequence)


async def _exercise(sequence: list[Msg]) -> None:
    async with serving() as (tether, fakes):
        await _send_and_check(tether, fakes, sequence)


async def _send_and_check(tether: Tether, fakes: Fakes, sequence: list[Msg]) -> None:
    fakes.model.default_reply = TextReply(["a ", "b ", "c"], interval=0.001)
    started: list[str] = []
    errors = [0, 0]
    pongs = [0, 0]
    with trio.fail_after(4 * WAIT):
        async with connect(tether) as first, connect(tether, session_id=first.session_id) as second:
            replies = (Replies(first), Replies(second))
            for msg in sequence:
                payload, bad = msg.payload, msg.bad
                if msg.task_ref is not None and isinstance(payload, str):
                    body = json.loads(payload)
                    if msg.task_ref < len(started):
                        body["task_id"] = started[msg.task_ref]
                    else:  # names no task yet: an unknown one
                        body["task_id"] = f"task_missing{msg.task_ref}"
                        bad = True
                    payload = json.dumps(body)
                await replies[msg.conn].client.ws.send_message(payload)
                if bad:
                    errors[msg.conn] += 1
                elif msg.kind == "ping":
                    pongs[msg.conn] += 1
                elif msg.starts_task:
                    started.append(await replies[msg.conn].task_answer())
            for conn, answered in enumerate(replies):
                await answered.through_final_ping(pongs[conn])
                got = [r for r in answered.seen if r["type"] == "error"]
                assert len(got) == errors[conn], (conn, answered.seen, sequence)
                for reply in got:
                    assert {"code", "message"} <= set(reply["error"]), reply
                    assert reply["error"]["code"] in (
                        "invalid_json",
                        "invalid_request",
                        "unknown_type",
                        "not_found",
                        "model_not_found",
                        "step_ended",
                    ), reply
    for task_id in started:
        with trio.fail_after(WAIT):
            events = await tether.events(task_id)
        terminal = assert_log_well_formed(events)
        assert terminal["type"] in ("task:completed", "task:cancelled")
    assert (await tether.client.get("/healthz")).status_code == 200
