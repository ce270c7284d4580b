"""The web search providers (server/providers/search/: SearXNG, Brave, Tavily) and the factory
that picks one from the settings. What each makes of an engine's answer (its results, bad
JSON, an error status, the wrong shape) needs no connection: those answers come from httpx2's
MockTransport (tests/mock_upstream.py). A timeout and a cancel must close the connection, and
a refused one must be reported: those tests keep real loopback servers (fakes/scripted.py)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import parse_qs

import httpx2
import pytest
import trio

from fakes.scripted import stall_after_headers
from server.config import Settings, SettingsError
from server.providers.search.base import SearchError
from server.providers.search.brave import BraveSearch
from server.providers.search.factory import build_search_provider
from server.providers.search.local import LocalSearch
from server.providers.search.searxng import SearxngSearch
from server.providers.search.tavily import TavilySearch
from tests.connection_checks import closed_port_url, wait_client_left
from tests.mock_upstream import MockUpstream, json_response
from tests.scripted import Serve


@pytest.fixture
def upstream() -> MockUpstream:
    return MockUpstream("http://search.test")


@pytest.fixture
async def engine(upstream: MockUpstream) -> AsyncIterator[httpx2.AsyncClient]:
    """A client whose every request ``upstream`` answers."""
    async with upstream.client() as client:
        yield client


def _providers(http: httpx2.AsyncClient, url: str, timeout: float = 5) -> list[Any]:
    return [
        SearxngSearch(http, url, timeout=timeout),
        BraveSearch(http, "k", base_url=url, timeout=timeout),
        TavilySearch(http, "k", base_url=url, timeout=timeout),
    ]


# --------------------------------------------------------------------------- their answers


async def test_searxng_asks_for_json_and_reads_results(
    upstream: MockUpstream, engine: httpx2.AsyncClient
) -> None:
    answer = {
        "results": [
            {"url": "https://a.example/", "title": "A", "content": "about a"},
            {"title": "no url"},
            {"url": "https://b.example/", "title": "B &amp; b", "content": "about <b>b</b>"},
            {"url": "https://c.example/", "title": "C", "content": "about c"},
        ]
    }
    upstream.answer_everything(json_response(answer))
    results = await SearxngSearch(engine, upstream.base_url + "/", timeout=5).search(
        "trio nurseries", 2
    )
    assert [(r.url, r.title, r.snippet) for r in results] == [
        ("https://a.example/", "A", "about a"),
        ("https://b.example/", "B & b", "about b"),
    ]
    (request,) = upstream.requests
    assert (request.method, request.url.path) == ("GET", "/search")
    assert parse_qs(request.url.query.decode()) == {"q": ["trio nurseries"], "format": ["json"]}


async def test_brave_sends_the_key_and_reads_web_results(
    upstream: MockUpstream, engine: httpx2.AsyncClient
) -> None:
    answer = {
        "type": "search",
        "web": {
            "results": [
                {
                    "url": "https://trio.example/",
                    "title": "Trio",
                    "description": "A <strong>friendly</strong> async library",
                }
            ]
        },
    }
    upstream.answer_everything(json_response(answer))
    brave = BraveSearch(engine, "brave-key", base_url=upstream.base_url, timeout=5)
    results = await brave.search("trio", 3)
    assert [(r.url, r.title, r.snippet) for r in results] == [
        ("https://trio.example/", "Trio", "A friendly async library")
    ]
    (request,) = upstream.requests
    assert request.url.path == "/res/v1/web/search"
    assert parse_qs(request.url.query.decode()) == {"q": ["trio"], "count": ["3"]}
    assert request.headers["x-subscription-token"] == "brave-key"


async def test_brave_without_a_web_section_has_no_results(
    upstream: MockUpstream, engine: httpx2.AsyncClient
) -> None:
    upstream.answer_everything(json_response({"type": "search", "query": {"original": "zzz"}}))
    brave = BraveSearch(engine, "k", base_url=upstream.base_url, timeout=5)
    assert await brave.search("zzz", 3) == []


async def test_tavily_posts_the_query_with_a_bearer_key(
    upstream: MockUpstream, engine: httpx2.AsyncClient
) -> None:
    answer = {"results": [{"url": "https://t.example/", "title": "T", "content": "tee"}]}
    upstream.answer_everything(json_response(answer))
    tavily = TavilySearch(engine, "tvly-key", base_url=upstream.base_url, timeout=5)
    results = await tavily.search("what is trio", 4)
    assert [(r.url, r.title, r.snippet) for r in results] == [("https://t.example/", "T", "tee")]
    (request,) = upstream.requests
    assert (request.method, request.url.path) == ("POST", "/search")
    assert request.headers["authorization"] == "Bearer tvly-key"
    assert json.loads(request.content) == {"query": "what is trio", "max_results": 4}


@pytest.mark.parametrize("index", [0, 1, 2], ids=["searxng", "brave", "tavily"])
async def test_search_bad_json_is_a_search_error(
    upstream: MockUpstream, engine: httpx2.AsyncClient, index: int
) -> None:
    upstream.answer_everything(
        httpx2.Response(200, content=b"{not json", headers={"content-type": "application/json"})
    )
    provider = _providers(engine, upstream.base_url)[index]
    with pytest.raises(SearchError, match="not valid JSON"):
        await provider.search("q", 3)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["searxng", "brave", "tavily"])
async def test_search_server_error_is_a_search_error(
    upstream: MockUpstream, engine: httpx2.AsyncClient, index: int
) -> None:
    upstream.answer_everything(json_response({"error": "boom"}, status=500))
    provider = _providers(engine, upstream.base_url)[index]
    with pytest.raises(SearchError, match="HTTP 500"):
        await provider.search("q", 3)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["searxng", "brave", "tavily"])
@pytest.mark.parametrize(
    "answer", [[1, 2], {"results": "nope", "web": {"results": "nope"}}, {"web": []}, "text"]
)
async def test_search_answer_of_the_wrong_shape_is_a_search_error(
    upstream: MockUpstream, engine: httpx2.AsyncClient, index: int, answer: Any
) -> None:
    upstream.answer_everything(json_response(answer))
    provider = _providers(engine, upstream.base_url)[index]
    with pytest.raises(SearchError, match="unexpected answer shape"):
        await provider.search("q", 3)


# --------------------------------------------------------------------------- their connection


@pytest.mark.parametrize("index", [0, 1, 2], ids=["searxng", "brave", "tavily"])
async def test_search_timeout_is_a_search_error_and_closes_the_connection(
    serve: Serve, http: httpx2.AsyncClient, index: int
) -> None:
    server = await serve(stall_after_headers())
    provider = _providers(http, server.base_url, timeout=0.2)[index]
    with pytest.raises(SearchError, match="no answer within"):
        await provider.search("q", 3)
    await wait_client_left(server)


async def test_cancelling_a_search_closes_its_connection(
    serve: Serve, http: httpx2.AsyncClient
) -> None:
    server = await serve(stall_after_headers())
    provider = SearxngSearch(http, server.base_url, timeout=60)
    outcome: list[str] = []

    async def search(cancel_scope: trio.CancelScope) -> None:
        with cancel_scope:
            await provider.search("q", 3)
            outcome.append("returned")

    scope = trio.CancelScope()
    with trio.fail_after(5):
        async with trio.open_nursery() as inner:
            inner.start_soon(search, scope)
            await server.wait_for_request()
            scope.cancel()
    await wait_client_left(server)
    assert outcome == []
    assert scope.cancelled_caught


async def test_search_connection_refused_is_a_search_error(http: httpx2.AsyncClient) -> None:
    provider = SearxngSearch(http, await closed_port_url(), timeout=5)
    with pytest.raises(SearchError, match="could not connect"):
        await provider.search("q", 3)


# --------------------------------------------------------------------------- factory


async def test_factory_builds_each_provider(http: httpx2.AsyncClient) -> None:
    base = Settings()
    assert isinstance(build_search_provider(base, http), LocalSearch)
    searxng = base.with_overrides(search_provider="searxng", searxng_url="http://127.0.0.1:1")
    assert isinstance(build_search_provider(searxng, http), SearxngSearch)
    brave = base.with_overrides(search_provider="Brave", brave_api_key="k")
    assert isinstance(build_search_provider(brave, http), BraveSearch)
    tavily = base.with_overrides(search_provider="tavily", tavily_api_key="k")
    assert isinstance(build_search_provider(tavily, http), TavilySearch)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"search_provider": "bing"}, "not one of"),
        ({"search_provider": "searxng"}, "TETHER_SEARXNG_URL"),
        ({"search_provider": "searxng", "searxng_url": "127.0.0.1:8888"}, "TETHER_SEARXNG_URL"),
        ({"search_provider": "brave"}, "TETHER_BRAVE_API_KEY"),
        ({"search_provider": "tavily"}, "TETHER_TAVILY_API_KEY"),
    ],
)
async def test_factory_explains_bad_settings(
    http: httpx2.AsyncClient, overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        build_search_provider(Settings().with_overrides(**overrides), http)
