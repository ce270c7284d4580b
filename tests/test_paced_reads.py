"""Paced reads (server/providers/llm/paced.py) under the OpenAI-compatible client: what
arrives while a paced connection pauses is handed on as one delta, a cancel during the pause
closes the connection, and the read timeout bounds each read, not the stream. Real loopback
upstreams (fakes/scripted.py): the pause and the timeout are the connection's."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable

import httpx2
import pytest
import trio

from fakes.base import Exchange
from fakes.scripted import ScriptedServer, send_sse, start_stream, until_client_leaves
from server.providers.llm.base import ModelError
from server.providers.llm.openai_compat import OpenAICompatibleModel
from server.providers.llm.paced import paced_client
from tests.conftest import WAIT
from tests.model_stream import BODY, USAGE, Collected, cancel_after_first_delta, chunk


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer()
    await server.start(nursery)
    yield server
    assert not server.errors, "a script crashed:\n" + "\n".join(server.errors)


def model_for(
    upstream: ScriptedServer, http: httpx2.AsyncClient, *, timeout: float = WAIT
) -> OpenAICompatibleModel:
    return OpenAICompatibleModel(http, upstream.base_url + "/v1", "sk-test", timeout)


def paced(pause: Callable[[], float]) -> httpx2.AsyncClient:
    return paced_client(httpx2.Limits(max_connections=10), httpx2.Timeout(WAIT), pause)


async def test_upstream_chunks_read_together_are_one_delta(upstream: ScriptedServer) -> None:
    """What one read of a paced connection (the model client's kind) brings is handed on
    as one delta: the server does less work per token exactly when it is behind."""
    collected = Collected()

    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("one "))
        await collected.first.wait()
        tool = {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}
        burst = [
            chunk("two "),
            chunk("three", reasoning_content="hm"),
            chunk(tool_calls=[tool]),
            chunk(finish="stop"),
            {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": USAGE},
        ]
        await ex.send("".join(f"data: {json.dumps(c)}\n\n" for c in burst) + "data: [DONE]\n\n")
        await ex.finish()

    upstream.route("POST", "/v1/chat/completions", handler)
    async with paced(lambda: 0.0) as http:
        await model_for(upstream, http).stream_chat(BODY, collected)
    assert [d.content for d in collected.deltas] == ["one ", "two three"]
    burst = collected.deltas[1]
    assert burst.reasoning == "hm"
    assert [(c.id, c.name, c.arguments) for c in burst.tool_calls] == [("call_1", "f", "{}")]
    assert (burst.finish_reason, burst.usage) == ("stop", USAGE)


async def test_paced_stream_hands_on_chunks_that_arrived_during_a_pause_as_one_delta(
    upstream: ScriptedServer,
) -> None:
    """Separate HTTP chunks that one paced read takes together are one delta, handed on
    when the connection next needs bytes; the text is whole and in order."""
    collected = Collected()

    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("a "))
        await collected.first.wait()
        for piece in ("b ", "c ", "d"):  # three chunks, sent while the client pauses
            await send_sse(ex, chunk(piece))
        await send_sse(ex, chunk(finish="stop"))
        await ex.send("data: [DONE]\n\n")
        await ex.finish()

    upstream.route("POST", "/v1/chat/completions", handler)
    # The pause is long enough that the three sends land within it on a busy machine too
    # (at 0.2 s, CI once saw "d" come after the pause).
    async with paced(lambda: 1.0) as http:
        with trio.fail_after(WAIT):
            await model_for(upstream, http).stream_chat(BODY, collected)
    assert [d.content for d in collected.deltas] == ["a ", "b c d"]
    assert collected.finish_reason == "stop"


async def test_cancelling_a_paced_stream_during_its_pause_closes_the_connection(
    upstream: ScriptedServer,
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("first"))
        await until_client_leaves()

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    # Once the first delta is in, every read waits an hour: the cancel ends the wait.
    async with paced(lambda: 3600 if collected.first.is_set() else 0) as http:
        conn = await cancel_after_first_delta(upstream, model_for(upstream, http), collected)
    assert conn.closed_by == "client"


async def test_a_paced_stream_silent_past_its_read_timeout_fails_and_is_closed(
    upstream: ScriptedServer,
) -> None:
    """A plain connection's reads wait on the socket itself; the read timeout is kept by
    the client's watchdog, which closes the connection: the model call fails as timed
    out, and the upstream sees the connection closed."""

    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("first "))
        await until_client_leaves()

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    async with paced(lambda: 0.0) as http:
        with trio.fail_after(WAIT), pytest.raises(ModelError, match="timed out"):
            await model_for(upstream, http, timeout=0.3).stream_chat(BODY, collected)
        conn = await upstream.wait_connection_closed(upstream.requests[0].conn_id)
    assert [d.content for d in collected.deltas] == ["first "]
    assert conn.closed_by == "client"


async def test_a_paced_streams_read_timeout_bounds_each_read_not_the_stream(
    upstream: ScriptedServer,
) -> None:
    """Chunks that come within the timeout of each other keep the stream going however
    long it lasts in all (here twice the timeout)."""

    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        for i in range(8):
            await send_sse(ex, chunk(f"t{i} "))
            await trio.sleep(0.1)  # the upstream's pace: a read waits about this long
        await send_sse(ex, chunk(finish="stop"))
        await ex.send("data: [DONE]\n\n")
        await ex.finish()

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    async with paced(lambda: 0.0) as http:
        with trio.fail_after(WAIT):
            await model_for(upstream, http, timeout=0.4).stream_chat(BODY, collected)
    assert "".join(d.content or "" for d in collected.deltas) == "".join(f"t{i} " for i in range(8))
    assert collected.finish_reason == "stop"
