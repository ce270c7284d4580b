"""Web search and tools, end to end through the server and the fakes."""

from __future__ import annotations

import json
from typing import Any

import trio
from openai import AsyncOpenAI

from fakes.model import TextReply, ToolCallReply
from tests.conftest import WAIT, Fakes, Tether
from tests.helpers import assert_log_well_formed, chat_body


async def test_web_search_injects_numbered_sources_and_emits_events(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply(["See ", "[1]."]))
    task_id = await tether.background(chat_body("what is trio", features={"web_search": True}))
    events = await tether.events(task_id)
    terminal = assert_log_well_formed(events)
    assert terminal["type"] == "task:completed"
    sources = [e["data"] for e in events if e["type"] == "source"]
    assert [s["index"] for s in sources] == [1, 2, 3]
    assert all(s["url"].startswith(fakes.pages.base_url) for s in sources)
    statuses = [e["data"] for e in events if e["type"] == "status"]
    assert {s["action"] for s in statuses} >= {"queries", "search", "fetch"}
    assert all(s["phase"] == "web_search" for s in statuses)
    # The model saw the page text, numbered, before the user's question.
    sent = fakes.model.chat_requests[-1]["messages"]
    context = sent[-2]["content"]
    assert sent[-2]["role"] == "system" and "[1]" in context and "[3]" in context
    assert "what is trio" in context  # the fake pages mention the query
    assert sent[-1] == {"role": "user", "content": "what is trio"}
    assert terminal["data"]["sources"] == sources


async def test_failed_search_goes_on_to_generation_with_error_status(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.search.configure(mode="500")
    task_id = await tether.background(chat_body(features={"web_search": True}))
    events = await tether.events(task_id)
    terminal = assert_log_well_formed(events)
    assert terminal["type"] == "task:completed"
    errors = [e["data"] for e in events if e["type"] == "status" and e["data"].get("error")]
    assert errors and errors[0]["phase"] == "web_search"
    assert terminal["data"]["content"] == "Hello from the fake model."
    metrics = (await tether.client.get("/metrics")).text
    assert 'tether_upstream_errors_total{kind="search"} 1.0' in metrics


async def test_failing_page_is_skipped_with_error_status(tether: Tether, fakes: Fakes) -> None:
    fakes.search.configure(
        results=[
            {"url": fakes.pages.base_url + "/binary", "title": "Bin", "content": "binary"},
            {"url": fakes.pages.base_url + "/page/good", "title": "Good", "content": "good"},
        ]
    )
    task_id = await tether.background(chat_body(features={"web_search": True}))
    events = await tether.events(task_id)
    assert assert_log_well_formed(events)["type"] == "task:completed"
    page_errors = [e["data"] for e in events if e["type"] == "status" and e["data"].get("error")]
    assert [p["url"] for p in page_errors] == [fakes.pages.base_url + "/binary"]


async def test_server_tools_run_and_results_go_back_to_the_model(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(
        ToolCallReply([("calculator", {"expression": "6*7"}), ("current_time", {})]),
        TextReply(["It is ", "42."]),
    )
    response = await tether.chat(
        chat_body("six times seven?", tool_ids=["calculator", "current_time"])
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["choices"][0]["message"]["content"] == "It is 42."
    first, second = fakes.model.chat_requests[-2:]
    offered = {t["function"]["name"] for t in first["tools"]}
    assert offered == {"calculator", "current_time"}
    tool_messages = [m for m in second["messages"] if m["role"] == "tool"]
    assert tool_messages[0]["content"] == "42"
    events = await tether.events(body["task_id"])
    calls = [e["data"] for e in events if e["type"] == "status" and e["data"]["done"]]
    assert {c["tool"] for c in calls} == {"calculator", "current_time"}


async def test_tool_error_goes_back_to_the_model_not_a_crash(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(
        ToolCallReply([("calculator", {"expression": "__import__('os')"})]), TextReply(["Sorry."])
    )
    body = (await tether.chat(chat_body("eval", tool_ids=["calculator"]))).json()
    assert body["choices"][0]["message"]["content"] == "Sorry."
    tool_message = [m for m in fakes.model.chat_requests[-1]["messages"] if m["role"] == "tool"][0]
    assert tool_message["content"].startswith("Error")


async def test_tool_rounds_are_capped(start_tether: Any, fakes: Fakes) -> None:
    tether: Tether = await start_tether(max_tool_rounds=2)
    fakes.model.configure(
        default_reply={"kind": "tool_calls", "calls": [["calculator", '{"expression": "1+1"}']]}
    )
    response = await tether.chat(chat_body(tool_ids=["calculator"]))
    assert response.status_code == 200
    requests = fakes.model.chat_requests
    assert len(requests) == 3  # two tool rounds, then the model must answer
    assert requests[-1]["tool_choice"] == "none"


async def test_client_side_tool_calls_come_back_to_the_client(tether: Tether, fakes: Fakes) -> None:
    weather = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    fakes.model.push(ToolCallReply([("get_weather", {"city": "Paris"})]))
    body = (await tether.chat(chat_body("weather?", tools=[weather]))).json()
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather"
    assert json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert fakes.model.chat_requests[-1]["tools"] == [weather]


async def test_openai_sdk_gets_parsed_answers_from_local_model(start_tether: Any) -> None:
    tether: Tether = await start_tether(llm_base_url=None, default_model="local")
    client = AsyncOpenAI(base_url=tether.base_url + "/v1", api_key="unused", max_retries=0)
    try:
        with trio.fail_after(WAIT):
            completion = await client.chat.completions.create(
                model="local", messages=[{"role": "user", "content": "Say hi"}]
            )
        text = completion.choices[0].message.content
        assert text and "You asked: Say hi" in text
        assert completion.usage is not None and completion.usage.total_tokens > 0
        with trio.fail_after(WAIT):
            stream = await client.chat.completions.create(
                model="local", messages=[{"role": "user", "content": "Say hi"}], stream=True
            )
            pieces = [
                chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices
            ]
        assert "".join(pieces) == text
    finally:
        await client.close()


async def test_local_model_calls_the_calculator(start_tether: Any) -> None:
    tether: Tether = await start_tether(llm_base_url=None, default_model="local")
    response = await tether.chat(
        {
            "model": "local",
            "tool_ids": ["calculator"],
            "messages": [{"role": "user", "content": "What is 12 * 11?"}],
        }
    )
    body = response.json()
    assert "132" in body["choices"][0]["message"]["content"]


async def test_private_addresses_are_refused_unless_allowed(
    start_tether: Any, fakes: Fakes
) -> None:
    tether: Tether = await start_tether(fetch_allow_private=False)
    fakes.model.push(
        ToolCallReply([("fetch_url", {"url": fakes.pages.base_url + "/page/x"})]), TextReply(["ok"])
    )
    await tether.chat(chat_body("read", tool_ids=["fetch_url"]))
    tool_message = [m for m in fakes.model.chat_requests[-1]["messages"] if m["role"] == "tool"][0]
    assert "non-public address" in tool_message["content"]
    assert not fakes.pages.connections  # refused before connecting, not after


async def test_redirects_are_followed_for_pages(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(
        ToolCallReply([("fetch_url", {"url": fakes.pages.base_url + "/redirect/moved"})]),
        TextReply(["ok"]),
    )
    await tether.chat(chat_body("read", tool_ids=["fetch_url"]))
    tool_message = [m for m in fakes.model.chat_requests[-1]["messages"] if m["role"] == "tool"][0]
    assert "moved" in tool_message["content"]
