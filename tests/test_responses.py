"""The Responses API on /v1/responses, driven by the ``openai`` SDK as its users drive it:
background create, retrieve, stream and resume, cancel (checked closed at the fake
upstream), delete, input items and ``previous_response_id``. Every answer and event is
validated by the SDK's own types. On both task backends."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, get_args

import pytest
import trio
from openai import AsyncOpenAI, BadRequestError, NotFoundError
from openai.types.responses import Response, ResponseStreamEvent

from fakes.model import ErrorReply, HangReply, TextReply, ToolCallReply
from server.tasks.backend import next_events
from tests.conftest import WAIT, Fakes, Tether
from tests.helpers import assert_log_well_formed
from tests.test_ws import connect

pytestmark = pytest.mark.both_backends

# The SDK's stream event classes by their ``type``: an event is validated by its own class
# (the union's discriminator is the SDK's, not pydantic's).
EVENT_CLASSES = {
    cls.model_fields["type"].annotation.__args__[0]: cls  # type: ignore[union-attr]
    for cls in get_args(get_args(ResponseStreamEvent)[0])
}


def validate_event(event: dict[str, Any]) -> None:
    EVENT_CLASSES[event["type"]].model_validate(event)


@asynccontextmanager
async def sdk(tether: Tether) -> AsyncIterator[AsyncOpenAI]:
    client = AsyncOpenAI(base_url=tether.base_url + "/v1", api_key="unused", max_retries=0)
    try:
        yield client
    finally:
        await client.close()


async def _events(tether: Tether, path: str) -> list[dict[str, Any]]:
    """The SSE events of a Responses stream, each validated by the SDK's union."""
    out: list[dict[str, Any]] = []
    async with tether.client.stream("GET", path) as response:
        assert response.status_code == 200, await response.aread()
        kind = None
        async for line in response.aiter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                event = json.loads(line[6:])
                assert event["type"] == kind
                validate_event(event)
                out.append(event)
    return out


async def _first_delta(tether: Tether, task_id: str) -> None:
    """Wait until the task's log has a piece of the answer."""
    store = tether.runtime.manager.store
    cursor = 0
    while (events := await next_events(store, task_id, cursor)) is not None:
        if any(e.type == "delta" for e in events):
            return
        cursor = events[-1].seq if events else cursor


async def test_background_response_answers_queued_at_once_and_completes(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply(["Hello ", "there."]))
    async with sdk(tether) as client:
        with trio.fail_after(WAIT):
            created = await client.responses.create(
                model="fake-model", input="Say hello", background=True
            )
        assert created.status == "queued" and created.output == []
        assert created.id.startswith("resp_")
        events = await _events(tether, f"/v1/responses/{created.id}?stream=true")
        with trio.fail_after(WAIT):
            done = await client.responses.retrieve(created.id)
    Response.model_validate(done.model_dump())
    assert done.status == "completed"
    assert done.output_text == "Hello there."
    types = [e["type"] for e in events]
    assert types[:3] == ["response.created", "response.queued", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta") == (
        "Hello there."
    )
    numbers = [e["sequence_number"] for e in events]
    assert numbers == sorted(set(numbers))
    # A response is a task: the task routes read it.
    task = (await tether.client.get(f"/api/tasks/{created.id}")).json()
    assert task["status"] == "completed" and task["content"] == "Hello there."
    # The model got the input as a chat message.
    assert fakes.model.chat_requests[-1]["messages"][-1] == {
        "role": "user",
        "content": "Say hello",
    }


async def test_a_resumed_stream_continues_after_its_sequence_number_without_gap(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply([f"w{i} " for i in range(6)]))
    async with sdk(tether) as client:
        created = await client.responses.create(model="fake-model", input="hi", background=True)
    whole = await _events(tether, f"/v1/responses/{created.id}?stream=true")
    cut = whole[len(whole) // 2]["sequence_number"]
    rest = await _events(tether, f"/v1/responses/{created.id}?stream=true&starting_after={cut}")
    assert [e["sequence_number"] for e in rest] == [
        e["sequence_number"] for e in whole if e["sequence_number"] > cut
    ]
    assert rest == [e for e in whole if e["sequence_number"] > cut]


async def test_cancel_during_generation_closes_the_model_connection_and_keeps_the_text(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply([f"w{i} " for i in range(1000)], interval=0.02))
    async with sdk(tether) as client:
        created = await client.responses.create(model="fake-model", input="hi", background=True)
        with trio.fail_after(WAIT):
            request = await fakes.model.wait_for_request("/v1/chat/completions")
            await _first_delta(tether, created.id)
            cancelled = await client.responses.cancel(created.id)
            await fakes.model.wait_connection_closed(request.conn_id)
            again = await client.responses.cancel(created.id)  # idempotent
    assert cancelled.status == "cancelled" == again.status
    assert cancelled.output_text.startswith("w0 ")
    events = await _events(tether, f"/v1/responses/{created.id}?stream=true")
    assert events[-1]["type"] == "response.incomplete"
    assert events[-1]["response"]["status"] == "cancelled"
    log = [e for e in await tether.events(created.id)]
    assert assert_log_well_formed(log)["type"] == "task:cancelled"


async def test_sync_and_streaming_responses(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(TextReply(["A ", "b."]), TextReply(["C ", "d."]))
    async with sdk(tether) as client:
        with trio.fail_after(WAIT):
            done = await client.responses.create(model="fake-model", input="x")
            stream = await client.responses.create(model="fake-model", input="y", stream=True)
            seen = [event async for event in stream]
    assert done.status == "completed" and done.output_text == "A b."
    assert seen[-1].type == "response.completed"
    assert seen[-1].response.output_text == "C d."


async def test_function_calls_come_back_and_their_outputs_continue_the_response(
    tether: Tether, fakes: Fakes
) -> None:
    weather = {
        "type": "function",
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    }
    fakes.model.push(ToolCallReply([("get_weather", {"city": "Paris"})]), TextReply(["Sunny."]))
    async with sdk(tether) as client:
        with trio.fail_after(WAIT):
            first = await client.responses.create(
                model="fake-model", input="Weather in Paris?", tools=[weather]
            )
        (call,) = [item for item in first.output if item.type == "function_call"]
        assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "Paris"}
        with trio.fail_after(WAIT):
            second = await client.responses.create(
                model="fake-model",
                previous_response_id=first.id,
                input=[{"type": "function_call_output", "call_id": call.call_id, "output": "22C"}],
                tools=[weather],
            )
        assert second.output_text == "Sunny."
        items = await client.responses.input_items.list(second.id)
    messages = fakes.model.chat_requests[-1]["messages"]
    assert messages[0] == {"role": "user", "content": "Weather in Paris?"}
    assert messages[1]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert messages[2] == {"role": "tool", "tool_call_id": call.call_id, "content": "22C"}
    assert [i.type for i in items.data] == ["function_call_output"]


async def test_bad_input_is_a_400_naming_the_field_and_unknown_ids_are_404(
    tether: Tether, fakes: Fakes
) -> None:
    async with sdk(tether) as client:
        with pytest.raises(BadRequestError) as bad:
            await client.responses.create(model="fake-model", input="x", tools=[{"type": "x"}])
        assert bad.value.body["param"] == "tools[0].type"  # type: ignore[index]
        with pytest.raises(BadRequestError) as bad:
            await client.responses.create(model="fake-model", input="x", top_logprobs=2)
        assert bad.value.body["param"] == "top_logprobs"  # type: ignore[index]
        with pytest.raises(NotFoundError) as missing:
            await client.responses.create(
                model="fake-model", input="x", previous_response_id="resp_nope"
            )
        assert missing.value.body["param"] == "previous_response_id"  # type: ignore[index]
        with pytest.raises(NotFoundError):
            await client.responses.retrieve("resp_nope")
    assert fakes.model.chat_requests == []


async def test_delete_forgets_the_response(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(HangReply())
    async with sdk(tether) as client:
        created = await client.responses.create(model="fake-model", input="x", background=True)
        with trio.fail_after(WAIT):
            request = await fakes.model.wait_for_request("/v1/chat/completions")
            await client.responses.delete(created.id)
            await fakes.model.wait_connection_closed(request.conn_id)
        with pytest.raises(NotFoundError):
            await client.responses.retrieve(created.id)


async def test_the_websocket_subscribes_to_and_stops_a_response_like_any_task(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply([f"w{i} " for i in range(1000)], interval=0.02))
    async with sdk(tether) as client:
        created = await client.responses.create(model="fake-model", input="hi", background=True)
    async with connect(tether) as ws:
        await ws.send({"type": "subscribe", "task_id": created.id, "after": 0})

        def has_text(event: dict[str, Any]) -> bool:
            return event["type"] == "delta"

        seen = await ws.events_until_terminal(created.id, stop_when=has_text)
        assert seen[0]["type"] == "task:queued" and seen[-1]["type"] == "delta"
        await ws.send({"type": "stop", "task_id": created.id})
        rest = await ws.events_until_terminal(created.id)
    assert rest[-1]["type"] == "task:cancelled"
    events = await _events(tether, f"/v1/responses/{created.id}?stream=true")
    assert events[-1]["response"]["status"] == "cancelled"


async def test_an_answer_cut_at_max_output_tokens_is_incomplete_and_a_failure_is_failed(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply(["Cut "], finish_reason="length"), ErrorReply())
    async with sdk(tether) as client:
        with trio.fail_after(WAIT):
            cut = await client.responses.create(model="fake-model", input="x", max_output_tokens=1)
            failed = await client.responses.create(model="fake-model", input="y", background=True)
        await _events(tether, f"/v1/responses/{failed.id}?stream=true")
        failed = await client.responses.retrieve(failed.id)
    assert fakes.model.chat_requests[0]["max_tokens"] == 1
    assert cut.status == "incomplete" and cut.output_text == "Cut "
    assert cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert failed.status == "failed" and failed.error is not None
    assert failed.error.code == "server_error"


async def test_only_a_background_response_can_be_cancelled(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(TextReply(["Done."]))
    async with sdk(tether) as client:
        with trio.fail_after(WAIT):
            done = await client.responses.create(model="fake-model", input="x")
        with pytest.raises(BadRequestError):
            await client.responses.cancel(done.id)


async def test_another_users_response_is_unknown(start_tether: Any, fakes: Fakes) -> None:
    tether: Tether = await start_tether(api_keys="key-a=alice,key-b=bob")
    fakes.model.push(TextReply(["Mine."]))
    alice = AsyncOpenAI(base_url=tether.base_url + "/v1", api_key="key-a", max_retries=0)
    bob = AsyncOpenAI(base_url=tether.base_url + "/v1", api_key="key-b", max_retries=0)
    try:
        with trio.fail_after(WAIT):
            mine = await alice.responses.create(model="fake-model", input="x")
        for call in (
            bob.responses.retrieve(mine.id),
            bob.responses.cancel(mine.id),
            bob.responses.delete(mine.id),
            bob.responses.input_items.list(mine.id),
            bob.responses.create(model="fake-model", input="y", previous_response_id=mine.id),
        ):
            with pytest.raises(NotFoundError):
                await call
        assert (await alice.responses.retrieve(mine.id)).output_text == "Mine."
    finally:
        await alice.close()
        await bob.close()


async def test_a_running_response_shows_its_output_and_usage_so_far(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply([f"w{i} " for i in range(1000)], interval=0.02))
    async with sdk(tether) as client:
        created = await client.responses.create(
            model="fake-model", input="a question of forty characters, roughly", background=True
        )
        with trio.fail_after(WAIT):
            await _first_delta(tether, created.id)
            running = await client.responses.retrieve(created.id)
            await client.responses.cancel(created.id)
    assert running.status == "in_progress"
    assert running.output_text.startswith("w0 ")
    assert running.usage is not None
    assert running.usage.output_tokens >= 1 and running.usage.input_tokens >= 10
    assert running.usage.total_tokens == running.usage.input_tokens + running.usage.output_tokens
