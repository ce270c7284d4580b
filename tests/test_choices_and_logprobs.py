"""``n`` > 1 and ``logprobs`` on chat completions: an OpenAI-compatible upstream gets them as
they are, every choice and its token logprobs come back (sync and streamed, checked by the
OpenAI SDK's own client and types), the task keeps every choice (on both backends, in Redis
itself too), and the built-in model, which has neither, refuses them before any task."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from fakes.model import TextReply, token_logprob
from server.record import TaskRecord
from server.tasks.redis.store import RedisStore
from tests.conftest import WAIT, Fakes, Tether
from tests.helpers import chat_body

pytestmark = pytest.mark.both_backends

ASK = [{"role": "user", "content": "hello"}]


def sdk(tether: Tether) -> AsyncOpenAI:
    return AsyncOpenAI(base_url=tether.base_url + "/v1", api_key="unused", max_retries=0)


def expected_logprobs(chunks: list[str], top: int) -> list[dict[str, Any]]:
    return [token_logprob(piece, k, top) for k, piece in enumerate(chunks)]


async def stored_in_redis(tether: Tether, task_id: str) -> TaskRecord | None:
    """The record as Redis itself holds it (not this process's local copy); None on the
    memory backend."""
    store = tether.runtime.manager.store
    if not isinstance(store, RedisStore):
        return None
    return (await store.load([task_id]))[0]


async def test_sync_n2_with_logprobs_answers_every_choice_with_its_logprobs(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply(["Hello ", "there."]))
    client = sdk(tether)
    try:
        with trio.fail_after(WAIT):
            raw = await client.chat.completions.with_raw_response.create(
                model="fake-model", messages=ASK, n=2, logprobs=True, top_logprobs=2
            )
    finally:
        await client.close()
    completion = raw.parse()
    ChatCompletion.model_validate(json.loads(raw.content))  # OpenAI's types, validated
    assert [c.index for c in completion.choices] == [0, 1]
    assert [c.message.content for c in completion.choices] == ["Hello there.", "1:Hello there."]
    assert [c.finish_reason for c in completion.choices] == ["stop", "stop"]
    for choice, chunks in zip(
        completion.choices, (["Hello ", "there."], ["1:Hello ", "there."]), strict=True
    ):
        assert choice.logprobs is not None and choice.logprobs.content is not None
        assert [t.model_dump() for t in choice.logprobs.content] == expected_logprobs(chunks, 2)
    sent = fakes.model.chat_requests[-1]
    assert (sent["n"], sent["logprobs"], sent["top_logprobs"]) == (2, True, 2)
    task = (await tether.client.get(f"/api/tasks/{raw.headers['x-task-id']}")).json()
    assert task["content"] == "Hello there."
    assert task["logprobs"] == expected_logprobs(["Hello ", "there."], 2)
    assert task["other_choices"] == [
        {
            "index": 1,
            "content": "1:Hello there.",
            "finish_reason": "stop",
            "logprobs": expected_logprobs(["1:Hello ", "there."], 2),
        }
    ]
    stored = await stored_in_redis(tether, task["id"])
    if stored is not None:
        assert stored.to_dict() == task


async def test_stream_n2_with_logprobs_carries_each_choice_its_deltas_and_finish(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply(["One ", "two ", "three."], other_chunks=[["Uno ", "dos."]]))
    client = sdk(tether)
    chunks: list[ChatCompletionChunk] = []
    try:
        with trio.fail_after(WAIT):
            stream = await client.chat.completions.create(
                model="fake-model", messages=ASK, n=2, logprobs=True, stream=True
            )
            chunks = [chunk async for chunk in stream]
    finally:
        await client.close()
    text: dict[int, str] = {}
    tokens: dict[int, list[dict[str, Any]]] = {}
    finishes: dict[int, str] = {}
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk.model_dump())
        for choice in chunk.choices:
            text[choice.index] = text.get(choice.index, "") + (choice.delta.content or "")
            if choice.logprobs is not None and choice.logprobs.content is not None:
                tokens.setdefault(choice.index, []).extend(
                    t.model_dump() for t in choice.logprobs.content
                )
            if choice.finish_reason is not None:
                finishes[choice.index] = choice.finish_reason
    assert text == {0: "One two three.", 1: "Uno dos."}
    assert tokens == {
        0: expected_logprobs(["One ", "two ", "three."], 0),
        1: expected_logprobs(["Uno ", "dos."], 0),
    }
    assert finishes == {0: "stop", 1: "stop"}
    sent = fakes.model.chat_requests[-1]
    assert (sent["n"], sent["logprobs"]) == (2, True) and "top_logprobs" not in sent


async def test_one_choice_without_logprobs_answers_logprobs_null(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply(["plain"]))
    body = (await tether.client.post("/v1/chat/completions", json=chat_body())).json()
    assert [(c["index"], c["logprobs"]) for c in body["choices"]] == [(0, None)]
    task = (await tether.client.get(f"/api/tasks/{body['task_id']}")).json()
    assert (task["logprobs"], task["other_choices"]) == (None, [])


async def test_stop_of_an_n2_stream_keeps_both_choices_partial_text(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(
        TextReply(
            [f"a{i} " for i in range(1000)],
            other_chunks=[[f"b{i} " for i in range(1000)]],
            interval=0.01,
        )
    )
    streamed: dict[int, str] = {}
    chunks: list[dict[str, Any]] = []
    stopped: dict[str, Any] = {}
    async with tether.client.stream(
        "POST", "/v1/chat/completions", json=chat_body(stream=True, n=2)
    ) as response:
        task_id = response.headers["x-task-id"]
        with trio.fail_after(WAIT):
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                chunks.append(chunk)
                for choice in chunk["choices"]:
                    index = choice["index"]
                    streamed[index] = streamed.get(index, "") + (
                        choice["delta"].get("content") or ""
                    )
                if not stopped and len(streamed.get(1, "")) > 6:
                    # Both choices have text: stop the task while it streams.
                    stopped = (await tether.client.post(f"/api/tasks/{task_id}/stop")).json()
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert stopped["status"] == "cancelled" and stopped["cancel_reason"] == "stop"
    assert stopped["content"] and stopped["content"] == streamed[0]
    assert stopped["content"].startswith("a0 a1 ")
    [other] = stopped["other_choices"]
    assert other["index"] == 1 and other["content"] == streamed[1]
    assert other["content"].startswith("b0 b1 ")
    final = chunks[-1]
    assert [(c["index"], c["finish_reason"]) for c in final["choices"]] == [
        (0, "stop"),
        (1, "stop"),
    ]
    assert final["task"]["status"] == "cancelled"
    stored = await stored_in_redis(tether, task_id)
    if stored is not None:
        assert (stored.content, stored.other_choices) == (stopped["content"], [other])


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"logprobs": True}, "logprobs"),
        ({"logprobs": True, "top_logprobs": 3}, "top_logprobs"),
    ],
)
async def test_local_model_refuses_choices_and_logprobs_before_any_task(
    tether: Tether, extra: dict[str, Any], param: str
) -> None:
    for path in ("/v1/chat/completions", "/api/chat/completions"):
        response = await tether.client.post(path, json={**chat_body(model="local"), **extra})
        assert response.status_code == 400
        error = response.json()["error"]
        assert (error["code"], error["param"]) == ("invalid_request", param)
        assert "x-task-id" not in response.headers
    listed = (await tether.client.get("/api/tasks?include_finished=true")).json()["tasks"]
    assert listed == []


async def test_local_model_serves_n1_and_logprobs_false(tether: Tether) -> None:
    body = {**chat_body(model="local"), "n": 1, "logprobs": False}
    response = await tether.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert [c["logprobs"] for c in response.json()["choices"]] == [None]
