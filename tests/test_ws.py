"""WebSocket /ws: sessions, live events with resume, commands, disconnect, slow readers."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from fakes.model import HangReply, TextReply
from tests.conftest import WAIT, Fakes, Tether
from tests.helpers import TERMINAL, assert_log_well_formed, chat_body

pytestmark = pytest.mark.all_backends

KEYS = {"key-alice": "alice", "key-bob": "bob"}


class WsClient:
    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.session_id = ""
        self.first_message: dict[str, Any] = {}

    async def send(self, message: dict[str, Any] | str) -> None:
        await self.ws.send_message(message if isinstance(message, str) else json.dumps(message))

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(WAIT):
            return dict(json.loads(await self.ws.get_message()))

    async def recv_type(self, type_: str) -> dict[str, Any]:
        while True:
            message = await self.recv()
            if message["type"] == type_:
                return message

    async def events_until_terminal(
        self, task_id: str, stop_when: Callable[[dict[str, Any]], bool] | None = None
    ) -> list[dict[str, Any]]:
        events: list[dict[str, Any]] = []
        while True:
            message = await self.recv()
            if message["type"] != "event" or message["event"]["task_id"] != task_id:
                continue
            events.append(message["event"])
            if message["event"]["type"] in TERMINAL or (stop_when and stop_when(events[-1])):
                return events

    async def chat(self, request: dict[str, Any]) -> str:
        await self.send({"type": "chat", "request": request})
        answer = await self.recv_type("task")
        return str(answer["task_id"])


@asynccontextmanager
async def connect(
    tether: Tether,
    key: str | None = None,
    session_id: str | None = None,
    via_query: bool = False,
    max_message_size: int = 2**26,
) -> AsyncIterator[WsClient]:
    url = tether.ws_url
    params = []
    if session_id:
        params.append(f"session_id={session_id}")
    if key and via_query:
        params.append(f"token={key}")
    if params:
        url += "?" + "&".join(params)
    headers = [("Authorization", f"Bearer {key}")] if key and not via_query else []
    async with open_websocket_url(
        url, extra_headers=headers, max_message_size=max_message_size
    ) as ws:
        client = WsClient(ws)
        first = await client.recv()
        client.first_message = first
        if first["type"] == "session":
            client.session_id = first["session_id"]
        else:
            client.first = first  # type: ignore[attr-defined]
        yield client


async def test_first_message_is_the_session(tether: Tether) -> None:
    async with connect(tether) as client:
        assert client.session_id.startswith("sess_")
        await client.send({"type": "ping"})
        assert await client.recv() == {"type": "pong"}


async def test_chat_with_slow_search_answers_task_id_within_a_second(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.search.configure(delay=30)
    async with connect(tether) as client:
        await client.send(
            {
                "type": "chat",
                "request": chat_body(features={"web_search": True}, chat_id="c", message_id="m"),
            }
        )
        with trio.fail_after(1):
            answer = await client.recv()
        assert answer["type"] == "task"
        assert answer["chat_id"] == "c" and answer["message_id"] == "m"
        task = (await tether.client.get(f"/api/tasks/{answer['task_id']}")).json()
        assert task["session_id"] == client.session_id
        await client.send({"type": "stop", "task_id": answer["task_id"]})
        events = await client.events_until_terminal(answer["task_id"])
        assert events[-1]["type"] == "task:cancelled"


async def test_events_arrive_in_order_gapless_with_one_terminal(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply(["a ", "b ", "c"]))
    async with connect(tether) as client:
        task_id = await client.chat(chat_body(features={"web_search": True}))
        events = await client.events_until_terminal(task_id)
    terminal = assert_log_well_formed(events)
    assert terminal["type"] == "task:completed"
    types = [e["type"] for e in events]
    assert types.index("status") < types.index("source") < types.index("delta")
    assert terminal["data"]["content"] == "a b c"


async def test_stop_during_web_search_closes_search_connection(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.search.configure(delay=30)
    async with connect(tether) as client:
        task_id = await client.chat(chat_body(features={"web_search": True}))
        with trio.fail_after(WAIT):
            request = await fakes.search.wait_for_request("/search")
        await client.send({"type": "stop", "task_id": task_id})
        events = await client.events_until_terminal(task_id)
    assert events[-1]["type"] == "task:cancelled"
    assert events[-1]["data"]["phase"] == "web_search"
    assert events[-1]["data"]["cancel_reason"] == "stop"
    with trio.fail_after(WAIT):
        await fakes.search.wait_connection_closed(request.conn_id)


async def test_closing_only_connection_with_zero_grace_cancels_session_tasks(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.search.configure(delay=30)
    fakes.model.push(HangReply())
    async with connect(tether) as client:
        searching = await client.chat(chat_body(features={"web_search": True}))
        generating = await client.chat(chat_body())
        with trio.fail_after(WAIT):
            search_request = await fakes.search.wait_for_request("/search")
            model_request = await fakes.model.wait_for_request("/v1/chat/completions")
    with trio.fail_after(WAIT):
        await fakes.search.wait_connection_closed(search_request.conn_id)
        await fakes.model.wait_connection_closed(model_request.conn_id)
    for task_id in (searching, generating):
        terminal = assert_log_well_formed(await tether.events(task_id))
        assert terminal["type"] == "task:cancelled"
        assert terminal["data"]["cancel_reason"] == "disconnect"


async def test_background_task_is_not_bound_to_the_session(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(HangReply())
    async with connect(tether) as client:
        response = await tether.chat(chat_body(session_id=client.session_id, background=True))
        task_id = response.json()["task_id"]
        with trio.fail_after(WAIT):
            await fakes.model.wait_for_request("/v1/chat/completions")
    # The session's last connection closed with grace 0, and the task runs on.
    running = await tether.runtime.manager.store.get(task_id)
    assert running is not None and running.status == "running"
    stopped = (await tether.client.post(f"/api/tasks/{task_id}/stop")).json()
    assert stopped["cancel_reason"] == "stop"


async def test_reconnect_within_grace_keeps_task_and_resume_delivers_missed_events(
    start_tether: Any, fakes: Fakes
) -> None:
    tether: Tether = await start_tether(ws_reconnect_grace_s=0.5)
    manager = tether.runtime.manager
    fakes.model.configure(default_reply={"kind": "hang"})
    fakes.model.add_rule("streaming", TextReply([f"p{i} " for i in range(20)], interval=0.02))
    async with connect(tether) as first:
        session_id = first.session_id
        streaming = await first.chat(chat_body("streaming"))
        seen = await first.events_until_terminal(
            streaming, stop_when=lambda e: e["type"] == "delta"
        )
        hanging = await first.chat(chat_body("hanging"))
        with trio.fail_after(WAIT):
            await fakes.model.wait_for_request("/v1/chat/completions", count=2)
    # The session's only connection closed: its grace period runs. Reconnect within it.
    async with connect(tether, session_id=session_id) as back:
        assert back.session_id == session_id
        # A control session closed after the first one: when its task is cancelled for
        # disconnect, the first grace period would have run out too.
        async with connect(tether) as control:
            control_task = await control.chat(chat_body("control"))
            with trio.fail_after(WAIT):
                await fakes.model.wait_for_request("/v1/chat/completions", count=3)
        with trio.fail_after(WAIT):
            await manager.wait_ended(control_task)
        control_end = assert_log_well_formed(await tether.events(control_task))
        assert control_end["data"]["cancel_reason"] == "disconnect"
        running = await manager.store.get(hanging)
        assert running is not None and running.status == "running"
        # Resume the streaming task from the last event seen: exactly the missed ones.
        await back.send({"type": "subscribe", "task_id": streaming, "after": seen[-1]["seq"]})
        missed = await back.events_until_terminal(streaming)
        assert missed == (await tether.events(streaming))[seen[-1]["seq"] :]
        assert missed[-1]["type"] == "task:completed"
        await back.send({"type": "stop", "task_id": hanging})
        stopped = await back.events_until_terminal(hanging)
        assert stopped[-1]["data"]["cancel_reason"] == "stop"


async def test_subscribe_replays_then_follows_live_without_gap_or_duplicate(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply([f"q{i} " for i in range(60)], interval=0.005))
    task_id = await tether.background(chat_body())
    async with connect(tether) as client:
        await client.send({"type": "subscribe", "task_id": task_id, "after": 0})
        events = await client.events_until_terminal(task_id)
    assert_log_well_formed(events)


async def test_two_connections_of_a_session_both_receive_everything(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply(["x ", "y ", "z"]))
    async with connect(tether) as first, connect(tether, session_id=first.session_id) as second:
        assert second.session_id == first.session_id
        task_id = await first.chat(chat_body(features={"web_search": True}))
        from_first = await first.events_until_terminal(task_id)
        from_second = await second.events_until_terminal(task_id)
    assert from_first == from_second
    assert_log_well_formed(from_first)


async def test_another_user_cannot_attach_subscribe_or_stop(
    start_tether: Any, fakes: Fakes
) -> None:
    tether: Tether = await start_tether(api_keys=KEYS)
    fakes.model.push(HangReply())
    async with connect(tether, key="key-alice") as alice:
        task_id = await alice.chat(chat_body())
        async with connect(tether, key="key-bob", session_id=alice.session_id) as bob:
            assert bob.session_id == ""
            assert bob.first["type"] == "error"  # type: ignore[attr-defined]
            assert bob.first["error"]["code"] == "not_found"  # type: ignore[attr-defined]
        async with connect(tether, key="key-bob", via_query=True) as bob:
            for kind in ("subscribe", "stop", "unsubscribe"):
                await bob.send({"type": kind, "task_id": task_id, "after": 0})
                error = await bob.recv()
                assert error["type"] == "error" and error["ref"] == kind
                assert error["error"]["code"] == "not_found"
        running = await tether.runtime.manager.store.get(task_id)
        assert running is not None and running.status == "running"
        await alice.send({"type": "stop", "task_id": task_id})
        events = await alice.events_until_terminal(task_id)
        assert events[-1]["type"] == "task:cancelled"


async def test_unauthenticated_connection_is_refused(start_tether: Any) -> None:
    tether: Tether = await start_tether(api_keys=KEYS)
    from trio_websocket import ConnectionRejected

    try:
        async with open_websocket_url(tether.ws_url):
            raise AssertionError("connected without a key")
    except ConnectionRejected as exc:
        assert exc.status_code == 401


async def test_bad_messages_get_errors_and_the_connection_keeps_working(
    tether: Tether,
) -> None:
    cases: list[tuple[str | dict[str, Any], str, str | None]] = [
        ("not json", "invalid_json", None),
        ("[1, 2]", "invalid_request", None),
        ({"no": "type"}, "invalid_request", None),
        ({"type": "dance"}, "unknown_type", "dance"),
        ({"type": "subscribe"}, "invalid_request", "subscribe"),
        ({"type": "subscribe", "task_id": "task_nope"}, "not_found", "subscribe"),
        ({"type": "stop", "task_id": "task_nope"}, "not_found", "stop"),
        ({"type": "chat"}, "invalid_request", "chat"),
        ({"type": "chat", "request": {"model": "fake-model"}}, "invalid_request", "chat"),
        ({"type": "chat", "request": chat_body(model="nope")}, "model_not_found", "chat"),
        ("[" * 50_000, "invalid_json", None),
        ({"type": "chat", "request": chat_body("x" * 2_000_000)}, "payload_too_large", "chat"),
    ]
    async with connect(tether) as client:
        for message, code, ref in cases:
            await client.send(message)
            error = await client.recv()
            assert error["type"] == "error", message
            assert error["error"]["code"] == code, message
            assert error["error"]["message"]
            assert error["ref"] == ref
        await client.send({"type": "ping"})
        assert await client.recv() == {"type": "pong"}
        task_id = await client.chat(chat_body())
        events = await client.events_until_terminal(task_id)
        assert events[-1]["type"] == "task:completed"


async def test_slow_reader_does_not_delay_a_fast_one(start_tether: Any, fakes: Fakes) -> None:
    # 20 MB in all: more than the kernel buffers between the server and a client that
    # does not read can hold, so the slow connection's writer blocks (and more than a
    # task's default bound on its answer, raised here).
    tether: Tether = await start_tether(
        ws_send_timeout_s=1, ws_reconnect_grace_s=30, max_content_chars=30_000_000
    )
    big = "z" * 32768
    fakes.model.push(TextReply([big] * 600, interval=0.002))
    async with connect(tether) as fast, connect(tether, session_id=fast.session_id) as slow:
        task_id = await fast.chat(chat_body())
        events = await fast.events_until_terminal(task_id)
        received_terminal_at = trio.current_time()
        terminal = assert_log_well_formed(events)
        # Chunks that one read brought are one delta: count the text, not the events.
        streamed = "".join(e["data"]["content"] for e in events if e["type"] == "delta")
        assert streamed == terminal["data"]["content"] == big * 600
        record = await tether.runtime.manager.store.get(task_id)
        assert record is not None and record.ended_at is not None
        # The task was not held back by the slow reader: it ended about when the fake
        # finished sending, and the fast reader had everything right after.
        assert record.ended_at - record.started_at < 10  # type: ignore[operator]
        # The slow one is closed with 4008 and told to resume with `after`.
        with trio.fail_after(WAIT):
            try:
                while True:
                    await slow.ws.get_message()
            except ConnectionClosed as exc:
                assert exc.reason.code == 4008
        assert received_terminal_at <= trio.current_time()


async def test_reattaching_lists_the_sessions_tasks_with_their_last_seq(
    start_tether: Any, fakes: Fakes
) -> None:
    """The first message on a re-attach names the session's tasks and where their logs
    are, so the client resubscribes without guessing; a new session lists none."""
    tether: Tether = await start_tether(ws_reconnect_grace_s=30)
    fakes.model.configure(default_reply={"kind": "hang"})
    fakes.model.add_rule("done", TextReply(["all ", "done"]))
    async with connect(tether) as first:
        assert first.first_message["tasks"] == []
        finished = await first.chat(chat_body("done"))
        await first.events_until_terminal(finished)
        running = await first.chat(chat_body("hang"))
        with trio.fail_after(WAIT):
            await fakes.model.wait_for_request("/v1/chat/completions", count=2)
        session_id = first.session_id
    async with connect(tether, session_id=session_id) as back:
        listed = {t["task_id"]: t for t in back.first_message["tasks"]}
        assert list(listed) == [finished, running]
        records = {t: await tether.runtime.manager.store.get(t) for t in listed}
        assert listed[finished]["status"] == "completed"
        assert listed[running]["status"] == "running"
        for task_id, entry in listed.items():
            record = records[task_id]
            assert record is not None and entry["last_seq"] == record.last_seq
        # Resubscribing from the listed seq misses nothing and repeats nothing.
        await back.send(
            {"type": "subscribe", "task_id": running, "after": listed[running]["last_seq"]}
        )
        await back.send({"type": "stop", "task_id": running})
        events = await back.events_until_terminal(running)
        assert_log_well_formed(events, after=listed[running]["last_seq"])


async def test_http_and_websocket_refuse_a_bad_chat_alike_naming_the_field(
    tether: Tether,
) -> None:
    bad_requests = [
        (chat_body(tool_ids=["no_such_tool"]), "invalid_request", "tool_ids"),
        (chat_body(temperature="hot"), "invalid_request", "temperature"),
        ({**chat_body(), "model": "no-such-model"}, "model_not_found", "model"),
    ]
    async with connect(tether) as client:
        for body, code, param in bad_requests:
            http = (await tether.chat(body)).json()["error"]
            await client.send({"type": "chat", "request": body})
            ws = (await client.recv_type("error"))["error"]
            assert (http["code"], http["param"]) == (code, param)
            assert (ws["code"], ws["param"]) == (code, param)


async def test_a_bad_field_is_named_in_the_errors_param(tether: Tether) -> None:
    cases: list[tuple[dict[str, Any], str, str]] = [
        ({"type": "subscribe"}, "invalid_request", "task_id"),
        ({"type": "subscribe", "task_id": "t", "after": -1}, "invalid_request", "after"),
        ({"type": "chat"}, "invalid_request", "request"),
        ({"no": "type"}, "invalid_request", "type"),
        ({"type": "dance"}, "unknown_type", "type"),
        ({"type": "stop", "task_id": "task_nope"}, "not_found", "task_id"),
    ]
    async with connect(tether) as client:
        for message, code, param in cases:
            await client.send(message)
            error = await client.recv()
            assert (error["error"]["code"], error["error"]["param"]) == (code, param), message
