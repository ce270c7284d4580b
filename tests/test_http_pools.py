"""The outgoing clients' pools (server/providers/net/client.py): a client with a large
connection limit spreads its requests over several httpcore pools in turn; connections are
still reused within each pool, and closing the client closes every one of them."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import pytest
import trio

from server.providers.net.client import client_with_backend
from server.providers.net.tls_safe import TlsSafeBackend
from tests.fakes.scripted import Exchange, ScriptedServer, json_answer

WAIT = 10


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer(json_answer({"ok": True}))
    await server.start(nursery)
    yield server
    assert not server.errors, "a script crashed:\n" + "\n".join(server.errors)


def client(max_connections: int) -> httpx2.AsyncClient:
    return client_with_backend(TlsSafeBackend(), httpx2.Limits(
        max_connections=max_connections, max_keepalive_connections=max_connections),
        httpx2.Timeout(WAIT))


async def test_a_small_client_reuses_one_connection(upstream: ScriptedServer) -> None:
    async with client(100) as http:
        for _ in range(6):
            assert (await http.get(upstream.base_url + "/x")).json() == {"ok": True}
    assert len(upstream.connections) == 1


async def test_a_large_clients_pools_take_requests_in_turn_and_reuse_their_connections(
    upstream: ScriptedServer,
) -> None:
    """400 connections allowed: four pools. Eight requests one after another open one
    connection per pool (four), each used twice; closing the client closes all four."""
    async with client(400) as http:
        for _ in range(8):
            assert (await http.get(upstream.base_url + "/x")).json() == {"ok": True}
        conns = upstream.connections
        assert len(conns) == 4
        assert [len(c.paths) for c in conns] == [2, 2, 2, 2]
    with trio.fail_after(WAIT):
        for conn in conns:
            await upstream.wait_connection_closed(conn.id)


async def test_a_large_client_keeps_its_limit_shared_out(upstream: ScriptedServer) -> None:
    """The limit holds in all: requests beyond it wait for a connection. Here 200 allowed
    (two pools of 100) and 300 held open at once: 200 connections, the rest queued."""
    release = trio.Event()

    async def held(ex: Exchange) -> None:
        await release.wait()
        await ex.respond_json({"ok": True})

    upstream.route("GET", "/held", held)
    async with client(200) as http:
        async with trio.open_nursery() as nursery:
            for _ in range(300):
                nursery.start_soon(http.get, upstream.base_url + "/held")
            with trio.fail_after(WAIT):
                await upstream.wait_for_connections(200)
                await upstream.wait_for_request("/held", 200)
            assert len(upstream.connections) == 200
            release.set()
    assert len(upstream.requests_for("/held")) == 300
