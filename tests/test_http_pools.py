"""The outgoing clients' pools (server/providers/net/client.py): a client with a large
connection limit has several httpcore pools, filled in order. At low load every request
goes to the first pool and reuses its connection; under load the others take the overflow;
the limit holds in all; a pool left unused past the keep-alive expiry has its idle
connections closed; closing the client closes every connection."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import pytest
import trio

from fakes.scripted import Exchange, ScriptedServer, json_answer
from server.providers.net.client import client_with_backend
from server.providers.net.tls_safe import TlsSafeBackend

WAIT = 10


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer(json_answer({"ok": True}))
    await server.start(nursery)
    yield server
    assert not server.errors, "a script crashed:\n" + "\n".join(server.errors)


def client(max_connections: int, keepalive_expiry: float = 5.0) -> httpx2.AsyncClient:
    return client_with_backend(
        TlsSafeBackend(),
        httpx2.Limits(
            max_connections=max_connections,
            max_keepalive_connections=max_connections,
            keepalive_expiry=keepalive_expiry,
        ),
        httpx2.Timeout(WAIT),
    )


def held_route(upstream: ScriptedServer) -> trio.Event:
    """``GET /held`` answers once the returned event is set."""
    release = trio.Event()

    async def held(ex: Exchange) -> None:
        await release.wait()
        await ex.respond_json({"ok": True})

    upstream.route("GET", "/held", held)
    return release


async def test_a_small_client_reuses_one_connection(upstream: ScriptedServer) -> None:
    async with client(100) as http:
        for _ in range(6):
            assert (await http.get(upstream.base_url + "/x")).json() == {"ok": True}
    assert len(upstream.connections) == 1


async def test_a_large_client_reuses_one_connection_at_low_load(
    upstream: ScriptedServer,
) -> None:
    """400 connections allowed (four pools): eight requests one after another all go to
    the first pool and use one connection; closing the client closes it."""
    async with client(400) as http:
        for _ in range(8):
            assert (await http.get(upstream.base_url + "/x")).json() == {"ok": True}
        conns = upstream.connections
        assert len(conns) == 1
        assert len(conns[0].paths) == 8
    with trio.fail_after(WAIT):
        await upstream.wait_connection_closed(conns[0].id)


async def test_the_overflow_goes_to_the_next_pools_and_their_idle_connections_expire(
    upstream: ScriptedServer,
) -> None:
    """150 requests held at once open 150 connections, more than one pool has (100): the
    first pool takes 25, the next ones the rest. Once they are answered, requests one
    after another go to the first pool only; when the others have been unused past the
    keep-alive expiry, their idle connections are closed at such a request, and the first
    pool's one stays."""
    release = held_route(upstream)
    async with client(400, keepalive_expiry=0.3) as http:
        async with trio.open_nursery() as nursery:
            for _ in range(150):
                nursery.start_soon(http.get, upstream.base_url + "/held")
            with trio.fail_after(WAIT):
                await upstream.wait_for_request("/held", 150)
            assert len(upstream.connections) == 150
            release.set()
        with trio.fail_after(WAIT):
            # Requests one after another, until the overflow pools' connections are gone.
            while len(upstream.open_connections()) > 1:
                assert (await http.get(upstream.base_url + "/x")).json() == {"ok": True}
                await trio.sleep(0.05)  # the pace of the requests, not a wait for a result
        assert len(upstream.open_connections()) == 1
    with trio.fail_after(WAIT):
        await upstream.wait_all_closed()


async def test_a_large_client_keeps_its_limit_shared_out(upstream: ScriptedServer) -> None:
    """The limit holds in all: requests beyond it wait for a connection. Here 200 allowed
    (two pools of 100) and 300 held open at once: 200 connections, the rest queued."""
    release = held_route(upstream)
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
