"""Steering a running task: skip one step and keep the rest, deadlines per phase that end in
an answer, and a stop that says where it landed. Each skip is checked at the fake upstream:
the skipped step's connection closed, the others open. On both task backends."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import trio

from fakes.model import TextReply, ToolCallReply
from server.tasks.backend import next_events
from tests.conftest import WAIT, Fakes, Tether
from tests.helpers import assert_log_well_formed, chat_body

pytestmark = pytest.mark.both_backends


async def _skip(tether: Tether, task_id: str, step: str, key: str | None = None) -> Any:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return await tether.client.post(
        f"/api/tasks/{task_id}/skip", json={"step": step}, headers=headers
    )


def _statuses(events: list[dict[str, Any]], **match: Any) -> list[dict[str, Any]]:
    return [
        e["data"]
        for e in events
        if e["type"] == "status" and all(e["data"].get(k) == v for k, v in match.items())
    ]


async def test_skipping_the_search_answers_from_what_it_found_and_closes_its_connection(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.search.configure(delay=30)
    fakes.model.push(TextReply(["Answered without sources."]))
    task_id = await tether.background(chat_body(features={"web_search": True}))
    with trio.fail_after(WAIT):
        request = await fakes.search.wait_for_request("/search")
    answer = await _skip(tether, task_id, "web_search")
    assert answer.status_code == 200
    assert answer.json() == {"task_id": task_id, "step": "web_search", "state": "skipped"}
    with trio.fail_after(WAIT):
        await fakes.search.wait_connection_closed(request.conn_id)
    events = await tether.events(task_id)
    terminal = assert_log_well_formed(events)
    assert terminal["type"] == "task:completed"
    assert terminal["data"]["content"] == "Answered without sources."
    (skipped,) = _statuses(events, step="web_search", skipped=True)
    assert skipped["by"] == "local" and skipped["done"] is True
    assert terminal["data"]["sources"] == []
    # Skipping it again: it has ended, nothing changes.
    again = await _skip(tether, task_id, "web_search")
    assert again.status_code == 409
    assert again.json()["step"] == {"task_id": task_id, "step": "web_search", "state": "skipped"}


async def test_a_skip_answers_once_its_step_has_ended(tether: Tether, fakes: Fakes) -> None:
    """The skip's answer is written after the step has unwound, its connection closed,
    not before the step's tasks have run. The answer is read off a raw socket, and from its
    first bytes to the manager's word on the step there is no checkpoint: the step's state
    is the one the answer came in."""
    fakes.search.configure(delay=30)
    fakes.model.push(TextReply(["Answered without sources."]))
    task_id = await tether.background(chat_body(features={"web_search": True}))
    with trio.fail_after(WAIT):
        request = await fakes.search.wait_for_request("/search")
    body = b'{"step": "web_search"}'
    head = (
        f"POST /api/tasks/{task_id}/skip HTTP/1.1\r\nHost: x\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    host, port = tether.base_url.removeprefix("http://").split(":")
    async with await trio.open_tcp_stream(host, int(port)) as stream:
        await stream.send_all(head.encode() + body)
        with trio.fail_after(WAIT):
            answer = await stream.receive_some(65536)
            step = await tether.runtime.manager.skip_step(task_id, "web_search", "local")
            while not answer.endswith(b"}\n"):
                answer += await stream.receive_some(65536)
    assert step == ("skipped", False)  # it had ended
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert json.loads(answer.partition(b"\r\n\r\n")[2])["state"] == "skipped"
    with trio.fail_after(WAIT):
        await fakes.search.wait_connection_closed(request.conn_id)
    assert assert_log_well_formed(await tether.events(task_id))["type"] == "task:completed"


async def test_skipping_one_page_leaves_it_out_and_the_other_pages_open(
    tether: Tether, fakes: Fakes
) -> None:
    base = fakes.pages.base_url
    fakes.search.configure(
        results=[
            {"url": base + "/page/quick", "title": "Quick", "content": "quick page"},
            {"url": base + "/slow/30", "title": "Slow", "content": "slow page"},
            {"url": base + "/slow/31", "title": "Slower", "content": "slower page"},
        ]
    )
    fakes.model.push(TextReply(["Done."]))
    task_id = await tether.background(chat_body(features={"web_search": True}))
    with trio.fail_after(WAIT):
        slow = await fakes.pages.wait_for_request("/slow/30")
        slower = await fakes.pages.wait_for_request("/slow/31")
    assert (await _skip(tether, task_id, f"page:{base}/slow/30")).status_code == 200
    with trio.fail_after(WAIT):
        await fakes.pages.wait_connection_closed(slow.conn_id)
    assert fakes.pages.connection(slower.conn_id).is_open  # only that page's connection
    assert (await _skip(tether, task_id, f"page:{base}/slow/31")).status_code == 200
    events = await tether.events(task_id)
    terminal = assert_log_well_formed(events)
    assert terminal["type"] == "task:completed"
    assert [s["url"] for s in terminal["data"]["sources"]] == [base + "/page/quick"]
    assert len(_statuses(events, action="fetch", skipped=True)) == 2


async def test_skipping_one_of_two_tool_calls_gives_the_model_a_result_that_says_so(
    tether: Tether, fakes: Fakes
) -> None:
    base = fakes.pages.base_url
    fakes.model.push(
        ToolCallReply(
            [("fetch_url", {"url": base + "/slow/30"}), ("fetch_url", {"url": base + "/slow/31"})]
        ),
        TextReply(["Went on."]),
    )
    task_id = await tether.background(chat_body("read both", tool_ids=["fetch_url"]))
    with trio.fail_after(WAIT):
        first = await fakes.pages.wait_for_request("/slow/30")
        second = await fakes.pages.wait_for_request("/slow/31")

    def calls_in(events: list[dict[str, Any]]) -> dict[str, str]:
        statuses = _statuses(events, action="tool_call", done=False)
        return {s["arguments"]: s["tool_call_id"] for s in statuses if "arguments" in s}

    with trio.fail_after(WAIT):
        calls = calls_in(await _events_until(tether, task_id, lambda e: len(calls_in(e)) == 2))
    first_call = next(call for args, call in calls.items() if "/slow/30" in args)
    second_call = next(call for args, call in calls.items() if "/slow/31" in args)
    assert (await _skip(tether, task_id, first_call)).status_code == 200
    with trio.fail_after(WAIT):
        await fakes.pages.wait_connection_closed(first.conn_id)
    assert fakes.pages.connection(second.conn_id).is_open
    assert (await _skip(tether, task_id, second_call)).status_code == 200
    terminal = assert_log_well_formed(await tether.events(task_id))
    assert terminal["data"]["content"] == "Went on."
    results = {
        m["tool_call_id"]: m["content"]
        for m in fakes.model.chat_requests[-1]["messages"]
        if m["role"] == "tool"
    }
    assert results[first_call] == "The user skipped this call of fetch_url: no result."


async def _events_until(
    tether: Tether, task_id: str, enough: Callable[[list[dict[str, Any]]], bool]
) -> list[dict[str, Any]]:
    """The task's events read as they come until ``enough`` holds of them (the task
    still runs; on Redis, an event is readable once Redis has taken it)."""
    store = tether.runtime.manager.store
    events: list[dict[str, Any]] = []
    while not enough(events):
        more = await next_events(store, task_id, events[-1]["seq"] if events else 0)
        assert more is not None, "the log ended first"
        events += [e.to_dict() for e in more]
    return events


async def test_a_step_that_never_ran_is_404_and_another_users_task_is_404(
    start_tether: Any, fakes: Fakes
) -> None:
    tether: Tether = await start_tether(api_keys="key-a=alice,key-b=bob")
    fakes.search.configure(delay=30)
    task_id = await tether.background(chat_body(features={"web_search": True}), key="key-a")
    with trio.fail_after(WAIT):
        await fakes.search.wait_for_request("/search")
    unknown = await _skip(tether, task_id, "call_nope", key="key-a")
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "step"
    other = await _skip(tether, task_id, "web_search", key="key-b")
    assert other.status_code == 404 and other.json()["error"]["param"] == "task_id"
    assert (await _skip(tether, task_id, "web_search", key="key-a")).status_code == 200


async def test_a_search_deadline_answers_with_the_sources_found_so_far(
    tether: Tether, fakes: Fakes
) -> None:
    base = fakes.pages.base_url
    fakes.search.configure(
        results=[{"url": base + "/slow/30", "title": "Slow", "content": "a snippet"}]
    )
    fakes.model.push(TextReply(["From the snippet."]))
    task_id = await tether.background(
        chat_body(features={"web_search": True}, deadlines={"web_search_s": 0.5})
    )
    with trio.fail_after(WAIT):
        page = await fakes.pages.wait_for_request("/slow/30")
        await fakes.pages.wait_connection_closed(page.conn_id)
    events = await tether.events(task_id)
    terminal = assert_log_well_formed(events)
    assert terminal["type"] == "task:completed"
    assert [s["snippet"] for s in terminal["data"]["sources"]] == ["a snippet"]
    (cut,) = _statuses(events, step="web_search", deadline=True)
    assert "skipped" not in cut
    sent = fakes.model.chat_requests[-1]["messages"]
    assert any("a snippet" in str(m.get("content")) for m in sent)


async def test_a_tool_deadline_gives_the_model_a_result(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(
        ToolCallReply([("fetch_url", {"url": fakes.pages.base_url + "/slow/30"})]),
        TextReply(["Without it."]),
    )
    task_id = await tether.background(
        chat_body("read", tool_ids=["fetch_url"], deadlines={"tools_s": 0.3})
    )
    events = await tether.events(task_id)
    assert assert_log_well_formed(events)["data"]["content"] == "Without it."
    (cut,) = _statuses(events, action="tool_call", deadline=True)
    assert "error" not in cut
    (result,) = [m for m in fakes.model.chat_requests[-1]["messages"] if m["role"] == "tool"]
    assert result["content"] == "Error: fetch_url timed out after 0.3 s"


async def test_a_task_deadline_ends_it_completed_with_its_text_and_length_on_v1(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply([f"w{i} " for i in range(1000)], interval=0.02))
    with trio.fail_after(WAIT):
        response = await tether.client.post(
            "/v1/chat/completions", json=chat_body(deadlines={"task_s": 0.5})
        )
        request = await fakes.model.wait_for_request("/v1/chat/completions")
        await fakes.model.wait_connection_closed(request.conn_id)
    body = response.json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["message"]["content"].startswith("w0 w1 ")
    task = (await tether.client.get(f"/api/tasks/{body['task_id']}")).json()
    assert (task["status"], task["deadline"], task["cancel_reason"]) == ("completed", "task", None)
    assert task["content"] == choice["message"]["content"]


@pytest.mark.parametrize("value", [0, -1, "soon", True])
async def test_a_deadline_that_is_not_a_positive_number_is_a_400_naming_it(
    tether: Tether, fakes: Fakes, value: Any
) -> None:
    response = await tether.chat(chat_body(deadlines={"web_search_s": value}))
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "deadlines.web_search_s"
    assert not fakes.model.chat_requests


async def test_a_stop_says_where_it_landed_and_how_long_it_took(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(
        ToolCallReply([("fetch_url", {"url": fakes.pages.base_url + "/hang"})]),
    )
    task_id = await tether.background(chat_body("read", tool_ids=["fetch_url"]))
    with trio.fail_after(WAIT):
        request = await fakes.pages.wait_for_request("/hang")
    stopped = (await tether.client.post(f"/api/tasks/{task_id}/stop")).json()
    with trio.fail_after(WAIT):
        await fakes.pages.wait_connection_closed(request.conn_id)
    assert stopped["phase"] == "tools"
    assert stopped["cancel_step"]["kind"] == "tool"
    assert stopped["cancel_step"]["step"] == "call_fake_0"
    assert 0 <= stopped["stop_ms"] < WAIT * 1000
    terminal = assert_log_well_formed(await tether.events(task_id))
    assert terminal["data"]["stop_ms"] == stopped["stop_ms"]
    metrics = (await tether.client.get("/metrics")).text
    assert "tether_stop_seconds_count" in metrics


async def test_a_queued_task_can_be_cancelled_before_it_starts(
    tether: Tether, fakes: Fakes
) -> None:
    manager = tether.runtime.manager
    record = await manager.spawn("local", _request(tether))
    assert manager.cancel(record.id, "stop")  # no checkpoint between: it has not started
    ended = await manager.wait_ended(record.id)
    assert ended is not None
    assert (ended.status, ended.phase, ended.cancel_reason) == ("cancelled", "queued", "stop")
    assert not fakes.model.chat_requests
    terminal = assert_log_well_formed(await tether.events(record.id))
    assert terminal["type"] == "task:cancelled"


def _request(tether: Tether) -> Any:
    from server.schemas import parse_chat_request

    return parse_chat_request(
        {**chat_body(), "background": True}, default_model=tether.runtime.settings.default_model
    )
