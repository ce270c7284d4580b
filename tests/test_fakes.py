"""Tests for the loopback fakes in fakes/ (real sockets, httpx2 client)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx2
import pytest
import trio

from fakes import (
    JUNK_MARKERS,
    DieMidwayReply,
    EchoReply,
    ErrorReply,
    FakeModel,
    FakePages,
    FakeSearxng,
    HangReply,
    TextReply,
    ToolCallReply,
    reply_from_json,
)

REPO = Path(__file__).resolve().parent.parent
CHAT = "/v1/chat/completions"
WAIT = 5.0  # generous upper bound for anything that should happen "promptly"


@pytest.fixture
async def model(nursery: trio.Nursery) -> FakeModel:
    fake = FakeModel()
    await fake.start(nursery)
    return fake


@pytest.fixture
async def search(nursery: trio.Nursery) -> FakeSearxng:
    fake = FakeSearxng()
    await fake.start(nursery)
    return fake


@pytest.fixture
async def pages(nursery: trio.Nursery) -> FakePages:
    fake = FakePages()
    await fake.start(nursery)
    return fake


@pytest.fixture
async def client() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(trust_env=False, timeout=WAIT) as c:
        yield c


def chat_body(text: str = "hi there", stream: bool = False, **extra: Any) -> dict[str, Any]:
    return {
        "model": "fake-model",
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": text},
        ],
        "stream": stream,
        **extra,
    }


async def read_sse(resp: httpx2.Response) -> list[tuple[float, Any]]:
    """(arrival monotonic time, parsed JSON or "[DONE]") per SSE event."""
    out: list[tuple[float, Any]] = []
    async for line in resp.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[len("data: ") :]
        out.append((time.monotonic(), data if data == "[DONE]" else json.loads(data)))
    return out


def content_of(events: list[tuple[float, Any]]) -> str:
    text = ""
    for _, ev in events:
        if isinstance(ev, dict):
            for choice in ev["choices"]:
                text += choice["delta"].get("content") or ""
    return text


# --------------------------------------------------------------------------- model


async def test_models_list(model: FakeModel, client: httpx2.AsyncClient) -> None:
    resp = await client.get(f"{model.base_url}/v1/models")
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["fake-model", "fake-tools"]
    assert body["data"][0] == {
        "id": "fake-model",
        "object": "model",
        "created": 0,
        "owned_by": "fake",
    }
    model.configure(models=["a", "b", "c"])
    resp = await client.get(f"{model.base_url}/v1/models")
    assert [m["id"] for m in resp.json()["data"]] == ["a", "b", "c"]


async def test_nonstream_default_reply_and_recorded_body(
    model: FakeModel, client: httpx2.AsyncClient
) -> None:
    resp = await client.post(f"{model.base_url}{CHAT}", json=chat_body("what is up"))
    assert resp.status_code == 200
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "Hello from the fake model.",
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 5
    req = model.requests[-1]
    assert req.method == "POST" and req.path == CHAT
    assert req.json_body["messages"][-1]["content"] == "what is up"
    assert model.chat_requests == [req.json_body]
    assert req.meta["reply_kind"] == "text"
    assert req.headers["content-type"] == "application/json"


async def test_stream_is_incremental(model: FakeModel, client: httpx2.AsyncClient) -> None:
    model.push(TextReply(["one", " two", " three", " four"], interval=0.12))
    async with client.stream("POST", f"{model.base_url}{CHAT}", json=chat_body(stream=True)) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["transfer-encoding"] == "chunked"
        events = await read_sse(r)
    assert events[-1][1] == "[DONE]"
    chunks = [ev for _, ev in events[:-1]]
    assert content_of(events) == "one two three four"
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["usage"]["completion_tokens"] == 4
    # Arrival times are spread out: each chunk is flushed when it is produced.
    arrivals = [t for t, _ in events[:4]]
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert all(g >= 0.08 for g in gaps), gaps
    # fake_sent_at is time.monotonic() in the fake, comparable to our clock.
    for t, ev in events[:-1]:
        assert 0 <= t - ev["fake_sent_at"] < 0.5


async def test_stream_reasoning_then_content(model: FakeModel, client: httpx2.AsyncClient) -> None:
    model.push(TextReply(["A", "B"], reasoning_chunks=["think ", "hard"]))
    async with client.stream("POST", f"{model.base_url}{CHAT}", json=chat_body(stream=True)) as r:
        events = await read_sse(r)
    deltas = [ev["choices"][0]["delta"] for _, ev in events if isinstance(ev, dict)]
    assert deltas[0] == {"role": "assistant", "reasoning_content": "think "}
    assert deltas[1] == {"reasoning_content": "hard"}
    assert content_of(events) == "AB"

    model.push(TextReply(["A", "B"], reasoning_chunks=["x"]))
    resp = await client.post(f"{model.base_url}{CHAT}", json=chat_body())
    message = resp.json()["choices"][0]["message"]
    assert message["content"] == "AB" and message["reasoning_content"] == "x"

    model.push(TextReply(["A"], reasoning_chunks=["y"], reasoning_field="reasoning"))
    async with client.stream("POST", f"{model.base_url}{CHAT}", json=chat_body(stream=True)) as r:
        events = await read_sse(r)
    assert events[0][1]["choices"][0]["delta"] == {"role": "assistant", "reasoning": "y"}


async def test_tokens_and_rate(model: FakeModel, client: httpx2.AsyncClient) -> None:
    model.push(TextReply(tokens=6, rate=50.0))
    start = time.monotonic()
    async with client.stream("POST", f"{model.base_url}{CHAT}", json=chat_body(stream=True)) as r:
        events = await read_sse(r)
    assert content_of(events) == "".join(f"tok{i} " for i in range(6))
    # 6 tokens at 50/s: >= 5 gaps of 20 ms
    assert time.monotonic() - start >= 0.09
    sent = [ev["fake_sent_at"] for _, ev in events[:6]]
    assert sent[-1] - sent[0] >= 0.09


async def test_client_close_mid_stream_is_seen_promptly(
    model: FakeModel, client: httpx2.AsyncClient
) -> None:
    model.push(TextReply(["first", " second", " third"], interval=30.0))
    async with client.stream("POST", f"{model.base_url}{CHAT}", json=chat_body(stream=True)) as r:
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                break  # got the first chunk; walk away while the fake "sleeps"
    closed_here = time.monotonic()
    conn_id = model.requests[-1].conn_id
    with trio.fail_after(WAIT):
        rec = await model.wait_connection_closed(conn_id)
    assert rec.closed_at is not None
    assert rec.closed_by == "client"
    assert rec.closed_at - closed_here < 1.0
    assert model.open_connections() == []


async def test_client_close_during_hang(model: FakeModel, client: httpx2.AsyncClient) -> None:
    model.push(HangReply())
    async with client.stream("POST", f"{model.base_url}{CHAT}", json=chat_body(stream=True)) as r:
        assert r.status_code == 200
    closed_here = time.monotonic()
    with trio.fail_after(WAIT):
        rec = await model.wait_connection_closed(model.requests[-1].conn_id)
    assert rec.closed_by == "client"
    assert rec.closed_at is not None and rec.closed_at - closed_here < 1.0


async def test_hang_without_headers_then_client_timeout(
    model: FakeModel, client: httpx2.AsyncClient
) -> None:
    model.push(HangReply(send_headers=False))
    with pytest.raises(httpx2.ReadTimeout):
        await client.post(f"{model.base_url}{CHAT}", json=chat_body(), timeout=0.2)
    with trio.fail_after(WAIT):
        rec = await model.wait_connection_closed(model.requests[-1].conn_id)
    assert rec.closed_by == "client"


async def test_keepalive_reuses_connection(model: FakeModel, client: httpx2.AsyncClient) -> None:
    for _ in range(3):
        resp = await client.post(f"{model.base_url}{CHAT}", json=chat_body())
        assert resp.status_code == 200
    async with client.stream("POST", f"{model.base_url}{CHAT}", json=chat_body(stream=True)) as r:
        await read_sse(r)
    await client.get(f"{model.base_url}/v1/models")
    assert len(model.connections) == 1
    conn = model.connections[0]
    assert conn.paths == [CHAT] * 4 + ["/v1/models"]
    assert {r.conn_id for r in model.requests} == {conn.id}
    assert conn.closed_at is None and model.open_connections() == [conn]
    await client.aclose()
    with trio.fail_after(WAIT):
        await model.wait_all_closed()
    assert conn.closed_by == "client"


async def test_tool_calls_stream_and_nonstream(
    model: FakeModel, client: httpx2.AsyncClient
) -> None:
    args = json.dumps({"query": "trio structured concurrency", "k": 3})
    model.push(ToolCallReply([("web_search", args), ("fetch", '{"url": "http://x"}')]))
    async with client.stream("POST", f"{model.base_url}{CHAT}", json=chat_body(stream=True)) as r:
        events = await read_sse(r)
    calls: dict[int, dict[str, str]] = {}
    pieces: dict[int, int] = {}
    finish = None
    for _, ev in events:
        if not isinstance(ev, dict):
            continue
        choice = ev["choices"][0]
        finish = choice["finish_reason"] or finish
        for tc in choice["delta"].get("tool_calls", []):
            slot = calls.setdefault(tc["index"], {"id": "", "name": "", "arguments": ""})
            if "id" in tc:
                slot["id"] = tc["id"]
                assert tc["type"] == "function"
                assert tc["function"]["arguments"] == ""
            slot["name"] += tc["function"].get("name", "")
            if tc["function"].get("arguments"):
                pieces[tc["index"]] = pieces.get(tc["index"], 0) + 1
            slot["arguments"] += tc["function"].get("arguments", "")
    assert finish == "tool_calls"
    assert calls[0]["name"] == "web_search" and json.loads(calls[0]["arguments"])["k"] == 3
    assert calls[1]["name"] == "fetch" and calls[1]["arguments"] == '{"url": "http://x"}'
    assert calls[0]["id"] != calls[1]["id"]
    assert pieces[0] >= 2 and pieces[1] >= 2

    model.push(reply_from_json({"kind": "tool_calls", "calls": [["fetch", {"url": "u"}]]}))
    resp = await client.post(f"{model.base_url}{CHAT}", json=chat_body())
    choice = resp.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    (tc,) = choice["message"]["tool_calls"]
    assert tc["function"] == {"name": "fetch", "arguments": '{"url": "u"}'}


async def test_error_reply(model: FakeModel, client: httpx2.AsyncClient) -> None:
    model.push(ErrorReply(), ErrorReply(status=429, body={"error": {"message": "slow down"}}))
    resp = await client.post(f"{model.base_url}{CHAT}", json=chat_body(stream=True))
    assert resp.status_code == 500
    assert resp.json() == {"error": {"message": "boom", "type": "server_error"}}
    resp = await client.post(f"{model.base_url}{CHAT}", json=chat_body())
    assert resp.status_code == 429
    assert resp.json()["error"]["message"] == "slow down"
    assert len(model.connections) == 1  # errors keep the connection alive


async def test_die_midway(model: FakeModel, client: httpx2.AsyncClient) -> None:
    model.push(DieMidwayReply(["partial", " answer"]))
    got: list[str] = []
    with pytest.raises(httpx2.RemoteProtocolError):
        async with client.stream(
            "POST", f"{model.base_url}{CHAT}", json=chat_body(stream=True)
        ) as r:
            async for line in r.aiter_lines():
                got.append(line)
    assert any("partial" in line for line in got)
    assert not any("[DONE]" in line for line in got)
    with trio.fail_after(WAIT):
        rec = await model.wait_connection_closed(model.requests[-1].conn_id)
    assert rec.closed_by == "server"

    model.push(DieMidwayReply(["x"]))
    with pytest.raises(httpx2.RemoteProtocolError):
        await client.post(f"{model.base_url}{CHAT}", json=chat_body())


async def test_rules_script_and_echo(model: FakeModel, client: httpx2.AsyncClient) -> None:
    model.add_rule("generate queries", TextReply(['["q1", "q2"]']))
    model.push(TextReply(["scripted 1"]), TextReply(["scripted 2"]))
    model.default_reply = EchoReply()

    async def ask(text: str) -> str:
        resp = await client.post(f"{model.base_url}{CHAT}", json=chat_body(text))
        content: str = resp.json()["choices"][0]["message"]["content"]
        return content

    assert await ask("please generate queries for X") == '["q1", "q2"]'
    assert await ask("answer") == "scripted 1"
    assert await ask("generate queries again") == '["q1", "q2"]'  # rules are not consumed
    assert await ask("answer") == "scripted 2"
    assert await ask("echo these words") == "echo these words"
    # content given as a list of parts also works for echo
    body = chat_body()
    body["messages"][-1]["content"] = [{"type": "text", "text": "part one"}]
    async with client.stream("POST", f"{model.base_url}{CHAT}", json={**body, "stream": True}) as r:
        events = await read_sse(r)
    assert content_of(events) == "part one"


async def test_require_api_key(model: FakeModel, client: httpx2.AsyncClient) -> None:
    model.configure(require_api_key="sk-test")
    resp = await client.get(f"{model.base_url}/v1/models")
    assert resp.status_code == 401
    resp = await client.get(
        f"{model.base_url}/v1/models", headers={"authorization": "Bearer sk-test"}
    )
    assert resp.status_code == 200


async def test_wait_for_request_counts(model: FakeModel, client: httpx2.AsyncClient) -> None:
    async def fire() -> None:
        for i in range(3):
            await client.post(f"{model.base_url}{CHAT}", json=chat_body(f"msg {i}"))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fire)
        with trio.fail_after(WAIT):
            req = await model.wait_for_request(CHAT, count=3)
    assert req.json_body["messages"][-1]["content"] == "msg 2"
    with trio.fail_after(WAIT):
        assert (await model.wait_for_request("/v1/", 1)).path == CHAT


# --------------------------------------------------------------------------- control API


async def test_control_api(model: FakeModel, client: httpx2.AsyncClient) -> None:
    ctl = f"{model.base_url}/_fake"
    resp = await client.post(
        f"{ctl}/config",
        json={
            "script": [{"kind": "text", "chunks": ["from", " config"], "interval": 0.0}],
            "rules": [["magic", {"kind": "error", "status": 503}]],
            "models": ["m1"],
        },
    )
    assert resp.status_code == 200
    settings = resp.json()
    assert settings["models"] == ["m1"]
    assert settings["script"][0]["kind"] == "text"
    assert settings["rules"][0][1]["status"] == 503
    resp = await client.post(f"{ctl}/script", json={"kind": "echo"})
    assert resp.json() == {"script_len": 2}
    assert (await client.post(f"{ctl}/config", json={"nope": 1})).status_code == 400

    async with httpx2.AsyncClient(trust_env=False, timeout=WAIT) as other:
        r1 = await other.post(f"{model.base_url}{CHAT}", json=chat_body("hello"))
        r2 = await other.post(f"{model.base_url}{CHAT}", json=chat_body("say magic"))
        r3 = await other.post(f"{model.base_url}{CHAT}", json=chat_body("echo me"))
    assert r1.json()["choices"][0]["message"]["content"] == "from config"
    assert r2.status_code == 503
    assert r3.json()["choices"][0]["message"]["content"] == "echo me"

    reqs = (await client.get(f"{ctl}/requests")).json()
    assert [r["path"] for r in reqs] == [CHAT] * 3
    assert reqs[2]["json_body"]["messages"][-1]["content"] == "echo me"
    conns = (await client.get(f"{ctl}/connections")).json()
    assert len(conns) == 1  # only the "other" client's connection; control is excluded
    assert conns[0]["closed_at"] is not None and conns[0]["closed_by"] == "client"
    assert conns[0]["paths"] == [CHAT] * 3
    all_conns = (await client.get(f"{ctl}/connections", params={"all": "1"})).json()
    assert any(c["control"] for c in all_conns)
    assert model.open_connections() == []  # the open control connection is not listed

    waited = (await client.get(f"{ctl}/wait_request", params={"path_prefix": CHAT})).json()
    assert waited["conn_id"] == conns[0]["id"]
    closed = (await client.get(f"{ctl}/wait_closed", params={"conn_id": conns[0]["id"]})).json()
    assert closed["closed_by"] == "client"
    timeout = await client.get(
        f"{ctl}/wait_request", params={"path_prefix": "/nothing", "timeout": "0.05"}
    )
    assert timeout.status_code == 504

    assert (await client.post(f"{ctl}/reset")).json() == {"ok": True}
    assert (await client.get(f"{ctl}/requests")).json() == []
    assert (await client.get(f"{ctl}/connections")).json() == []
    settings = (await client.get(f"{ctl}/config")).json()
    assert settings["models"] == ["fake-model", "fake-tools"] and settings["script"] == []
    assert model.script == [] and model.requests == []


async def test_stop_closes_connections_as_server(
    nursery: trio.Nursery, client: httpx2.AsyncClient
) -> None:
    fake = FakeModel()
    await fake.start(nursery)
    fake.push(HangReply())

    async def hang_request() -> None:
        with pytest.raises(httpx2.RemoteProtocolError):
            await client.post(f"{fake.base_url}{CHAT}", json=chat_body())

    async with trio.open_nursery() as inner:
        inner.start_soon(hang_request)
        with trio.fail_after(WAIT):
            req = await fake.wait_for_request(CHAT)
        fake.stop()
        with trio.fail_after(WAIT):
            rec = await fake.wait_connection_closed(req.conn_id)
    assert rec.closed_by == "server"
    with pytest.raises(httpx2.ConnectError):
        await client.get(f"{fake.base_url}/v1/models")


def test_reply_from_json_kinds() -> None:
    assert reply_from_json({"kind": "text", "chunks": ["a"], "interval": 0.05}) == TextReply(
        ["a"], interval=0.05
    )
    assert reply_from_json({"kind": "error", "status": 502}) == ErrorReply(status=502)
    assert reply_from_json({"kind": "die_midway", "chunks": ["a"]}) == DieMidwayReply(["a"])
    assert reply_from_json({"kind": "hang"}) == HangReply()
    assert reply_from_json({"kind": "echo", "interval": 0.1}) == EchoReply(0.1)
    tool = reply_from_json({"kind": "tool_calls", "calls": [{"name": "f", "arguments": "{}"}]})
    assert tool == ToolCallReply([("f", "{}")])
    with pytest.raises(ValueError):
        reply_from_json({"kind": "bogus"})


# --------------------------------------------------------------------------- search


async def test_searxng_results(
    search: FakeSearxng, pages: FakePages, client: httpx2.AsyncClient
) -> None:
    search.page_base_url = pages.base_url
    resp = await client.get(
        f"{search.base_url}/search", params={"q": "trio nurseries", "format": "json"}
    )
    assert resp.status_code == 200
    body = resp.json()
    assert body["query"] == "trio nurseries"
    assert len(body["results"]) == 5
    first = body["results"][0]
    assert first["title"] == "Result 1 for trio nurseries"
    assert first["url"].startswith(f"{pages.base_url}/page/1?q=")
    assert "trio nurseries" in first["content"]
    page = await client.get(first["url"])
    assert page.status_code == 200 and "trio nurseries" in page.text
    assert search.queries == ["trio nurseries"]

    search.configure(results=[{"url": "http://127.0.0.1:1/x", "title": "X", "content": "c"}])
    body = (await client.get(f"{search.base_url}/search", params={"q": "z"})).json()
    assert [r["title"] for r in body["results"]] == ["X"]


async def test_search_modes(search: FakeSearxng, client: httpx2.AsyncClient) -> None:
    url = f"{search.base_url}/search"
    search.configure(mode="500")
    assert (await client.get(url, params={"q": "a"})).status_code == 500
    search.configure(mode="bad_json")
    resp = await client.get(url, params={"q": "a"})
    assert resp.status_code == 200
    with pytest.raises(ValueError):
        resp.json()
    search.configure(mode="hang")
    with pytest.raises(httpx2.ReadTimeout):
        await client.get(url, params={"q": "a"}, timeout=0.2)
    with trio.fail_after(WAIT):
        rec = await search.wait_connection_closed(search.requests[-1].conn_id)
    assert rec.closed_by == "client"


async def test_search_delay_and_client_cancel(
    search: FakeSearxng, client: httpx2.AsyncClient
) -> None:
    search.configure(delay=60.0)

    async def query() -> None:
        await client.get(f"{search.base_url}/search", params={"q": "slow"})

    async with trio.open_nursery() as nursery:
        nursery.start_soon(query)
        with trio.fail_after(WAIT):
            req = await search.wait_for_request("/search")
        nursery.cancel_scope.cancel()  # like Tether cancelling its pipeline
    cancelled_at = time.monotonic()
    with trio.fail_after(WAIT):
        rec = await search.wait_connection_closed(req.conn_id)
    assert rec.closed_by == "client"
    assert rec.closed_at is not None and rec.closed_at - cancelled_at < 1.0

    search.configure(delay=0.05)
    start = time.monotonic()
    resp = await client.get(f"{search.base_url}/search", params={"q": "quick"})
    assert resp.status_code == 200 and time.monotonic() - start >= 0.05


async def test_brave_and_tavily(search: FakeSearxng, client: httpx2.AsyncClient) -> None:
    brave = f"{search.base_url}/res/v1/web/search"
    assert (await client.get(brave, params={"q": "x"})).status_code == 401
    resp = await client.get(
        brave, params={"q": "x", "count": "3"}, headers={"X-Subscription-Token": "k"}
    )
    assert resp.status_code == 200
    results = resp.json()["web"]["results"]
    assert len(results) == 3
    assert set(results[0]) >= {"url", "title", "description"}
    assert results[0]["title"] == "Result 1 for x"

    tavily = f"{search.base_url}/search"
    assert (await client.post(tavily, json={"query": "y"})).status_code == 401
    resp = await client.post(tavily, json={"query": "y", "max_results": 2, "api_key": "k"})
    assert resp.status_code == 200
    items = resp.json()["results"]
    assert [r["title"] for r in items] == ["Result 1 for y", "Result 2 for y"]
    assert set(items[0]) >= {"url", "title", "content"}
    resp = await client.post(tavily, json={"query": "y"}, headers={"Authorization": "Bearer k"})
    assert len(resp.json()["results"]) == 5

    search.configure(api_key="right", mode="500")
    assert (
        await client.get(brave, params={"q": "x"}, headers={"X-Subscription-Token": "wrong"})
    ).status_code == 401
    resp = await client.post(tavily, json={"query": "y", "api_key": "right"})
    assert resp.status_code == 500  # mode applies to every flavour
    assert search.queries == ["x", "x", "y", "y", "y", "x", "y"]


async def test_search_control_api(search: FakeSearxng, client: httpx2.AsyncClient) -> None:
    ctl = f"{search.base_url}/_fake"
    resp = await client.post(f"{ctl}/config", json={"mode": "500", "num_results": 2})
    assert resp.json()["mode"] == "500"
    assert (await client.post(f"{ctl}/config", json={"mode": "weird"})).status_code == 400
    assert (await client.get(f"{search.base_url}/search", params={"q": "a"})).status_code == 500
    await client.post(f"{ctl}/config", json={"mode": "ok"})
    body = (await client.get(f"{search.base_url}/search", params={"q": "a"})).json()
    assert len(body["results"]) == 2
    await client.post(f"{ctl}/reset")
    assert search.mode == "ok" and search.num_results == 5 and search.requests == []


# --------------------------------------------------------------------------- pages


async def test_page_html(pages: FakePages, client: httpx2.AsyncClient) -> None:
    resp = await client.get(f"{pages.base_url}/page/alpha")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/html")
    text = resp.text
    assert "<title>Fake page alpha</title>" in text
    assert text.count("alpha") >= 3
    for marker in JUNK_MARKERS:
        assert marker in text  # present in the raw HTML, only inside junk elements
    assert "<script>" in text and "<style>" in text


async def test_page_misc_routes(pages: FakePages, client: httpx2.AsyncClient) -> None:
    base = pages.base_url
    resp = await client.get(f"{base}/redirect/beta", follow_redirects=True)
    assert resp.status_code == 200 and "Fake page beta" in resp.text
    assert [r.status_code for r in resp.history] == [302]
    resp = await client.get(f"{base}/redirect/beta")
    assert resp.status_code == 302 and resp.headers["location"] == "/page/beta"
    assert (await client.get(f"{base}/status/404")).status_code == 404
    assert (await client.get(f"{base}/status/503")).status_code == 503
    resp = await client.get(f"{base}/status/204")
    assert resp.status_code == 204 and resp.content == b""
    resp = await client.get(f"{base}/binary")
    assert resp.headers["content-type"] == "application/octet-stream"
    assert resp.content.startswith(b"\x89PNG")
    resp = await client.get(f"{base}/json")
    assert resp.headers["content-type"] == "application/json" and resp.json()["name"] == "json"
    resp = await client.get(f"{base}/text")
    assert resp.headers["content-type"].startswith("text/plain") and "Plain text" in resp.text
    assert (await client.get(f"{base}/nowhere")).status_code == 404

    url = pages.set_page("/custom", "<html><title>Mine</title><p>custom body</p></html>")
    resp = await client.get(url)
    assert "custom body" in resp.text
    pages.set_page("/data.csv", "a,b\n1,2\n", content_type="text/csv", status=201)
    resp = await client.get(f"{base}/data.csv")
    assert resp.status_code == 201 and resp.headers["content-type"] == "text/csv"

    await client.post(
        f"{base}/_fake/config", json={"pages": {"/via-config": {"html": "<p>cfg</p>"}}}
    )
    assert (await client.get(f"{base}/via-config")).text == "<p>cfg</p>"
    assert len(pages.connections) == 1  # one keep-alive connection; control excluded
    assert pages.connections[0].paths[-1] == "/via-config"


async def test_page_huge_is_streamed(pages: FakePages, client: httpx2.AsyncClient) -> None:
    total = 0
    chunks = 0
    async with client.stream("GET", f"{pages.base_url}/huge/1") as resp:
        assert resp.headers["transfer-encoding"] == "chunked"
        async for piece in resp.aiter_raw():
            total += len(piece)
            chunks += 1
    assert total == 1024 * 1024
    assert chunks > 1

    # Reading a little and walking away closes the connection promptly.
    async with client.stream("GET", f"{pages.base_url}/huge/50") as resp:
        async for _ in resp.aiter_raw():
            break
    with trio.fail_after(WAIT):
        rec = await pages.wait_connection_closed(pages.requests[-1].conn_id)
    assert rec.closed_by == "client"


async def test_page_slow_and_hang(pages: FakePages, client: httpx2.AsyncClient) -> None:
    start = time.monotonic()
    resp = await client.get(f"{pages.base_url}/slow/0.1")
    assert resp.status_code == 200 and time.monotonic() - start >= 0.1

    for path in ("/slow/60", "/hang"):
        with pytest.raises(httpx2.ReadTimeout):
            await client.get(f"{pages.base_url}{path}", timeout=0.2)
        timed_out_at = time.monotonic()
        with trio.fail_after(WAIT):
            rec = await pages.wait_connection_closed(pages.requests[-1].conn_id)
        assert rec.closed_by == "client"
        assert rec.closed_at is not None and rec.closed_at - timed_out_at < 1.0

    pages.set_page("/delayed", "<p>late</p>", delay=60.0)
    with pytest.raises(httpx2.ReadTimeout):
        await client.get(f"{pages.base_url}/delayed", timeout=0.2)
    with trio.fail_after(WAIT):
        await pages.wait_all_closed()


# --------------------------------------------------------------------------- processes


@pytest.mark.parametrize("module", ["model", "search", "pages"])
async def test_module_main_prints_ready(module: str) -> None:
    proc = await trio.lowlevel.open_process(
        [sys.executable, "-m", f"fakes.{module}", "--port", "0"],
        stdout=subprocess.PIPE,
        cwd=str(REPO),
    )
    try:
        assert proc.stdout is not None
        buf = b""
        with trio.fail_after(WAIT * 2):
            while b"\n" not in buf:
                data = await proc.stdout.receive_some(1024)
                assert data, "process exited before READY"
                buf += data
        line = buf.split(b"\n", 1)[0].decode()
        word, port_text = line.split()
        assert word == "READY"
        port = int(port_text)
        assert port > 0
        async with httpx2.AsyncClient(trust_env=False, timeout=WAIT) as c:
            health = (await c.get(f"http://127.0.0.1:{port}/_fake/health")).json()
            assert health["ok"] and health["port"] == port
            # cross-process monotonic clock: the fake's "now" is close to ours
            assert abs(health["now"] - time.monotonic()) < 2.0
            if module == "model":
                r = await c.post(f"http://127.0.0.1:{port}{CHAT}", json=chat_body())
                assert r.json()["choices"][0]["message"]["content"] == "Hello from the fake model."
                conns = (await c.get(f"http://127.0.0.1:{port}/_fake/connections")).json()
                assert len(conns) == 1 and conns[0]["paths"] == [CHAT]
    finally:
        proc.kill()
        with trio.CancelScope(shield=True):
            await proc.wait()


async def test_serving_context_manager_and_head(client: httpx2.AsyncClient) -> None:
    async with FakePages().serving() as pages:
        resp = await client.head(f"{pages.base_url}/page/x")
        assert resp.status_code == 200 and resp.content == b""
        assert int(resp.headers["content-length"]) > 0
        assert (await client.get(f"{pages.base_url}/page/x")).status_code == 200
        assert len(pages.connections) == 1
    with pytest.raises(httpx2.ConnectError):
        await client.get(f"{pages.base_url}/page/x")
