"""Two Tether replicas (two server processes) on one real Redis: a task started on one is
stopped, read, followed and failed over from the other."""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx2
import pytest
import trio
from trio_websocket import ConnectionClosed

from fakes.model import HangReply, TextReply, ToolCallReply
from fakes.redis_server import RedisServer, ask
from server.config import Settings
from tests.conftest import WAIT, Fakes, base_settings
from tests.helpers import assert_log_well_formed, chat_body, until
from tests.pausing_proxy import PausingProxy
from tests.replicas import ROOT, Replica
from tests.test_ws import connect

TTL = 2.0  # the replicas' heartbeat TTL here: failover within it


def replica_settings(fakes: Fakes, redis_url: str, **overrides: Any) -> Settings:
    return base_settings(
        fakes,
        backend="redis",
        redis_url=redis_url,
        redis_prefix="r" + secrets.token_hex(6),
        replica_ttl_s=TTL,
        **overrides,
    )


@pytest.fixture
async def pair(fakes: Fakes, redis_server: RedisServer) -> AsyncIterator[tuple[Replica, Replica]]:
    settings = replica_settings(fakes, redis_server.url)
    a, b = Replica(settings, name="A"), Replica(settings, name="B")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.start)
            nursery.start_soon(b.start)
        yield a, b
    finally:
        await a.close()
        await b.close()


async def _sse(replica: Replica, path: str) -> list[dict[str, Any]]:
    """Every event of an SSE stream on ``replica``, to its end."""
    out: list[dict[str, Any]] = []
    async with replica.client.stream("GET", path) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


async def _events(replica: Replica, task_id: str, after: int = 0) -> list[dict[str, Any]]:
    return await _sse(replica, f"/api/tasks/{task_id}/events?after={after}")


async def _deltas_seen(replica: Replica, task_id: str, count: int) -> list[dict[str, Any]]:
    """Follow the task's events on ``replica`` until ``count`` deltas have gone by."""
    seen: list[dict[str, Any]] = []
    async with replica.client.stream("GET", f"/api/tasks/{task_id}/events") as response:
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
                if sum(e["type"] == "delta" for e in seen) >= count:
                    return seen
    raise AssertionError("the log ended before enough deltas")


async def test_a_stop_via_b_stops_a_search_running_on_a(
    pair: tuple[Replica, Replica], fakes: Fakes
) -> None:
    a, b = pair
    fakes.search.configure(delay=30)
    task_id = await a.background(chat_body(features={"web_search": True}))
    with trio.fail_after(WAIT):
        request = await fakes.search.wait_for_request("/search")
    response = await b.client.post(f"/api/tasks/{task_id}/stop")
    assert response.status_code == 200
    task = response.json()
    assert (task["status"], task["cancel_reason"], task["phase"]) == (
        "cancelled",
        "stop",
        "web_search",
    )
    with trio.fail_after(WAIT):
        closed = await fakes.search.wait_connection_closed(request.conn_id)
    assert closed.closed_at is not None
    terminal = assert_log_well_formed(await _events(b, task_id))
    assert terminal["type"] == "task:cancelled"
    assert not fakes.model.chat_requests


async def test_events_via_b_from_a_cursor_are_gapless_with_one_terminal(
    pair: tuple[Replica, Replica], fakes: Fakes
) -> None:
    a, b = pair
    fakes.model.push(TextReply([f"w{i} " for i in range(30)], interval=0.01))
    task_id = await a.background(chat_body())
    with trio.fail_after(WAIT):
        events = await _events(b, task_id, after=2)
    terminal = assert_log_well_formed(events, after=2)
    assert terminal["type"] == "task:completed"
    streamed = "".join(e["data"]["content"] for e in events if e["type"] == "delta")
    assert streamed == "".join(f"w{i} " for i in range(30)) == terminal["data"]["content"]
    from_a = await _events(a, task_id)
    assert from_a[2:] == events


async def test_a_websocket_on_b_follows_and_stops_a_task_of_a_session_on_a(
    pair: tuple[Replica, Replica], fakes: Fakes
) -> None:
    a, b = pair
    fakes.model.push(TextReply([f"w{i} " for i in range(2000)], interval=0.01))
    async with connect(cast(Any, a)) as on_a:
        task_id = await on_a.chat(chat_body())
        await on_a.events_until_terminal(task_id, stop_when=lambda e: e["type"] == "delta")
        async with connect(cast(Any, b), session_id=on_a.session_id) as on_b:
            listed = {t["task_id"]: t for t in on_b.first_message["tasks"]}
            assert listed[task_id]["status"] == "running"
            await on_b.send({"type": "subscribe", "task_id": task_id, "after": 1})
            seen = await on_b.events_until_terminal(
                task_id, stop_when=lambda e: e["type"] == "delta"
            )
            assert seen[0]["seq"] == 2
            with trio.fail_after(WAIT):
                model_request = await fakes.model.wait_for_request("/v1/chat/completions")
            await on_b.send({"type": "stop", "task_id": task_id})
            rest = await on_b.events_until_terminal(task_id)
    events = seen + rest
    terminal = assert_log_well_formed(events, after=1)
    assert (terminal["type"], terminal["data"]["cancel_reason"]) == ("task:cancelled", "stop")
    streamed = "".join(e["data"]["content"] for e in events if e["type"] == "delta")
    assert streamed and terminal["data"]["content"] == streamed
    with trio.fail_after(WAIT):
        await fakes.model.wait_connection_closed(model_request.conn_id)


async def test_a_replica_killed_mid_answer_fails_its_task_replica_lost_within_the_ttl(
    pair: tuple[Replica, Replica], fakes: Fakes
) -> None:
    a, b = pair
    fakes.model.push(TextReply([f"w{i} " for i in range(5000)], interval=0.01))
    task_id = await a.background(chat_body())
    with trio.fail_after(WAIT):
        seen = await _deltas_seen(b, task_id, 3)
    await a.kill()
    killed = time.monotonic()
    with trio.fail_after(WAIT):
        events = await _events(b, task_id, after=seen[-1]["seq"])
    noticed = time.monotonic() - killed
    terminal = events[-1]
    assert terminal["type"] == "task:failed"
    assert terminal["data"]["error"]["type"] == "replica_lost"
    assert terminal["data"]["error"]["phase"] == "generating"
    everything = await _events(b, task_id)
    assert_log_well_formed(everything)
    streamed = "".join(e["data"]["content"] for e in everything if e["type"] == "delta")
    assert len(streamed) > 0 and terminal["data"]["content"] == streamed
    assert noticed < 2 * TTL, f"noticed after {noticed:.2f} s"
    # The place the lost task held is free again.
    response = await b.client.get("/api/tasks")
    assert response.json()["tasks"] == []


async def _follow_to_end(
    replica: Replica, task_id: str, seen: list[dict[str, Any]], ended: trio.Event
) -> None:
    """Follow the task's events on ``replica`` from the start to its end, into ``seen``;
    ``ended`` is set at the end."""
    async with replica.client.stream("GET", f"/api/tasks/{task_id}/events") as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                seen.append(json.loads(line[6:]))
    ended.set()


@asynccontextmanager
async def _a_behind_a_pausing_proxy(
    settings: Settings, redis_server: RedisServer
) -> AsyncIterator[tuple[PausingProxy, Replica, Replica]]:
    """Replica A reaching Redis through a ``PausingProxy``, and B reaching it directly,
    both started; stopped after."""
    proxy = PausingProxy(redis_server.port)
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        a = Replica(settings.with_overrides(redis_url=proxy.url), name="A")
        b = Replica(settings, name="B")
        try:
            await a.start()
            await b.start()
            yield proxy, a, b
        finally:
            await a.close()
            await b.close()
            nursery.cancel_scope.cancel()


async def test_a_replica_cut_off_from_redis_past_its_ttl_is_fenced_and_all_readers_agree(
    fakes: Fakes, redis_server: RedisServer
) -> None:
    """A partition: A's link to Redis goes silent (nothing closed) while its task streams
    to readers on A and on B. A's reader is let go once A's heartbeat may have lapsed (its
    stream ends, with nothing Redis lacks); B reaps A after the TTL. When the link comes
    back, A's late appends are refused (the log is closed) and its task stops at the
    model; the reader resumes on A from its last id and gets the reaper's end: every
    reader has the same log, with one terminal event."""
    settings = replica_settings(fakes, redis_server.url)
    async with _a_behind_a_pausing_proxy(settings, redis_server) as (proxy, a, b):
        fakes.model.push(TextReply([f"w{i} " for i in range(5000)], interval=0.01))
        task_id = await a.background(chat_body())
        on_a: list[dict[str, Any]] = []
        on_b: list[dict[str, Any]] = []
        # Bounded as a whole: the reaping alone takes up to the TTL after the pause.
        with trio.fail_after(2 * WAIT):
            model_request = await fakes.model.wait_for_request("/v1/chat/completions")
            async with trio.open_nursery() as readers:
                a_let_go = trio.Event()
                readers.start_soon(_follow_to_end, a, task_id, on_a, a_let_go)
                b_ended = trio.Event()
                readers.start_soon(_follow_to_end, b, task_id, on_b, b_ended)
                await _deltas_seen(b, task_id, 3)
                proxy.pause()
                paused_at = len(on_a)
                await a_let_go.wait()
                await b_ended.wait()  # B reaped A's task
                # A's reader saw nothing Redis lacks while cut off, and no end.
                assert len(on_a) <= len(on_b) - 1 and on_a == on_b[: len(on_a)]
                assert len(on_a) >= paused_at
                proxy.resume()
            closed = await fakes.model.wait_connection_closed(model_request.conn_id)
            await _readiness_becomes(a, 200)
            on_a += await _events(a, task_id, after=on_a[-1]["seq"] if on_a else 0)
        assert closed.closed_at is not None
        assert on_a == on_b
        terminal = assert_log_well_formed(on_a)
        assert terminal["data"]["error"]["type"] == "replica_lost"
        streamed = "".join(e["data"]["content"] for e in on_a if e["type"] == "delta")
        assert streamed.startswith("w0 w1 w2 ") and terminal["data"]["content"] == streamed
        assert await _events(a, task_id) == on_a == await _events(b, task_id)


async def _readiness_becomes(replica: Replica, status: int) -> dict[str, Any]:
    """Ask ``replica``'s ``/readyz`` until it answers ``status``; its body."""
    while True:
        answer = await replica.client.get("/readyz")
        if answer.status_code == status:
            return cast(dict[str, Any], answer.json())
        await trio.sleep(0.05)  # readiness changes with time: asked again


async def _reachable_metric(replica: Replica) -> float:
    text = (await replica.client.get("/metrics")).text
    (line,) = [ln for ln in text.splitlines() if ln.startswith("tether_task_store_reachable ")]
    return float(line.split()[1])


async def test_a_replica_taken_for_dead_stops_a_waiting_task_as_soon_as_it_is_heard_again(
    fakes: Fakes, redis_server: RedisServer
) -> None:
    """A partition while A's task waits on a page read (nothing to append, and no
    timeout of its own for minutes): once its heartbeat may have lapsed, A closes its
    WebSockets with 1013 and says it is not ready, and B reaps the task. When the link
    comes back, A's heartbeat finds that it had lapsed and A stops the task at once: the
    page read's connection is closed, though the task never appended again; A is ready
    again, and both agree on the log."""
    settings = replica_settings(fakes, redis_server.url, page_timeout_s=600, tool_timeout_s=600)
    async with _a_behind_a_pausing_proxy(settings, redis_server) as (proxy, a, b):
        hang = fakes.pages.base_url + "/hang"
        fakes.model.push(ToolCallReply([("fetch_url", {"url": hang})]))
        task_id = await a.background(chat_body("read it", tool_ids=["fetch_url"]))
        with trio.fail_after(2 * WAIT):
            page = await fakes.pages.wait_for_request("/hang")
            ready = await a.client.get("/readyz")
            assert ready.status_code == 200
            async with connect(cast(Any, a)) as on_ws:
                await on_ws.send({"type": "subscribe", "task_id": task_id, "after": 0})
                await on_ws.recv_type("event")
                proxy.pause()
                # Cut off, A lets its WebSocket go with "try again later".
                with pytest.raises(ConnectionClosed) as let_go:
                    while True:
                        await on_ws.ws.get_message()
            assert let_go.value.reason is not None and let_go.value.reason.code == 1013
            refused = await _readiness_becomes(a, 503)
            assert refused["error"]["code"] == "backend_unavailable"
            assert await _reachable_metric(a) == 0
            on_b = await _events(b, task_id)  # ends when B has reaped A's task
            assert on_b[-1]["type"] == "task:failed"
            assert on_b[-1]["data"]["error"]["type"] == "replica_lost"
            held = [c for c in fakes.pages.connections if c.id == page.conn_id]
            assert held[0].is_open  # A's task still waits on it
            proxy.resume()
            closed = await fakes.pages.wait_connection_closed(page.conn_id)
            await _readiness_becomes(a, 200)
            assert await _reachable_metric(a) == 1
            # The WebSocket's count in its session, taken out while A was cut off, is out
            # once A is heard: no other replica thinks the client is still on A.
            session = f"{settings.redis_prefix}:session:{on_ws.session_id}"
            counted = f"c:{ready.json()['replica']}"
            await until(
                lambda: trio.to_thread.run_sync(
                    lambda: ask(redis_server.port, "HGET", session, counted) is None
                )
            )
        assert closed.closed_at is not None
        assert await _events(a, task_id) == on_b


async def _stream_into(
    replica: Replica, path: str, body: dict[str, Any], lines: list[str], flowing: trio.Event
) -> str:
    """POST a streamed request to ``replica``: each ``data:`` line into ``lines`` to the
    stream's end, ``flowing`` set at the third; returns the task's id."""
    async with replica.client.stream("POST", path, json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                lines.append(line[6:])
                if len(lines) == 3:
                    flowing.set()
        return str(response.headers["X-Task-Id"])


async def test_streams_on_a_cut_off_replica_end_and_the_response_resumes_elsewhere(
    fakes: Fakes, redis_server: RedisServer
) -> None:
    """A streamed chat and a streamed response on A, whose link to Redis goes silent: once
    A's heartbeat may have lapsed, the chat's stream ends with a ``backend_unavailable``
    error naming its task, then ``[DONE]``, and the response's stream ends where it is, not
    a wait as long as the partition. What they streamed is what Redis holds: the response
    resumes on B from its last ``sequence_number`` to the reaper's end. When the link comes
    back (after B reaped both), both tasks stop at the model."""
    settings = replica_settings(fakes, redis_server.url)
    async with _a_behind_a_pausing_proxy(settings, redis_server) as (proxy, a, b):
        for _ in range(2):
            fakes.model.push(TextReply([f"w{i} " for i in range(5000)], interval=0.01))
        chat: list[str] = []
        streamed: list[str] = []
        ids: dict[str, str] = {}
        with trio.fail_after(2 * WAIT):
            async with trio.open_nursery() as streams:
                chat_flowing, response_flowing = trio.Event(), trio.Event()

                async def run(name: str, path: str, body: dict[str, Any], *into: Any) -> None:
                    ids[name] = await _stream_into(a, path, body, *into)

                streams.start_soon(
                    run, "chat", "/api/chat/completions", chat_body(stream=True), chat, chat_flowing
                )
                body = {"model": "fake-model", "input": "hi", "stream": True}
                streams.start_soon(
                    run, "response", "/v1/responses", body, streamed, response_flowing
                )
                await chat_flowing.wait()
                await response_flowing.wait()
                proxy.pause()
            await fakes.model.wait_for_request("/v1/chat/completions", count=2)
            # B reaps both tasks before the link comes back (their logs end on B): A's own
            # late ends (its streams' connections closed) are then refused by the fence.
            for task_id in ids.values():
                await _events(b, task_id)
            proxy.resume()
            for request in fakes.model.requests_for("/v1/chat/completions"):
                await fakes.model.wait_connection_closed(request.conn_id)
            seen = [json.loads(line) for line in streamed]
            rest = await _response_events(
                b, seen[0]["response"]["id"], after=seen[-1]["sequence_number"]
            )
        assert chat[-1] == "[DONE]"
        error = json.loads(chat[-2])
        assert (error["error"]["code"], error["task_id"]) == ("backend_unavailable", ids["chat"])
        text = "".join(json.loads(c)["choices"][0]["delta"].get("content", "") for c in chat[:-2])
        held = await _events(b, ids["chat"])
        assert "".join(e["data"]["content"] for e in held if e["type"] == "delta").startswith(text)
        ends = {"response.completed", "response.incomplete", "response.failed"}
        assert not ends & {e["type"] for e in seen}
        whole = await _response_events(b, seen[0]["response"]["id"])
        assert seen + rest == whole
        assert whole[-1]["type"] == "response.failed"


async def test_a_websocket_closed_while_redis_refuses_is_counted_out_of_its_session_later(
    fakes: Fakes, redis_server: RedisServer
) -> None:
    """A's link to Redis refused (every connection closed, new ones too), the other kind of
    partition: A closes its WebSocket with 1013 and cannot count it out of its session
    meanwhile; once Redis takes A again, the count goes. (Here the client's own retries
    carry the call over the partition; the session's retries cover a call that fails
    outright.) A count left behind would make every other replica think the client is
    still on A."""
    settings = replica_settings(fakes, redis_server.url)
    async with _a_behind_a_pausing_proxy(settings, redis_server) as (proxy, a, _b):
        counted = "c:" + (await a.client.get("/readyz")).json()["replica"]

        async def count(key: str) -> object:
            return await trio.to_thread.run_sync(ask, redis_server.port, "HGET", key, counted)

        with trio.fail_after(2 * WAIT):
            async with connect(cast(Any, a)) as on_ws:
                session = f"{settings.redis_prefix}:session:{on_ws.session_id}"
                assert await count(session) == "1"
                proxy.refuse()
                with pytest.raises(ConnectionClosed) as let_go:
                    while True:
                        await on_ws.ws.get_message()
            assert let_go.value.reason is not None and let_go.value.reason.code == 1013
            assert await count(session) == "1"  # Redis refused A: not counted out
            proxy.resume()
            await until(lambda: _is_none(count(session)))


async def _is_none(value: Awaitable[object]) -> bool:
    return await value is None


async def test_a_streamed_chat_let_go_by_a_lone_replica_leaves_its_task_running(
    fakes: Fakes, redis_server: RedisServer
) -> None:
    """One replica, and its link to Redis silent past 0.8 TTL (no other replica to reap
    it): its streamed chat is let go with ``backend_unavailable``, but the stream's end is
    not the client leaving. The task is not stopped: when the link comes back (within
    ``TETHER_BACKEND_TIMEOUT_S``, so that its writes were only held), it completes, its
    whole answer readable by its id."""
    settings = replica_settings(fakes, redis_server.url)
    proxy = PausingProxy(redis_server.port)
    words = [f"w{i} " for i in range(300)]
    async with trio.open_nursery() as nursery:
        await nursery.start(proxy.serve)
        a = Replica(settings.with_overrides(redis_url=proxy.url), name="A")
        try:
            await a.start()
            fakes.model.push(TextReply(words, interval=0.01))
            chat: list[str] = []
            with trio.fail_after(2 * WAIT):
                async with a.client.stream(
                    "POST", "/api/chat/completions", json=chat_body(stream=True)
                ) as response:
                    task_id = response.headers["X-Task-Id"]
                    async for line in response.aiter_lines():
                        if line.startswith("data: "):
                            chat.append(line[6:])
                            if len(chat) == 3:
                                proxy.pause()
                proxy.resume()
                await _readiness_becomes(a, 200)
                events = await _events(a, task_id)
            assert json.loads(chat[-2])["error"]["code"] == "backend_unavailable"
            terminal = assert_log_well_formed(events)
            assert terminal["type"] == "task:completed", terminal
            assert terminal["data"]["content"] == "".join(words)
        finally:
            await a.close()
            nursery.cancel_scope.cancel()


async def test_the_admission_limit_holds_across_both_replicas(
    fakes: Fakes, redis_server: RedisServer
) -> None:
    settings = replica_settings(fakes, redis_server.url, max_active_tasks=2)
    a, b = Replica(settings, name="A"), Replica(settings, name="B")
    try:
        await a.start()
        await b.start()
        fakes.model.push(HangReply())
        fakes.model.push(HangReply())
        first = await a.background(chat_body())
        await b.background(chat_body())
        for replica in (a, b):
            refused = await replica.chat({**chat_body(), "background": True})
            assert refused.status_code == 429
            assert refused.json()["error"]["code"] == "too_many_tasks"
        stopped = await b.client.post(f"/api/tasks/{first}/stop")
        assert stopped.json()["status"] == "cancelled"
        fakes.model.push(TextReply(["ok"]))
        assert (await a.chat({**chat_body(), "background": True})).status_code == 202
    finally:
        await a.close()
        await b.close()


async def test_a_redis_restart_fails_running_tasks_and_the_replica_goes_on(fakes: Fakes) -> None:
    """Redis keeps no data here: a restart loses the running tasks' logs. Each running
    task ends ``failed`` with ``backend_unavailable`` and its partial content, written
    anew; the replica serves new tasks as soon as Redis is back."""
    redis = RedisServer()
    redis.start()
    replica = Replica(replica_settings(fakes, redis.url), name="A")
    try:
        await replica.start()
        fakes.model.push(TextReply([f"w{i} " for i in range(5000)], interval=0.01))
        task_id = await replica.background(chat_body())
        with trio.fail_after(WAIT):
            await _deltas_seen(replica, task_id, 3)
        redis.restart()
        with trio.fail_after(WAIT):
            events = await _events(replica, task_id)
        terminal = events[-1]
        assert terminal["type"] == "task:failed"
        assert terminal["data"]["error"]["type"] == "backend_unavailable"
        assert terminal["data"]["content"].startswith("w0 w1 w2 ")
        fakes.model.push(TextReply(["back"]))
        answer = await replica.chat(chat_body())
        assert answer.status_code == 200
        assert answer.json()["choices"][0]["message"]["content"] == "back"
    finally:
        await replica.close()
        redis.stop()


async def test_a_replica_shutting_down_ends_its_tasks_and_closes_websockets_with_1012(
    pair: tuple[Replica, Replica], fakes: Fakes
) -> None:
    a, b = pair
    fakes.model.push(TextReply([f"w{i} " for i in range(5000)], interval=0.01))
    async with connect(cast(Any, a)) as on_a:
        task_id = await on_a.chat(chat_body())
        await on_a.events_until_terminal(task_id, stop_when=lambda e: e["type"] == "delta")
        assert await a.terminate() == 0
        events = await on_a.events_until_terminal(task_id)
        assert (events[-1]["type"], events[-1]["data"]["cancel_reason"]) == (
            "task:cancelled",
            "shutdown",
        )
        with trio.fail_after(WAIT), pytest.raises(ConnectionClosed) as closed:
            await on_a.ws.get_message()
        assert closed.value.reason is not None and closed.value.reason.code == 1012
    async with connect(cast(Any, b), session_id=on_a.session_id) as on_b:
        listed = {t["task_id"]: t for t in on_b.first_message["tasks"]}
        assert listed[task_id]["status"] == "cancelled"


async def test_two_workers_share_one_port_and_one_task_space(
    fakes: Fakes, redis_server: RedisServer
) -> None:
    server = Replica(
        replica_settings(fakes, redis_server.url), args=("--workers", "2"), name="workers"
    )
    try:
        await server.start()
        # New connections are spread over the workers by the kernel.
        seen: set[str] = set()
        with trio.fail_after(WAIT):
            while len(seen) < 2:
                async with httpx2.AsyncClient(base_url=server.base_url, trust_env=False) as fresh:
                    seen.add((await fresh.get("/readyz")).json()["replica"])
        fakes.search.configure(delay=30)
        task_id = await server.background(chat_body(features={"web_search": True}))
        with trio.fail_after(WAIT):
            request = await fakes.search.wait_for_request("/search")
        # Each stop on a connection of its own: whichever worker it reaches stops it.
        async with httpx2.AsyncClient(base_url=server.base_url, trust_env=False) as fresh:
            stopped = (await fresh.post(f"/api/tasks/{task_id}/stop")).json()
        assert (stopped["status"], stopped["cancel_reason"]) == ("cancelled", "stop")
        with trio.fail_after(WAIT):
            await fakes.search.wait_connection_closed(request.conn_id)
        assert await server.terminate() == 0
    finally:
        await server.close()


async def test_workers_without_redis_is_refused_with_a_clear_error() -> None:
    process = await trio.run_process(
        [sys.executable, "-m", "server", "serve", "--workers", "2", "--port", "0"],
        capture_stderr=True,
        check=False,
        env={"PATH": "/usr/bin:/bin"},
        cwd=ROOT,
    )
    assert process.returncode == 2
    assert b"--workers needs TETHER_BACKEND=redis" in process.stderr


async def test_the_reconnect_grace_holds_across_replicas(
    fakes: Fakes, redis_server: RedisServer
) -> None:
    """The last connection closes on A, the client comes back on B within the grace: the
    task goes on past A's grace period. When B's connection closes too, the task is
    stopped (on A) with reason disconnect once the grace has run out."""
    grace = 1.0
    settings = replica_settings(fakes, redis_server.url, ws_reconnect_grace_s=grace)
    a, b = Replica(settings, name="A"), Replica(settings, name="B")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.start)
            nursery.start_soon(b.start)
        fakes.model.push(TextReply([f"w{i} " for i in range(5000)], interval=0.01))
        async with connect(cast(Any, a)) as on_a:
            task_id = await on_a.chat(chat_body())
            seen = await on_a.events_until_terminal(
                task_id, stop_when=lambda e: e["type"] == "delta"
            )
        left_a = time.monotonic()
        async with connect(cast(Any, b), session_id=on_a.session_id) as on_b:
            await on_b.send({"type": "subscribe", "task_id": task_id, "after": seen[-1]["seq"]})
            # Deltas still flowing well after A's grace period has run out.
            late = await on_b.events_until_terminal(
                task_id, stop_when=lambda e: time.monotonic() > left_a + 2 * grace
            )
            assert late[-1]["type"] == "delta", late[-1]
        with trio.fail_after(WAIT):
            model_request = await fakes.model.wait_for_request("/v1/chat/completions")
            events = await _events(a, task_id, after=late[-1]["seq"])
        terminal = events[-1]
        assert (terminal["type"], terminal["data"]["cancel_reason"]) == (
            "task:cancelled",
            "disconnect",
        )
        with trio.fail_after(WAIT):
            await fakes.model.wait_connection_closed(model_request.conn_id)
    finally:
        await a.close()
        await b.close()


async def test_a_connection_on_b_follows_a_task_started_on_a_in_its_session(
    pair: tuple[Replica, Replica], fakes: Fakes
) -> None:
    a, b = pair
    fakes.model.push(TextReply([f"w{i} " for i in range(20)], interval=0.01))
    async with connect(cast(Any, b)) as on_b:
        task_id = await a.background({**chat_body(), "session_id": on_b.session_id})
        events = await on_b.events_until_terminal(task_id)
    terminal = assert_log_well_formed(events)
    assert terminal["type"] == "task:completed"
    assert terminal["data"]["content"] == "".join(f"w{i} " for i in range(20))


async def _response_events(
    replica: Replica, response_id: str, after: int | None = None
) -> list[dict[str, Any]]:
    query = "" if after is None else f"&starting_after={after}"
    return await _sse(replica, f"/v1/responses/{response_id}?stream=true{query}")


async def test_a_background_response_on_a_is_read_resumed_and_cancelled_via_b(
    pair: tuple[Replica, Replica], fakes: Fakes
) -> None:
    a, b = pair
    fakes.model.push(TextReply([f"w{i} " for i in range(1000)], interval=0.02))
    created = await a.client.post(
        "/v1/responses", json={"model": "fake-model", "input": "hi", "background": True}
    )
    assert created.status_code == 200 and created.json()["status"] == "queued"
    response_id = created.json()["id"]
    with trio.fail_after(WAIT):
        request = await fakes.model.wait_for_request("/v1/chat/completions")
        # Read on B while it runs on A, from a cursor in its stream.
        async with b.client.stream("GET", f"/v1/responses/{response_id}?stream=true") as stream:
            seen: list[dict[str, Any]] = []
            async for line in stream.aiter_lines():
                if line.startswith("data: "):
                    seen.append(json.loads(line[6:]))
                    if sum(e["type"] == "response.output_text.delta" for e in seen) >= 3:
                        break
        cancelled = (await b.client.post(f"/v1/responses/{response_id}/cancel")).json()
        await fakes.model.wait_connection_closed(request.conn_id)
    assert cancelled["status"] == "cancelled"
    assert cancelled["output"][0]["content"][0]["text"].startswith("w0 w1 w2 ")
    rest = await _response_events(b, response_id, after=seen[-1]["sequence_number"])
    whole = await _response_events(a, response_id)
    assert seen + rest == whole
    assert whole[-1]["type"] == "response.incomplete"
    assert whole[-1]["response"]["status"] == "cancelled"


async def test_a_skip_via_b_reaches_a_search_running_on_a(
    pair: tuple[Replica, Replica], fakes: Fakes
) -> None:
    a, b = pair
    fakes.search.configure(delay=30)
    fakes.model.push(TextReply(["Answered without the search."]))
    task_id = await a.background(chat_body(features={"web_search": True}))
    with trio.fail_after(WAIT):
        request = await fakes.search.wait_for_request("/search")
    skipped = await b.client.post(f"/api/tasks/{task_id}/skip", json={"step": "web_search"})
    assert skipped.status_code == 200 and skipped.json()["state"] == "skipped"
    with trio.fail_after(WAIT):
        await fakes.search.wait_connection_closed(request.conn_id)
    terminal = assert_log_well_formed(await _events(b, task_id))
    assert terminal["type"] == "task:completed"
    assert terminal["data"]["content"] == "Answered without the search."
    again = await b.client.post(f"/api/tasks/{task_id}/skip", json={"step": "web_search"})
    assert again.status_code == 409 and again.json()["step"]["state"] == "skipped"
