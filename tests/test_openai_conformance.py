"""/v1 answers validate against the OpenAI SDK's own types (pydantic ``model_validate``,
which rejects a ``finish_reason`` outside OpenAI's set), including a stopped answer."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio
from openai.types import Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from fakes.model import TextReply
from tests.conftest import WAIT, Fakes, Tether
from tests.helpers import chat_body


async def test_v1_sync_answer_is_an_openai_chat_completion(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(TextReply(["The ", "answer."]))
    response = await tether.client.post("/v1/chat/completions", json=chat_body())
    body = response.json()
    completion = ChatCompletion.model_validate(body)
    assert completion.choices[0].message.content == "The answer."
    assert "refusal" in body["choices"][0]["message"]
    assert isinstance(body["usage"], dict)
    assert body["task"] == {"id": body["task_id"], "status": "completed", "cancel_reason": None}


async def test_v1_stream_chunks_are_openai_chat_completion_chunks(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply(["One ", "two."]))
    chunks: list[dict[str, Any]] = []
    async with tether.client.stream(
        "POST",
        "/v1/chat/completions",
        json=chat_body(stream=True, stream_options={"include_usage": True}),
    ) as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    for chunk in chunks:
        ChatCompletionChunk.model_validate(chunk)
    assert (
        "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
        == "One two."
    )


async def _stop_while_streaming(tether: Tether, fakes: Fakes, path: str) -> dict[str, Any]:
    """A sync request on ``path`` whose task is stopped over HTTP mid-answer."""
    fakes.model.push(TextReply([f"w{i} " for i in range(1000)], interval=0.02))
    answer: dict[str, Any] = {}

    async def ask() -> None:
        response = await tether.client.post(path, json=chat_body())
        answer.update(response.json())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(ask)
        with trio.fail_after(WAIT):
            request = await fakes.model.wait_for_request("/v1/chat/completions")
            while True:
                running = (await tether.client.get("/api/tasks")).json()["tasks"]
                if running and running[0]["content"]:
                    break
                await trio.sleep(0.01)
            await tether.client.post(f"/api/tasks/{running[0]['id']}/stop")
    with trio.fail_after(WAIT):
        await fakes.model.wait_connection_closed(request.conn_id)
    return answer


async def test_stopped_answer_on_v1_ends_with_stop_and_tells_it_was_stopped(
    tether: Tether, fakes: Fakes
) -> None:
    body = await _stop_while_streaming(tether, fakes, "/v1/chat/completions")
    completion = ChatCompletion.model_validate(body)  # "cancelled" would be rejected here
    assert completion.choices[0].finish_reason == "stop"
    assert completion.choices[0].message.content and completion.choices[
        0
    ].message.content.startswith("w0 ")
    assert body["task"]["status"] == "cancelled" and body["task"]["cancel_reason"] == "stop"


async def test_stopped_answer_on_v1_carries_the_usage_counted_so_far(
    tether: Tether, fakes: Fakes
) -> None:
    body = await _stop_while_streaming(tether, fakes, "/v1/chat/completions")
    completion = ChatCompletion.model_validate(body)
    usage = completion.usage
    assert usage is not None
    content = completion.choices[0].message.content or ""
    # One word per chunk from the fake: Tether counts the chunks the answer holds.
    assert usage.completion_tokens == len(content.split()) > 0
    # The prompt as sent, "hello": ceil(5 / 4) tokens.
    assert usage.prompt_tokens == 2
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert body["usage"]["estimated"] is True
    task = (await tether.client.get(f"/api/tasks/{body['task_id']}")).json()
    assert task["usage"] == body["usage"]


async def test_stopped_answer_on_tethers_own_route_keeps_cancelled(
    tether: Tether, fakes: Fakes
) -> None:
    body = await _stop_while_streaming(tether, fakes, "/api/chat/completions")
    assert body["choices"][0]["finish_reason"] == "cancelled"
    assert body["task"]["cancel_reason"] == "stop"


async def test_v1_model_by_id_is_an_openai_model_and_unknown_is_404(tether: Tether) -> None:
    model = Model.model_validate((await tether.client.get("/v1/models/fake-model")).json())
    assert model.id == "fake-model"
    missing = await tether.client.get("/v1/models/no-such-model")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"temperature": "hot"}, "temperature"),
        ({"temperature": 5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"top_logprobs": 2}, "top_logprobs"),  # without logprobs: true, as OpenAI
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"max_completion_tokens": "x"}, "max_completion_tokens"),
        ({"tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function"}]}, "tools.0.function"),
        ({"response_format": {"type": "xml"}}, "response_format.type"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ],
)
async def test_v1_refuses_what_openai_refuses_naming_the_field(
    tether: Tether, extra: dict[str, Any], param: str
) -> None:
    response = await tether.client.post("/v1/chat/completions", json=chat_body(**extra))
    assert response.status_code == 400
    error = response.json()["error"]
    assert (error["code"], error["param"]) == ("invalid_request", param)


async def test_valid_openai_fields_and_unknown_extras_reach_the_model(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply(["ok"]))
    body = chat_body(
        temperature=1,
        top_p=0.5,
        n=1,
        seed=7,
        stop=["\n\n"],
        response_format={"type": "json_object"},
        vendor_knob={"x": 1},
    )
    response = await tether.client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    sent = fakes.model.requests_for("/v1/chat/completions")[-1].json_body
    assert sent["temperature"] == 1 and sent["seed"] == 7
    assert sent["vendor_knob"] == {"x": 1}
