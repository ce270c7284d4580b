"""An answer's usage: the model's report, or Tether's count when it was stopped or failed
before the model's report came (prompt: ceil(characters / 4) of the messages as sent;
completion: the chunks streamed), summed over tool rounds."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
import trio
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from fakes.model import DieMidwayReply, ErrorReply, TextReply, ToolCallReply
from server.tasks.backend import next_events
from tests.conftest import WAIT, Fakes, Tether
from tests.helpers import assert_log_well_formed, chat_body

pytestmark = pytest.mark.both_backends

WORDS = [f"w{i} " for i in range(1000)]


def _prompt_estimate(messages: list[dict[str, Any]]) -> int:
    """The documented rule, written out: text content plus tool calls' names and
    arguments, four characters a token, rounded up."""
    chars = 0
    for message in messages:
        content = message.get("content")
        chars += len(content) if isinstance(content, str) else 0
        for call in message.get("tool_calls") or []:
            chars += len(call["function"]["name"]) + len(call["function"]["arguments"])
    return math.ceil(chars / 4)


async def _wait_for_content(tether: Tether, task_id: str) -> None:
    manager = tether.runtime.manager
    with trio.fail_after(WAIT):
        while True:
            record = await manager.store.get(task_id)
            assert record is not None and record.active
            if record.content:
                return
            await next_events(manager.store, task_id, record.last_seq)


async def test_stopped_stream_sends_the_counted_usage_in_its_usage_chunk(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply(WORDS, interval=0.02))
    chunks: list[dict[str, Any]] = []
    async with tether.client.stream(
        "POST",
        "/v1/chat/completions",
        json=chat_body(stream=True, stream_options={"include_usage": True}),
    ) as response:
        task_id = response.headers["X-Task-Id"]
        stopped = False
        with trio.fail_after(WAIT):
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunks.append(json.loads(line[6:]))
                if (
                    not stopped
                    and chunks[-1]["choices"]
                    and chunks[-1]["choices"][0]["delta"].get("content")
                ):
                    stopped = True
                    await tether.client.post(f"/api/tasks/{task_id}/stop")
    request = fakes.model.requests_for("/v1/chat/completions")[-1]
    with trio.fail_after(WAIT):
        await fakes.model.wait_connection_closed(request.conn_id)
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert chunks[-2]["task"]["status"] == "cancelled"
    usage = chunks[-1]["usage"]
    assert chunks[-1]["choices"] == []
    assert usage == {
        "prompt_tokens": 2,
        "completion_tokens": len(content.split()),
        "total_tokens": 2 + len(content.split()),
        "estimated": True,
    }
    assert 0 < len(content.split()) < len(WORDS)


async def test_failed_answer_keeps_the_usage_of_what_the_model_sent(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(DieMidwayReply(["one ", "two ", "three "]))
    task_id = await tether.background(chat_body())
    terminal = assert_log_well_formed(await tether.events(task_id))
    assert terminal["type"] == "task:failed"
    assert terminal["data"]["content"] == "one two three "
    expected = {"prompt_tokens": 2, "completion_tokens": 3, "total_tokens": 5, "estimated": True}
    assert terminal["data"]["usage"] == expected
    task = (await tether.client.get(f"/api/tasks/{task_id}")).json()
    assert task["usage"] == expected


async def test_a_model_that_refused_the_request_counts_no_usage(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(ErrorReply(status=500))
    task_id = await tether.background(chat_body())
    terminal = assert_log_well_formed(await tether.events(task_id))
    assert terminal["type"] == "task:failed"
    assert terminal["data"]["usage"] is None


async def test_usage_of_a_tool_round_and_a_stopped_round_adds_up(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(
        ToolCallReply([("calculator", {"expression": "2 + 2"})]), TextReply(WORDS, interval=0.02)
    )
    task_id = await tether.background(chat_body("add", tool_ids=["calculator"]))
    with trio.fail_after(WAIT):
        await fakes.model.wait_for_request("/v1/chat/completions", count=2)
    await _wait_for_content(tether, task_id)
    stopped = (await tether.client.post(f"/api/tasks/{task_id}/stop")).json()
    assert stopped["status"] == "cancelled"
    first, second = fakes.model.requests_for("/v1/chat/completions")
    with trio.fail_after(WAIT):
        await fakes.model.wait_connection_closed(second.conn_id)
    # The fake reports the tool round: its prompt's words, len(arguments) // 4 + 1.
    reported_prompt = len("add".split())
    reported_completion = len(json.dumps({"expression": "2 + 2"})) // 4 + 1
    counted_prompt = _prompt_estimate(second.json_body["messages"])
    counted_completion = len(stopped["content"].split())
    assert counted_completion > 0
    assert stopped["usage"] == {
        "prompt_tokens": reported_prompt + counted_prompt,
        "completion_tokens": reported_completion + counted_completion,
        "total_tokens": (
            reported_prompt + counted_prompt + reported_completion + counted_completion
        ),
        "estimated": True,
    }
    assert first.json_body["stream_options"] == {"include_usage": True}


async def test_a_whole_answer_has_the_models_own_usage(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(TextReply(["One ", "two."]))
    body = (await tether.client.post("/v1/chat/completions", json=chat_body())).json()
    # The fake's report: the prompt's words and the chunks.
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}


async def test_answer_stopped_before_the_model_was_called_has_zero_usage(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.search.configure(delay=30)
    answer: dict[str, Any] = {}

    async def ask() -> None:
        response = await tether.client.post(
            "/v1/chat/completions", json=chat_body(features={"web_search": True})
        )
        answer.update(response.json())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        with trio.fail_after(WAIT):
            await fakes.search.wait_for_request("/search")
            running = (await tether.client.get("/api/tasks")).json()["tasks"]
            await tether.client.post(f"/api/tasks/{running[0]['id']}/stop")
    completion = ChatCompletion.model_validate(answer)
    assert completion.usage is not None and completion.usage.total_tokens == 0
    assert answer["usage"]["estimated"] is True
    task = (await tether.client.get(f"/api/tasks/{answer['task_id']}")).json()
    assert task["usage"] is None and task["phase"] == "web_search"
    assert not fakes.model.chat_requests
