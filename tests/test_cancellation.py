"""Stops and disconnects end the task in the phase it was in, close the upstream
connection, and keep the partial answer."""

from __future__ import annotations

import random
from functools import partial
from typing import Any

import httpx2
import pytest
import trio
import trio.lowlevel

from fakes.base import FakeServer
from fakes.model import HangReply, TextReply, ToolCallReply
from server.tasks.backend import next_events
from tests.conftest import WAIT, Fakes, Tether
from tests.helpers import assert_log_well_formed, chat_body

pytestmark = pytest.mark.all_backends


async def _stop_and_check(
    tether: Tether, task_id: str, fake: FakeServer, path_prefix: str, phase: str
) -> dict[str, Any]:
    """Wait for the fake to be serving the task, stop it over HTTP, and check the
    connection closed at the fake and the terminal event."""
    with trio.fail_after(WAIT):
        request = await fake.wait_for_request(path_prefix)
    assert fake.connection(request.conn_id).is_open
    response = await tether.client.post(f"/api/tasks/{task_id}/stop")
    assert response.status_code == 200
    task = response.json()
    assert task["status"] == "cancelled"
    assert task["cancel_reason"] == "stop"
    assert task["phase"] == phase
    with trio.fail_after(WAIT):
        closed = await fake.wait_connection_closed(request.conn_id)
    assert closed.closed_at is not None
    events = await tether.events(task_id)
    terminal = assert_log_well_formed(events)
    assert terminal["type"] == "task:cancelled"
    assert terminal["data"]["phase"] == phase
    return terminal


async def test_stop_during_web_search_closes_search_connection(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.search.configure(delay=30)
    task_id = await tether.background(chat_body(features={"web_search": True}))
    await _stop_and_check(tether, task_id, fakes.search, "/search", "web_search")
    assert not fakes.model.chat_requests


async def test_stop_during_page_fetch_closes_page_connection(tether: Tether, fakes: Fakes) -> None:
    fakes.search.configure(
        results=[
            {"url": fakes.pages.base_url + "/slow/30", "title": "Slow", "content": "a slow page"}
        ]
    )
    task_id = await tether.background(chat_body(features={"web_search": True}))
    await _stop_and_check(tether, task_id, fakes.pages, "/slow", "web_search")


async def test_stop_during_tool_call_closes_tool_connection(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(ToolCallReply([("fetch_url", {"url": fakes.pages.base_url + "/hang"})]))
    task_id = await tether.background(chat_body("read it", tool_ids=["fetch_url"]))
    terminal = await _stop_and_check(tether, task_id, fakes.pages, "/hang", "tools")
    assert terminal["data"]["content"] == ""


async def test_stop_during_generation_keeps_partial_content(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(TextReply([f"w{i} " for i in range(400)], interval=0.02))
    task_id = await tether.background(chat_body())
    # Wait until some deltas have been produced.
    store = tether.runtime.manager.store
    with trio.fail_after(WAIT):
        while len([e for e in await store.read(task_id, 0) if e.type == "delta"]) < 3:
            await next_events(store, task_id, (await store.read(task_id, 0))[-1].seq)
    terminal = await _stop_and_check(
        tether, task_id, fakes.model, "/v1/chat/completions", "generating"
    )
    events = await tether.events(task_id)
    streamed = "".join(e["data"]["content"] for e in events if e["type"] == "delta")
    content = terminal["data"]["content"]
    assert content == streamed
    assert content.startswith("w0 w1 w2 ")
    assert len(content) < len("".join(f"w{i} " for i in range(400)))


async def test_stop_is_idempotent(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(HangReply())
    task_id = await tether.background(chat_body())
    with trio.fail_after(WAIT):
        await fakes.model.wait_for_request("/v1/chat/completions")
    first = await tether.client.post(f"/api/tasks/{task_id}/stop")
    second = await tether.client.post(f"/api/tasks/stop/{task_id}")
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert first.json()["status"] == "cancelled"
    events = await tether.events(task_id)
    assert assert_log_well_formed(events)["type"] == "task:cancelled"


async def test_stop_of_a_completed_task_answers_its_final_state(tether: Tether) -> None:
    task_id = await tether.background(chat_body())
    events = await tether.events(task_id)
    assert events[-1]["type"] == "task:completed"
    response = await tether.client.post(f"/api/tasks/{task_id}/stop")
    assert response.status_code == 200
    assert response.json()["status"] == "completed"
    assert response.json()["cancel_reason"] is None


async def test_closing_sse_client_cancels_task_and_closes_model_connection(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply([f"t{i} " for i in range(1000)], interval=0.02))
    async with tether.client.stream(
        "POST", "/api/chat/completions", json=chat_body(stream=True)
    ) as response:
        task_id = response.headers["X-Task-Id"]
        async for line in response.aiter_lines():
            if '"content":"t1 "' in line:
                break
    # Leaving the block closed the client's connection.
    request = fakes.model.requests_for("/v1/chat/completions")[-1]
    with trio.fail_after(WAIT):
        await fakes.model.wait_connection_closed(request.conn_id)
    events = await tether.events(task_id)
    terminal = assert_log_well_formed(events)
    assert terminal["type"] == "task:cancelled"
    assert terminal["data"]["cancel_reason"] == "disconnect"
    assert terminal["data"]["phase"] == "generating"
    assert terminal["data"]["content"].startswith("t0 t1 ")


async def test_closing_sync_client_cancels_task_and_closes_search_connection(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.search.configure(delay=30)
    client = httpx2.AsyncClient(base_url=tether.base_url, timeout=WAIT, trust_env=False)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            partial(
                client.post, "/api/chat/completions", json=chat_body(features={"web_search": True})
            )
        )
        with trio.fail_after(WAIT):
            request = await fakes.search.wait_for_request("/search")
        tasks = (await tether.client.get("/api/tasks")).json()["tasks"]
        assert len(tasks) == 1 and tasks[0]["mode"] == "sync"
        nursery.cancel_scope.cancel()  # the client goes away mid-request
    await client.aclose()
    with trio.fail_after(WAIT):
        await fakes.search.wait_connection_closed(request.conn_id)
    events = await tether.events(tasks[0]["id"])
    terminal = assert_log_well_formed(events)
    assert terminal["type"] == "task:cancelled"
    assert terminal["data"]["cancel_reason"] == "disconnect"
    assert terminal["data"]["phase"] == "web_search"


async def test_chat_stop_stops_every_task_of_that_chat(tether: Tether, fakes: Fakes) -> None:
    fakes.model.configure(default_reply={"kind": "hang"})
    ids = [await tether.background(chat_body(chat_id="chat-a")) for _ in range(3)]
    other = await tether.background(chat_body(chat_id="chat-b"))
    with trio.fail_after(WAIT):
        await fakes.model.wait_for_request("/v1/chat/completions", count=4)
    response = await tether.client.post("/api/chats/chat-a/stop")
    assert response.status_code == 200
    stopped = response.json()["tasks"]
    assert sorted(t["id"] for t in stopped) == sorted(ids)
    assert all(t["status"] == "cancelled" for t in stopped)
    remaining = (await tether.client.get("/api/tasks?chat_id=chat-b")).json()["tasks"]
    assert [t["id"] for t in remaining] == [other]
    await tether.client.post(f"/api/tasks/{other}/stop")


async def test_cancel_storm_leaves_connection_pool_usable(start_tether: Any, fakes: Fakes) -> None:
    # 1,000 tasks contend for a pool of 4 connections to a model that never answers, and
    # are stopped at random points: while waiting for the pool, while connecting, while
    # streaming. This is the pattern that wedges httpx 0.28's pool (httpcore #1093).
    tether: Tether = await start_tether(http_max_connections=4)
    fakes.model.configure(default_reply={"kind": "hang"})
    rng = random.Random(1093)
    ids: list[str] = []
    cancelled: list[str] = []

    async def stop(task_id: str) -> None:
        response = await tether.client.post(f"/api/tasks/{task_id}/stop")
        assert response.status_code == 200
        if response.json()["status"] == "cancelled":
            cancelled.append(task_id)

    with trio.fail_after(WAIT * 6):
        async with trio.open_nursery() as nursery:
            for i in range(1000):
                ids.append(await tether.background(chat_body()))
                if i % 7 == 0:
                    await trio.lowlevel.checkpoint()  # let some tasks reach the pool or the socket
                if rng.random() < 0.5:
                    nursery.start_soon(stop, ids.pop(rng.randrange(len(ids))))
            for task_id in ids:
                nursery.start_soon(stop, task_id)
    assert len(cancelled) == 1000
    assert tether.runtime.manager.running_count == 0
    with trio.fail_after(WAIT):
        await fakes.model.wait_until(lambda: not fakes.model.open_connections())
    fakes.model.configure(default_reply={"kind": "text", "chunks": ["still ", "working"]})
    with trio.fail_after(WAIT):
        response = await tether.chat(chat_body())
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == "still working"


async def test_task_past_its_timeout_ends_completed_with_what_it_has(
    start_tether: Any, fakes: Fakes
) -> None:
    """The server's task timeout is the task deadline's default: an answer cut short, not a
    cancel (``deadline: "task"``, ``finish_reason: "length"``)."""
    tether: Tether = await start_tether(task_timeout_s=0.3)
    fakes.model.push(HangReply())
    task_id = await tether.background(chat_body())
    with trio.fail_after(WAIT):
        request = await fakes.model.wait_for_request("/v1/chat/completions")
    terminal = assert_log_well_formed(await tether.events(task_id))
    assert terminal["type"] == "task:completed"
    assert (terminal["data"]["deadline"], terminal["data"]["finish_reason"]) == ("task", "length")
    assert terminal["data"]["cancel_reason"] is None
    with trio.fail_after(WAIT):
        await fakes.model.wait_connection_closed(request.conn_id)


async def test_shutdown_cancels_running_tasks_with_reason_shutdown(
    start_tether: Any, fakes: Fakes
) -> None:
    tether: Tether = await start_tether()
    fakes.search.configure(delay=30)
    task_id = await tether.background(chat_body(features={"web_search": True}))
    with trio.fail_after(WAIT):
        request = await fakes.search.wait_for_request("/search")
    manager = tether.runtime.manager
    tether.stop_serving.set()
    with trio.fail_after(WAIT):
        await manager.wait_ended(task_id)
        await fakes.search.wait_connection_closed(request.conn_id)
    events = [e.to_dict() for e in await manager.store.read(task_id, 0)]
    terminal = assert_log_well_formed(events)
    assert terminal["type"] == "task:cancelled"
    assert terminal["data"]["cancel_reason"] == "shutdown"
    assert terminal["data"]["phase"] == "web_search"
