"""The three modes of POST /api/chat/completions, against a real server and fakes."""

from __future__ import annotations

import json

import httpx2
import pytest
import trio

from fakes.model import TextReply
from tests.conftest import WAIT, Fakes, Tether
from tests.helpers import assert_log_well_formed, chat_body

pytestmark = pytest.mark.all_backends


async def test_background_request_answers_202_with_task_id(tether: Tether) -> None:
    response = await tether.chat(chat_body(background=True, chat_id="c1", message_id="m1"))
    assert response.status_code == 202
    body = response.json()
    assert body["status"] == "queued"
    assert body["chat_id"] == "c1" and body["message_id"] == "m1"
    assert response.headers["X-Task-Id"] == body["task_id"]
    events = await tether.events(body["task_id"])
    terminal = assert_log_well_formed(events)
    assert [e["type"] for e in events[:2]] == ["task:queued", "task:started"]
    assert terminal["type"] == "task:completed"
    assert terminal["data"]["content"] == "Hello from the fake model."
    assert terminal["data"]["phase"] == "done"
    assert all(e["chat_id"] == "c1" and e["message_id"] == "m1" for e in events)


async def test_background_202_arrives_within_a_second_while_search_waits_30s(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.search.configure(delay=30)
    with trio.fail_after(1):
        response = await tether.chat(chat_body(background=True, features={"web_search": True}))
    assert response.status_code == 202
    task_id = response.json()["task_id"]
    with trio.fail_after(WAIT):
        await fakes.search.wait_for_request("/search")
    task = (await tether.client.get(f"/api/tasks/{task_id}")).json()
    assert task["status"] == "running"
    assert task["phase"] == "web_search"
    stopped = (await tether.client.post(f"/api/tasks/{task_id}/stop")).json()
    assert stopped["status"] == "cancelled"


async def test_sync_request_returns_chat_completion(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(TextReply(["The ", "answer."]))
    response = await tether.chat(chat_body())
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"] == {
        "role": "assistant",
        "content": "The answer.",
        "refusal": None,
    }
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] > 0
    assert response.headers["X-Task-Id"] == body["task_id"]
    task = (await tether.client.get(f"/api/tasks/{body['task_id']}")).json()
    assert task["mode"] == "sync" and task["status"] == "completed"


async def test_stream_request_sends_openai_chunks_and_done(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(TextReply(["One ", "two ", "three."]))
    chunks = []
    comments = []
    async with tether.client.stream(
        "POST",
        "/api/chat/completions",
        json=chat_body(stream=True, stream_options={"include_usage": True}),
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["X-Task-Id"].startswith("task_")
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                chunks.append(line[6:])
            elif line.startswith(":"):
                comments.append(line)
    assert chunks[-1] == "[DONE]"
    parsed = [json.loads(c) for c in chunks[:-1]]
    assert all(p["object"] == "chat.completion.chunk" for p in parsed)
    text = "".join(p["choices"][0]["delta"].get("content", "") for p in parsed if p["choices"])
    assert text == "One two three."
    assert parsed[0]["choices"][0]["delta"]["role"] == "assistant"
    finishes = [p["choices"][0]["finish_reason"] for p in parsed if p["choices"]]
    assert finishes[-1] == "stop"
    assert parsed[-1]["choices"] == [] and parsed[-1]["usage"]["total_tokens"] > 0


async def test_request_with_session_id_is_a_background_task_with_readable_events(
    start_tether: object, fakes: Fakes
) -> None:
    tether: Tether = await start_tether(ws_reconnect_grace_s=60)  # type: ignore[operator]
    response = await tether.chat(chat_body(session_id="sess_http"))
    assert response.status_code == 202
    events = await tether.events(response.json()["task_id"])
    assert assert_log_well_formed(events)["type"] == "task:completed"


async def test_every_event_sequence_is_gapless_with_one_terminal_last(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(*[TextReply([f"{i} ", "x"]) for i in range(5)])
    task_ids = [await tether.background(chat_body(f"q{i}")) for i in range(5)]
    for task_id in task_ids:
        events = await tether.events(task_id)
        assert_log_well_formed(events)
        # A reader resuming from the middle sees exactly the rest.
        rest = await tether.events(task_id, after=2)
        assert rest == events[2:]


async def test_local_model_answers_web_search_from_local_docs(start_tether: object) -> None:
    tether: Tether = await start_tether(  # type: ignore[operator]
        llm_base_url=None,
        default_model="local",
        search_provider="local",
        search_query_generation=True,
    )
    response = await tether.chat(
        {
            "model": "local",
            "features": {"web_search": True},
            "messages": [{"role": "user", "content": "What is structured concurrency?"}],
        }
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["sources"], body
    assert all(s["url"].startswith("/api/local-docs/") for s in body["sources"])
    assert "[1]" in body["choices"][0]["message"]["content"]


async def test_stream_sends_keepalive_comments_while_search_runs(
    start_tether: object, fakes: Fakes
) -> None:
    tether: Tether = await start_tether(sse_keepalive_s=0.05)  # type: ignore[operator]
    fakes.search.configure(delay=30)
    comments = 0
    with trio.fail_after(WAIT):
        async with tether.client.stream(
            "POST",
            "/api/chat/completions",
            json=chat_body(stream=True, features={"web_search": True}),
        ) as response:
            async for line in response.aiter_lines():
                if line == ": keepalive":
                    comments += 1
                    if comments == 3:
                        break
    assert comments == 3


async def test_a_status_with_a_carriage_return_cannot_inject_into_the_stream(
    tether: Tether, fakes: Fakes
) -> None:
    """A search result's URL with CR/LF in it reaches the stream through the status of its
    failed fetch; it stays inside one comment line."""
    hostile = fakes.pages.base_url + '/missing\rdata: {"injected": true}\r'
    fakes.search.configure(results=[{"url": hostile, "title": "t", "content": "c"}])
    fakes.model.push(TextReply(["fine"]))
    async with tether.client.stream(
        "POST",
        "/api/chat/completions",
        json=chat_body(stream=True, features={"web_search": True}),
    ) as response:
        events = [e async for e in httpx2.EventSource(response)]
    data = [e.data for e in events]
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert all("injected" not in chunk for chunk in chunks)
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c.get("choices"))
        == "fine"
    )
