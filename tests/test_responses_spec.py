"""Every answer and stream event of /v1/responses against OpenAI's published OpenAPI
document (issue 17), in every mode: background with retrieve and resumed stream, stream,
sync, cancelled, failed, cut at max_output_tokens, function calls and their continuation by
``previous_response_id``, web search, MCP tools, delete and input items. Each JSON answer
is checked against the document's schema for it (``Response``, ``ResponseItemList``,
``ErrorResponse``) and each event against ``ResponseStreamEvent``; the SDK's own types
check them too. Then bodies Tether must refuse: a 400 in the error shape, ``param`` naming
the field, and nothing sent to the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, get_args

import httpx2
import pytest
import trio
from openai.types.responses import Response, ResponseItem, ResponseStreamEvent
from pydantic import TypeAdapter

from fakes.mcp_server import McpHttpFake, McpRecorder
from fakes.model import ErrorReply, TextReply, ToolCallReply
from tests.conftest import WAIT, Fakes, Tether
from tests.spec_check import assert_spec_valid, spec_errors
from tests.test_responses import _first_delta

pytestmark = pytest.mark.both_backends

_EVENT_CLASSES = {
    cls.model_fields["type"].annotation.__args__[0]: cls  # type: ignore[union-attr]
    for cls in get_args(get_args(ResponseStreamEvent)[0])
}
_ITEM = TypeAdapter(ResponseItem)

WEATHER = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


# -- reading and checking -------------------------------------------------------------------


def check_response(body: Any) -> dict[str, Any]:
    assert_spec_valid("Response", body)
    Response.model_validate(body)
    assert isinstance(body, dict)
    return body


def check_error(response: httpx2.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert_spec_valid("ErrorResponse", body)
    error: dict[str, Any] = body["error"]
    return error


async def answer(
    tether: Tether, method: str, path: str, body: dict[str, Any] | None = None
) -> dict[str, Any]:
    """A 200 JSON answer, checked as the document's Response."""
    with trio.fail_after(WAIT):
        response = await tether.client.request(method, path, json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return check_response(response.json())


async def stream(
    tether: Tether, method: str, path: str, body: dict[str, Any] | None = None
) -> list[dict[str, Any]]:
    """The events of a Responses stream, each checked as the document's
    ``ResponseStreamEvent`` and by the SDK's class of its type, the stream as a whole as
    the API has it: ``response.created`` first (unless resumed), numbers increasing, one
    terminal event, last."""
    events: list[dict[str, Any]] = []
    with trio.fail_after(WAIT):
        async with tether.client.stream(method, path, json=body) as response:
            assert response.status_code == 200, await response.aread()
            assert response.headers["content-type"].startswith("text/event-stream")
            name = None
            async for line in response.aiter_lines():
                if line.startswith("event: "):
                    name = line.removeprefix("event: ")
                elif line.startswith("data: "):
                    event = json.loads(line.removeprefix("data: "))
                    assert event["type"] == name
                    assert_spec_valid("ResponseStreamEvent", event)
                    _EVENT_CLASSES[event["type"]].model_validate(event)
                    events.append(event)
    numbers = [e["sequence_number"] for e in events]
    assert numbers == sorted(set(numbers))
    assert [e["type"] for e in events if e["type"] in TERMINAL] == [events[-1]["type"]]
    return events


async def input_items(tether: Tether, response_id: str, query: str = "") -> dict[str, Any]:
    response = await tether.client.get(f"/v1/responses/{response_id}/input_items{query}")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    assert_spec_valid("ResponseItemList", body)
    for item in body["data"]:
        _ITEM.validate_python(item)
    return body


def output_types(response: dict[str, Any]) -> list[str]:
    return [item["type"] for item in response["output"]]


def create(**fields: Any) -> dict[str, Any]:
    return {"model": "fake-model", "input": "hi", **fields}


# -- every mode -----------------------------------------------------------------------------


async def test_background_response_its_stream_retrieve_resume_and_input_items_are_valid(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply(["Hello ", "there."]))
    created = await answer(
        tether,
        "POST",
        "/v1/responses",
        create(background=True, instructions="Be brief.", metadata={"k": "v"}),
    )
    assert created["status"] == "queued" and created["output"] == []
    events = await stream(tether, "GET", f"/v1/responses/{created['id']}?stream=true")
    assert [e["type"] for e in events[:3]] == [
        "response.created",
        "response.queued",
        "response.in_progress",
    ]
    assert events[-1]["type"] == "response.completed"
    done = await answer(tether, "GET", f"/v1/responses/{created['id']}")
    assert done["status"] == "completed" and done == events[-1]["response"]
    assert output_types(done) == ["message"]
    cut = events[len(events) // 2]["sequence_number"]
    rest = await stream(
        tether, "GET", f"/v1/responses/{created['id']}?stream=true&starting_after={cut}"
    )
    assert rest == [e for e in events if e["sequence_number"] > cut]
    items = await input_items(tether, created["id"])
    assert [i["type"] for i in items["data"]] == ["message"]


async def test_streamed_response_events_are_valid(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(TextReply(["A ", "b."]))
    events = await stream(tether, "POST", "/v1/responses", create(stream=True))
    types = [e["type"] for e in events]
    for expected in (
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
    ):
        assert expected in types
    assert events[-1]["response"]["output"][0]["content"][0]["text"] == "A b."


async def test_sync_response_is_valid(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(TextReply(["A ", "b."]))
    done = await answer(tether, "POST", "/v1/responses", create(temperature=0.5, top_p=0.9))
    assert done["status"] == "completed" and done["usage"] is not None


async def test_cancelled_response_and_its_stream_are_valid(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(TextReply([f"w{i} " for i in range(1000)], interval=0.02))
    created = await answer(tether, "POST", "/v1/responses", create(background=True))
    with trio.fail_after(WAIT):
        await _first_delta(tether, created["id"])
    cancelled = await answer(tether, "POST", f"/v1/responses/{created['id']}/cancel")
    assert cancelled["status"] == "cancelled"
    events = await stream(tether, "GET", f"/v1/responses/{created['id']}?stream=true")
    assert events[-1]["response"]["status"] == "cancelled"
    assert await answer(tether, "GET", f"/v1/responses/{created['id']}") == cancelled


async def test_failed_response_and_its_stream_are_valid(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(ErrorReply(status=400, body={"error": {"message": "no", "type": "x"}}))
    events = await stream(tether, "POST", "/v1/responses", create(stream=True))
    assert events[-1]["type"] == "response.failed"
    failed = await answer(tether, "GET", f"/v1/responses/{events[0]['response']['id']}")
    assert failed["status"] == "failed" and failed["error"]["message"]


async def test_response_cut_at_max_output_tokens_is_valid(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(TextReply(["A ", "b"], finish_reason="length"))
    events = await stream(tether, "POST", "/v1/responses", create(stream=True, max_output_tokens=2))
    assert events[-1]["type"] == "response.incomplete"
    cut = events[-1]["response"]
    assert cut["status"] == "incomplete"
    assert cut["incomplete_details"] == {"reason": "max_output_tokens"}


async def test_function_calls_and_their_continuation_are_valid(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(
        ToolCallReply([("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Rome"})]),
        TextReply(["Sunny."]),
    )
    events = await stream(
        tether, "POST", "/v1/responses", create(stream=True, tools=[WEATHER], input="Weather?")
    )
    first = events[-1]["response"]
    assert output_types(first) == ["function_call", "function_call"]
    assert "response.function_call_arguments.done" in [e["type"] for e in events]
    outputs = [
        {"type": "function_call_output", "call_id": call["call_id"], "output": "22C"}
        for call in first["output"]
    ]
    second = await answer(
        tether,
        "POST",
        "/v1/responses",
        create(previous_response_id=first["id"], input=outputs, tools=[WEATHER]),
    )
    assert second["previous_response_id"] == first["id"]
    assert second["output"][0]["content"][0]["text"] == "Sunny."
    items = await input_items(tether, second["id"], "?order=asc&limit=1")
    assert [i["type"] for i in items["data"]] == ["function_call_output"]
    assert items["has_more"] is True


async def test_web_search_response_is_valid(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(TextReply(["As [1] says, ", "yes."]))
    events = await stream(
        tether,
        "POST",
        "/v1/responses",
        create(stream=True, input="Is it so?", tools=[{"type": "web_search"}]),
    )
    done = events[-1]["response"]
    assert output_types(done) == ["web_search_call", "message"]
    assert done["output"][0]["status"] == "completed"
    annotations = done["output"][1]["content"][0]["annotations"]
    assert annotations and annotations[0]["type"] == "url_citation"
    assert "response.web_search_call.searching" in [e["type"] for e in events]


async def test_response_cancelled_during_web_search_is_valid(tether: Tether, fakes: Fakes) -> None:
    fakes.search.configure(delay=30)
    created = await answer(
        tether,
        "POST",
        "/v1/responses",
        create(background=True, input="Is it so?", tools=[{"type": "web_search"}]),
    )
    with trio.fail_after(WAIT):
        await fakes.search.wait_for_request("/search")
    cancelled = await answer(tether, "POST", f"/v1/responses/{created['id']}/cancel")
    assert cancelled["status"] == "cancelled"
    # The spec's web_search_call has no status for a search cut short but "failed".
    assert [(i["type"], i["status"]) for i in cancelled["output"]] == [
        ("web_search_call", "failed")
    ]
    events = await stream(tether, "GET", f"/v1/responses/{created['id']}?stream=true")
    assert events[-1]["response"] == cancelled
    assert fakes.model.chat_requests == []


async def test_mcp_response_is_valid(
    start_tether: Any, fakes: Fakes, tmp_path: Path, nursery: trio.Nursery
) -> None:
    recorder = McpRecorder()
    await recorder.start(nursery)
    server = McpHttpFake("web", recorder)
    await server.start(nursery)
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"files": {"url": server.url}}}))
    with trio.fail_after(WAIT):
        tether: Tether = await start_tether(mcp_config=str(config))
    fakes.model.push(
        ToolCallReply([("mcp__files__echo", {"text": "hello"})]), TextReply(["It said hello."])
    )
    mcp = {"type": "mcp", "server_label": "files", "require_approval": "never"}
    events = await stream(
        tether, "POST", "/v1/responses", create(stream=True, input="echo", tools=[mcp])
    )
    done = events[-1]["response"]
    assert output_types(done) == ["mcp_list_tools", "mcp_call", "message"]
    assert done["output"][1]["output"] == "echo: hello"
    server.stop()


async def test_deleted_response_is_gone_with_a_valid_error(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(TextReply(["x"]))
    done = await answer(tether, "POST", "/v1/responses", create())
    # The document describes no body for DELETE's 200 (the SDK returns None); Tether's is
    # the usual deletion object.
    deleted = await tether.client.delete(f"/v1/responses/{done['id']}")
    assert deleted.status_code == 200
    assert deleted.json() == {"id": done["id"], "object": "response", "deleted": True}
    for path in (f"/v1/responses/{done['id']}", f"/v1/responses/{done['id']}/input_items"):
        error = check_error(await tether.client.get(path), 404)
        assert error["param"] == "response_id"
    check_error(await tether.client.post(f"/v1/responses/{done['id']}/cancel"), 404)
    check_error(await tether.client.delete(f"/v1/responses/{done['id']}"), 404)


# -- refused bodies -------------------------------------------------------------------------

MCP_LABEL = "files"

# (name, the body's fields, the param named, whether the document's CreateResponse allows
# it: a body the spec allows is refused because Tether cannot honour it, never dropped).
REFUSED: list[tuple[str, dict[str, Any], str, bool]] = [
    ("input_number", {"input": 5}, "input", False),
    ("input_object", {"input": {"role": "user", "content": "x"}}, "input", False),
    ("temperature_string", {"temperature": "hot"}, "temperature", False),
    ("temperature_too_high", {"temperature": 3}, "temperature", False),
    ("max_output_tokens_string", {"max_output_tokens": "10"}, "max_output_tokens", False),
    ("max_output_tokens_fraction", {"max_output_tokens": 1.5}, "max_output_tokens", False),
    ("tools_not_a_list", {"tools": {"type": "web_search"}}, "tools", False),
    ("tool_not_an_object", {"tools": ["web_search"]}, "tools[0]", False),
    ("unknown_parameter", {"frobnicate": True}, "frobnicate", True),
    ("unknown_tool_type", {"tools": [{"type": "teleport"}]}, "tools[0].type", False),
    ("tool_type_an_object", {"tools": [{"type": {}}]}, "tools[0].type", False),
    ("input_item_type_an_object", {"input": [{"type": {}}]}, "input[0].type", False),
    (
        "mcp_server_not_configured",
        {"tools": [{"type": "mcp", "server_label": "elsewhere", "require_approval": "never"}]},
        "tools[0].server_label",
        True,
    ),
    (
        "mcp_approval_required",
        {"tools": [{"type": "mcp", "server_label": MCP_LABEL, "require_approval": "always"}]},
        "tools[0].require_approval",
        True,
    ),
    (
        "mcp_approval_default",
        {"tools": [{"type": "mcp", "server_label": MCP_LABEL}]},
        "tools[0].require_approval",
        True,
    ),
    (
        "input_image",
        {
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {
                            "type": "input_image",
                            "image_url": "https://example.com/a.png",
                            "detail": "auto",
                        },
                    ],
                }
            ]
        },
        "input[0].content[1].type",
        True,
    ),
    ("reasoning", {"reasoning": {"effort": "low"}}, "reasoning", True),
]


def spec_allows(body: dict[str, Any]) -> bool:
    """Whether the document's ``CreateResponse`` allows the body.

    One quirk of the document, worked around here only: an input message whose content is
    a list of parts is valid under two members of ``InputItem``'s ``oneOf``,
    ``EasyInputMessage`` and ``Item`` (its ``InputMessage``), both of type ``message``, so
    that "exactly one" fails for every such message, and the discriminator (``type``)
    cannot choose between them either. Such a message is checked as an
    ``EasyInputMessage``, and the rest of the body without it."""
    messages = body.get("input")
    if isinstance(messages, list) and all(
        isinstance(m, dict) and "role" in m and isinstance(m.get("content"), list) for m in messages
    ):
        return not spec_errors("CreateResponse", {**body, "input": "x"}) and not any(
            spec_errors("EasyInputMessage", m) for m in messages
        )
    return not spec_errors("CreateResponse", body)


@pytest.mark.parametrize(
    ("fields", "param", "spec_allows_it"),
    [pytest.param(f, p, a, id=n) for n, f, p, a in REFUSED],
)
async def test_a_refused_body_is_a_400_naming_the_field_and_reaches_no_model(
    start_tether: Any,
    fakes: Fakes,
    tmp_path: Path,
    nursery: trio.Nursery,
    fields: dict[str, Any],
    param: str,
    spec_allows_it: bool,
) -> None:
    body = create(**fields)
    assert spec_allows(body) is spec_allows_it
    recorder = McpRecorder()
    await recorder.start(nursery)
    server = McpHttpFake("web", recorder)
    await server.start(nursery)
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {MCP_LABEL: {"url": server.url}}}))
    with trio.fail_after(WAIT):
        tether: Tether = await start_tether(mcp_config=str(config))
    for mode in ({}, {"stream": True}, {"background": True}):
        response = await tether.client.post("/v1/responses", json={**body, **mode})
        error = check_error(response, 400)
        assert error["param"] == param, error
        assert error["code"] == "invalid_request"
    assert fakes.model.chat_requests == []
    server.stop()


def test_the_spec_check_refuses_what_the_document_does_not_allow() -> None:
    """The checks above are not vacuous: the document's schemas, as extracted, refuse a
    Response and events that Tether must never send."""
    assert spec_errors("Response", {"id": "resp_1", "object": "response"})
    assert spec_errors("ResponseStreamEvent", {"type": "response.output_text.delta"})
    assert spec_errors("ResponseStreamEvent", {"type": "response.nonsense", "sequence_number": 1})
    item = {"id": "ws_1", "type": "web_search_call", "status": "incomplete", "action": None}
    assert spec_errors("ItemResource", item)
    assert spec_errors("ErrorResponse", {"error": {"message": "x", "type": "y"}})
