"""WebSocket batching (``?batch=1``) and the writer's order: control before data."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
from trio_websocket import WebSocketConnection, open_websocket_url

from fakes.model import TextReply
from tests.conftest import WAIT, Fakes, Tether
from tests.helpers import TERMINAL, assert_log_well_formed, chat_body, until

pytestmark = pytest.mark.both_backends


class Client:
    """Keeps every message in arrival order; events are flattened per task."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.messages: list[dict[str, Any]] = []
        self._events: dict[str, list[dict[str, Any]]] = {}
        self._ended: set[str] = set()

    async def send(self, message: dict[str, Any]) -> None:
        await self.ws.send_message(json.dumps(message))

    async def recv(self) -> dict[str, Any]:
        with trio.fail_after(WAIT):
            message = dict(json.loads(await self.ws.get_message()))
        self.messages.append(message)
        if message["type"] == "event":
            batch = [message["event"]]
        elif message["type"] == "events":
            batch = message["events"]
        else:
            batch = []
        for event in batch:
            self._events.setdefault(event["task_id"], []).append(event)
            if event["type"] in TERMINAL:
                self._ended.add(event["task_id"])
        return message

    def events(self, task_id: str) -> list[dict[str, Any]]:
        return list(self._events.get(task_id, ()))

    def ended(self, task_id: str) -> bool:
        return task_id in self._ended

    async def until_ended(self, *task_ids: str) -> None:
        while not all(self.ended(t) for t in task_ids):
            await self.recv()

    async def reply(self, type_: str) -> dict[str, Any]:
        while True:
            message = await self.recv()
            if message["type"] == type_:
                return message


@asynccontextmanager
async def connect(tether: Tether, *, batch: bool) -> AsyncIterator[Client]:
    url = tether.ws_url + ("?batch=1" if batch else "")
    async with open_websocket_url(url, max_message_size=2**26) as ws:
        client = Client(ws)
        assert (await client.recv())["type"] == "session"
        yield client


async def _completed_tasks(tether: Tether, fakes: Fakes, count: int, chunks: int) -> list[str]:
    """Background tasks whose whole answers are in their logs. The chunks come 3 ms
    apart, so that most are read, and logged, as deltas of their own (an append to Redis
    takes a round trip, and what arrives meanwhile is merged into the next delta)."""
    for _ in range(count):
        fakes.model.push(TextReply([f"w{i} " for i in range(chunks)], interval=0.003))
    task_ids = [await tether.background(chat_body()) for _ in range(count)]
    with trio.fail_after(WAIT):
        for task_id in task_ids:
            await tether.runtime.manager.wait_ended(task_id)
    return task_ids


async def _log_size(tether: Tether, task_ids: list[str]) -> int:
    records = [await tether.runtime.manager.store.get(t) for t in task_ids]
    return sum(r.last_seq for r in records if r is not None)


async def test_batched_client_gets_events_messages_gapless_in_order_terminal_last(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply([f"t{i} " for i in range(40)], interval=0.002))
    async with connect(tether, batch=True) as client:
        await client.send({"type": "chat", "request": chat_body()})
        task_id = (await client.reply("task"))["task_id"]
        await client.until_ended(task_id)
    batches = [m for m in client.messages if m["type"] in ("event", "events")]
    assert all(m["type"] == "events" for m in batches)
    for batch in batches:
        seqs = [e["seq"] for e in batch["events"]]
        assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "one batch, consecutive"
        assert {e["task_id"] for e in batch["events"]} == {task_id}
    events = client.events(task_id)
    terminal = assert_log_well_formed(events)
    assert terminal["type"] == "task:completed"
    assert terminal["data"]["content"] == "".join(f"t{i} " for i in range(40))


async def test_batched_replay_sends_a_backlog_in_few_messages(tether: Tether, fakes: Fakes) -> None:
    [task_id] = await _completed_tasks(tether, fakes, 1, chunks=600)
    record = await tether.runtime.manager.store.get(task_id)
    assert record is not None and record.last_seq > 256
    async with connect(tether, batch=True) as client:
        await client.send({"type": "subscribe", "task_id": task_id, "after": 0})
        await client.until_ended(task_id)
    events = client.events(task_id)
    assert assert_log_well_formed(events)["type"] == "task:completed"
    batches = [m for m in client.messages if m["type"] == "events"]
    # The whole log was there before the subscribe: it goes out in reads of 256 events.
    assert len(batches) == -(-record.last_seq // 256)


async def test_batched_resume_with_after_delivers_exactly_the_rest(
    tether: Tether, fakes: Fakes
) -> None:
    [task_id] = await _completed_tasks(tether, fakes, 1, chunks=30)
    after = await _log_size(tether, [task_id]) - 4
    async with connect(tether, batch=True) as client:
        await client.send({"type": "subscribe", "task_id": task_id, "after": after})
        await client.until_ended(task_id)
    events = client.events(task_id)
    assert_log_well_formed(events, after=after)


async def test_unbatched_client_keeps_one_event_per_message(tether: Tether, fakes: Fakes) -> None:
    [task_id] = await _completed_tasks(tether, fakes, 1, chunks=30)
    async with connect(tether, batch=False) as client:
        await client.send({"type": "subscribe", "task_id": task_id, "after": 0})
        await client.until_ended(task_id)
    assert not [m for m in client.messages if m["type"] == "events"]
    assert_log_well_formed(client.events(task_id))


async def test_stopped_task_end_goes_out_before_other_tasks_queued_deltas(
    tether: Tether, fakes: Fakes
) -> None:
    # A connection with a long backlog of other tasks' deltas to send (the replay of
    # ten logs), and a running task it stops: the stop's task:cancelled must not wait
    # for the backlog.
    backlog = await _completed_tasks(tether, fakes, 10, chunks=300)
    assert await _log_size(tether, backlog) > 500
    fakes.model.push(TextReply([f"s{i} " for i in range(10_000)], interval=0.05))
    async with connect(tether, batch=False) as client:
        await client.send({"type": "chat", "request": chat_body("stream me")})
        running = (await client.reply("task"))["task_id"]
        while not any(e["type"] == "delta" for e in client.events(running)):
            await client.recv()
        with trio.fail_after(WAIT):
            request = await fakes.model.wait_for_request("/v1/chat/completions", count=2)
        for task_id in backlog:
            await client.send({"type": "subscribe", "task_id": task_id, "after": 0})
        await client.send({"type": "stop", "task_id": running})
        while not client.ended(running):
            await client.recv()
        backlog_before_stop_end = sum(len(client.events(t)) for t in backlog)
        await client.until_ended(*backlog)
    assert backlog_before_stop_end < await _log_size(tether, backlog) // 2
    end = assert_log_well_formed(client.events(running))
    assert end["type"] == "task:cancelled" and end["data"]["cancel_reason"] == "stop"
    assert end["data"]["content"].startswith("s0 ")
    for task_id in backlog:
        assert assert_log_well_formed(client.events(task_id))["type"] == "task:completed"
    with trio.fail_after(WAIT):
        await fakes.model.wait_connection_closed(request.conn_id)


async def test_pong_is_not_queued_behind_a_backlog(tether: Tether, fakes: Fakes) -> None:
    backlog = await _completed_tasks(tether, fakes, 10, chunks=300)
    async with connect(tether, batch=False) as client:
        for task_id in backlog:
            await client.send({"type": "subscribe", "task_id": task_id, "after": 0})
        await client.send({"type": "ping"})
        await client.reply("pong")
        before_pong = sum(len(client.events(t)) for t in backlog)
        await client.until_ended(*backlog)
    assert before_pong < await _log_size(tether, backlog) // 2


async def _until_expired(tether: Tether, task_id: str) -> None:
    """Wait for retention to drop the task: it cannot while a reader still follows it."""
    store = tether.runtime.manager.store

    async def expired() -> bool:
        return await store.get(task_id) is None

    await until(expired, timeout=WAIT)


async def test_subscribing_at_the_end_of_an_ended_log_follows_nothing(
    start_tether: Any, fakes: Fakes
) -> None:
    tether: Tether = await start_tether(task_retention_s=0.2)
    [task_id] = await _completed_tasks(tether, fakes, 1, chunks=5)
    last_seq = await _log_size(tether, [task_id])
    async with connect(tether, batch=False) as client:
        await client.send({"type": "subscribe", "task_id": task_id, "after": last_seq})
        await client.send({"type": "ping"})
        await client.reply("pong")
        await _until_expired(tether, task_id)  # the follower let go of the log
        assert client.events(task_id) == []


async def test_a_follower_past_a_running_tasks_end_lets_go_when_it_ends(
    start_tether: Any, fakes: Fakes
) -> None:
    tether: Tether = await start_tether(task_retention_s=0.2)
    fakes.model.push(TextReply([f"t{i} " for i in range(5)], interval=0.02))
    task_id = await tether.background(chat_body())
    async with connect(tether, batch=False) as client:
        await client.send({"type": "subscribe", "task_id": task_id, "after": 1000})
        with trio.fail_after(WAIT):
            await tether.runtime.manager.wait_ended(task_id)
        await _until_expired(tether, task_id)
        assert client.events(task_id) == []


async def test_replaying_a_log_longer_than_the_lag_limit_is_not_too_slow(
    start_tether: Any, fakes: Fakes
) -> None:
    """The lag limit is for a client that cannot keep up with a live task; a replay of an
    ended log, however long, is delivered whole."""
    tether: Tether = await start_tether(ws_max_lag_events=50)
    tasks = await _completed_tasks(tether, fakes, 1, chunks=600)
    assert await _log_size(tether, tasks) > 256  # more than one read: the lag is checked
    async with connect(tether, batch=False) as client:
        await client.send({"type": "subscribe", "task_id": tasks[0], "after": 0})
        await client.until_ended(tasks[0])
    assert assert_log_well_formed(client.events(tasks[0]))["type"] == "task:completed"
