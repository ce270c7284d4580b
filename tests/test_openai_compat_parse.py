"""The OpenAI-compatible client (server/providers/llm/openai_compat.py) reading what an
upstream answers: the stream's server-sent events, its deltas, its errors, and the model
list. Nothing here depends on a connection, so the upstream is a function behind httpx2's
MockTransport (tests/mock_upstream.py); what a cancel, a cut or a silence does to the
connection is in test_openai_compat_connection.py, against a real loopback server."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx2
import pytest

from server.providers.llm.base import ModelDelta, ModelError
from server.providers.llm.openai_compat import OpenAICompatibleModel
from tests.conftest import WAIT
from tests.mock_upstream import MockUpstream, json_response, streamed
from tests.model_stream import BODY, USAGE, USAGE_CHUNK, Collected, chunk

COMPLETIONS = "/v1/chat/completions"


@pytest.fixture
def upstream() -> MockUpstream:
    return MockUpstream()


@pytest.fixture
async def http(upstream: MockUpstream) -> AsyncIterator[httpx2.AsyncClient]:
    async with upstream.client() as client:
        yield client


def model_for(
    upstream: MockUpstream, http: httpx2.AsyncClient, *, api_key: str | None = "sk-test"
) -> OpenAICompatibleModel:
    return OpenAICompatibleModel(http, upstream.base_url + "/v1", api_key, WAIT)


async def test_upstream_stream_delivers_content_finish_and_usage(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    lo, bang = json.dumps(chunk("lo")), json.dumps(chunk("!"))
    upstream.route(
        "POST",
        COMPLETIONS,
        streamed(
            ": keep-alive comment\n\nevent: message\nid: 1\n",
            chunk("", role="assistant"),
            chunk("Hel"),
            # Two lines in one write and one line over two writes: framing is not chunking.
            f"data: {lo}\n\ndata: {bang[:9]}",
            f"{bang[9:]}\r\n\r\n",
            chunk(finish="stop"),
            USAGE_CHUNK,
            "data: [DONE]\n\n",
        ),
    )
    collected = Collected()
    await model_for(upstream, http).stream_chat(BODY, collected)
    assert collected.content == "Hello!"
    assert collected.finish_reason == "stop"
    assert collected.usage == USAGE
    assert all(d != ModelDelta() for d in collected.deltas)  # the role-only chunk is skipped
    [request] = upstream.requests
    sent = json.loads(request.content)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == BODY["messages"]
    assert request.headers["authorization"] == "Bearer sk-test"


async def test_upstream_sse_framing_follows_the_spec_at_the_edges(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    """A chunk split over several ``data:`` lines is one event; bare CR ends a line; an
    event ends at its blank line; comments, ``event:``, ``id:`` and ``retry:`` are not
    data; a field without a space after its colon is read too."""
    multi = json.dumps(chunk("multi ")).replace(', "model"', ',\ndata: "model"')
    assert "\ndata: " in multi
    split = json.dumps(chunk("split"))
    upstream.route(
        "POST",
        COMPLETIONS,
        streamed(
            ": a comment\r\rretry: 3000\r\r",
            f"data: {multi}\n\n",
            f"event: message\rid: 7\rdata: {json.dumps(chunk('cr '))}\r\r",
            f"data:{json.dumps(chunk('nospace '))}\r\n\r\n",
            f"data: {split[:20]}",
            f"{split[20:]}\n",
            f": not the end yet\n\ndata: {json.dumps(chunk(finish='stop'))}\n\n",
            "data: [DONE]\n\n",
        ),
    )
    collected = Collected()
    await model_for(upstream, http).stream_chat(BODY, collected)
    assert collected.content == "multi cr nospace split"
    assert collected.finish_reason == "stop"


async def test_upstream_event_past_the_size_bound_fails_the_stream(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    # A line that does not end within 40 x 32 KiB: the bound is met well before its end.
    upstream.route("POST", COMPLETIONS, streamed(chunk("kept"), *["x" * 32768] * 40))
    collected = Collected()
    with pytest.raises(ModelError, match="limit"):
        await model_for(upstream, http).stream_chat(BODY, collected)
    assert collected.content == "kept"


async def test_upstream_bad_chunk_fails_after_the_good_ones_of_its_read(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    upstream.route(
        "POST", COMPLETIONS, streamed(f"data: {json.dumps(chunk('kept'))}\n\ndata: {{not json\n\n")
    )
    collected = Collected()
    with pytest.raises(ModelError, match="invalid JSON"):
        await model_for(upstream, http).stream_chat(BODY, collected)
    assert collected.content == "kept"


async def test_upstream_stream_sends_no_authorization_without_a_key(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    upstream.route("POST", COMPLETIONS, streamed(chunk("ok", finish="stop"), "data: [DONE]\n\n"))
    await model_for(upstream, http, api_key=None).stream_chat(BODY, Collected())
    assert "authorization" not in upstream.requests[0].headers


async def test_upstream_stream_reads_both_reasoning_fields(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    upstream.route(
        "POST",
        COMPLETIONS,
        streamed(
            chunk(reasoning_content="think "),
            chunk(reasoning="more"),
            chunk("answer", finish="stop"),
            "data: [DONE]\n\n",
        ),
    )
    collected = Collected()
    await model_for(upstream, http).stream_chat(BODY, collected)
    assert (collected.reasoning, collected.content) == ("think more", "answer")


async def test_upstream_tool_call_deltas_assemble_by_index(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    def call(
        index: int, arguments: str, call_id: str | None = None, name: str | None = None
    ) -> dict[str, Any]:
        piece: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
        if call_id:
            piece.update(id=call_id, type="function")
            piece["function"]["name"] = name
        return piece

    upstream.route(
        "POST",
        COMPLETIONS,
        streamed(
            chunk(tool_calls=[call(0, "", "call_a", "calculator")]),
            chunk(tool_calls=[call(0, '{"expression": ')]),
            chunk(tool_calls=[call(1, '{"url": "http://x"}', "call_b", "fetch_url")]),
            chunk(tool_calls=[call(0, '"2+2"}')]),
            chunk(finish="tool_calls"),
            "data: [DONE]\n\n",
        ),
    )
    collected = Collected()
    await model_for(upstream, http).stream_chat(BODY, collected)
    assert collected.tool_calls() == [
        {"id": "call_a", "name": "calculator", "arguments": '{"expression": "2+2"}'},
        {"id": "call_b", "name": "fetch_url", "arguments": '{"url": "http://x"}'},
    ]
    assert collected.finish_reason == "tool_calls"


async def test_upstream_500_with_openai_error_body_raises_model_error_with_its_message(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    error = {
        "error": {
            "message": "The server had an error",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    upstream.route("POST", COMPLETIONS, json_response(error, status=500))
    with pytest.raises(ModelError) as caught:
        await model_for(upstream, http).stream_chat(BODY, Collected())
    assert caught.value.status == 500
    assert "The server had an error" in caught.value.message


async def test_upstream_error_page_without_json_keeps_the_status(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    upstream.route(
        "POST",
        COMPLETIONS,
        httpx2.Response(
            502,
            content=b"<html><body>Bad gateway</body></html>",
            headers={"content-type": "text/html"},
        ),
    )
    with pytest.raises(ModelError) as caught:
        await model_for(upstream, http).stream_chat(BODY, Collected())
    assert caught.value.status == 502
    assert "<html>" not in caught.value.message


async def test_upstream_stream_ending_without_done_or_finish_reason_raises_model_error(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    upstream.route("POST", COMPLETIONS, streamed(chunk("partial")))  # a whole body that stops
    with pytest.raises(ModelError, match="ended early"):
        await model_for(upstream, http).stream_chat(BODY, Collected())


async def test_upstream_stream_with_finish_reason_but_no_done_is_complete(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    upstream.route("POST", COMPLETIONS, streamed(chunk("whole", finish="stop")))
    collected = Collected()
    await model_for(upstream, http).stream_chat(BODY, collected)
    assert (collected.content, collected.finish_reason) == ("whole", "stop")


async def test_upstream_invalid_json_chunk_raises_model_error(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    upstream.route("POST", COMPLETIONS, streamed("data: {not json\n\n"))
    with pytest.raises(ModelError, match="invalid JSON"):
        await model_for(upstream, http).stream_chat(BODY, Collected())


async def test_upstream_error_chunk_mid_stream_raises_model_error(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    upstream.route(
        "POST", COMPLETIONS, streamed(chunk("so far"), {"error": {"message": "model overloaded"}})
    )
    with pytest.raises(ModelError, match="model overloaded"):
        await model_for(upstream, http).stream_chat(BODY, Collected())


async def test_upstream_ignoring_stream_true_still_gives_deltas(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    completion = {
        "id": "c1",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "all at once"},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    }
    upstream.route("POST", COMPLETIONS, json_response(completion))
    collected = Collected()
    await model_for(upstream, http).stream_chat(BODY, collected)
    assert (collected.content, collected.finish_reason) == ("all at once", "stop")
    assert collected.usage == USAGE


def _token(text: str, logprob: float) -> dict[str, Any]:
    return {"token": text, "logprob": logprob, "bytes": list(text.encode()), "top_logprobs": []}


def _choice_chunk(index: int, content: str, logprob: float) -> dict[str, Any]:
    body = chunk(content)
    body["choices"][0].update(index=index, logprobs={"content": [_token(content, logprob)]})
    return body


async def test_upstream_choices_are_read_by_index_with_their_logprobs(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    both_finish = chunk(finish="stop")
    both_finish["choices"].append({"index": 1, "delta": {}, "finish_reason": "length"})
    upstream.route(
        "POST",
        COMPLETIONS,
        streamed(
            _choice_chunk(0, "A", -0.1),
            _choice_chunk(1, "B", -0.2),
            _choice_chunk(1, "b", -0.3),
            _choice_chunk(0, "a", -0.4),
            both_finish,
            USAGE_CHUNK,
            "data: [DONE]\n\n",
        ),
    )
    collected = Collected()
    await model_for(upstream, http).stream_chat({**BODY, "n": 2, "logprobs": True}, collected)
    by_choice: dict[int, list[ModelDelta]] = {}
    for delta in collected.deltas:
        by_choice.setdefault(delta.index, []).append(delta)
    assert "".join(d.content for d in by_choice[0]) == "Aa"
    assert "".join(d.content for d in by_choice[1]) == "Bb"
    assert [t["logprob"] for d in by_choice[1] for t in d.logprobs or ()] == [-0.2, -0.3]
    assert [t["token"] for d in by_choice[0] for t in d.logprobs or ()] == ["A", "a"]
    finishes = {d.index: d.finish_reason for d in collected.deltas if d.finish_reason}
    assert finishes == {0: "stop", 1: "length"}
    assert collected.usage == USAGE
    sent = json.loads(upstream.requests[-1].content)
    assert (sent["n"], sent["logprobs"]) == (2, True)


async def test_upstream_completion_without_stream_keeps_every_choice(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    completion = {
        "id": "c1",
        "object": "chat.completion",
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "finish_reason": "stop",
                "logprobs": {"content": [_token(text, -1.0)]},
            }
            for i, text in enumerate(["first", "second"])
        ],
    }
    upstream.route("POST", COMPLETIONS, json_response(completion))
    collected = Collected()
    await model_for(upstream, http).stream_chat(BODY, collected)
    assert [(d.index, d.content, d.finish_reason) for d in collected.deltas] == [
        (0, "first", "stop"),
        (1, "second", "stop"),
    ]
    assert [d.logprobs for d in collected.deltas] == [
        [_token("first", -1.0)],
        [_token("second", -1.0)],
    ]


async def test_upstream_list_models(upstream: MockUpstream, http: httpx2.AsyncClient) -> None:
    listing = {
        "object": "list",
        "data": [{"id": "gpt-x", "object": "model"}, {"id": "llama", "object": "model"}],
    }
    upstream.route("GET", "/v1/models", json_response(listing))
    assert await model_for(upstream, http).list_models() == ["gpt-x", "llama"]
    assert upstream.requests[0].headers["authorization"] == "Bearer sk-test"


async def test_upstream_list_models_error_raises_model_error_with_status(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    upstream.route("GET", "/v1/models", json_response({"error": {"message": "bad key"}}, 401))
    with pytest.raises(ModelError, match="bad key") as caught:
        await model_for(upstream, http).list_models()
    assert caught.value.status == 401
