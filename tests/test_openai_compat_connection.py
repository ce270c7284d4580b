"""The OpenAI-compatible client (server/providers/llm/openai_compat.py) and its connection: a
stream cut midway, an upstream gone silent, one that cannot be reached, and a cancel that must
close the connection. These need a real socket, so the upstream is a scripted loopback server
(fakes/scripted.py) that records when each connection closes and who closed it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import pytest
import trio

from fakes.base import Exchange
from fakes.scripted import ScriptedServer, send_sse, start_stream, until_client_leaves
from server.providers.llm.base import ModelError
from server.providers.llm.openai_compat import OpenAICompatibleModel
from tests.conftest import WAIT
from tests.model_stream import BODY, Collected, cancel_after_first_delta, chunk


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer()
    await server.start(nursery)
    yield server
    assert not server.errors, "a script crashed:\n" + "\n".join(server.errors)


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(trust_env=False) as client:
        yield client


def model_for(
    upstream: ScriptedServer, http: httpx2.AsyncClient, *, timeout: float = WAIT
) -> OpenAICompatibleModel:
    return OpenAICompatibleModel(http, upstream.base_url + "/v1", "sk-test", timeout)


async def test_upstream_stream_cut_midway_raises_model_error_after_the_deltas_delivered(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("partial"))
        ex.abort()  # closing without the terminating chunk: a broken chunked body

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    with pytest.raises(ModelError) as caught:
        await model_for(upstream, http).stream_chat(BODY, collected)
    assert collected.content == "partial"
    assert caught.value.status is None


async def test_upstream_silent_past_the_timeout_raises_model_error(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await until_client_leaves()  # sends nothing more

    upstream.route("POST", "/v1/chat/completions", handler)
    with pytest.raises(ModelError, match="timed out"):
        await model_for(upstream, http, timeout=0.2).stream_chat(BODY, Collected())


async def test_unreachable_upstream_raises_model_error(http: httpx2.AsyncClient) -> None:
    # A port that was just free and has no listener: the connection is refused.
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = OpenAICompatibleModel(http, f"http://127.0.0.1:{port}/v1", None, WAIT)
    with pytest.raises(ModelError, match="connection failed"):
        await model.stream_chat(BODY, Collected())
    with pytest.raises(ModelError):
        await model.list_models()


async def test_cancelling_upstream_stream_closes_the_connection(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("first"))
        await until_client_leaves()  # holds the stream open until the client closes it

    upstream.route("POST", "/v1/chat/completions", handler)
    conn = await cancel_after_first_delta(upstream, model_for(upstream, http), Collected())
    assert conn.closed_by == "client"
