"""Search providers, server-side tools and the page reader, against scripted loopback
servers (``fakes/scripted.py``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx2
import pytest
import trio

from fakes.base import Exchange
from fakes.scripted import (
    Script,
    ScriptedServer,
    constant,
    endless,
    json_answer,
    respond,
    stall_after_headers,
)
from server.config import Settings, SettingsError
from server.providers.search.base import SearchError
from server.providers.search.brave import BraveSearch
from server.providers.search.factory import build_search_provider
from server.providers.search.local import LocalSearch, fts_match_expression
from server.providers.search.searxng import SearxngSearch
from server.providers.search.tavily import TavilySearch
from server.providers.tools.base import ToolError
from server.providers.tools.calculator import CalculatorTool, evaluate
from server.providers.tools.current_time import CurrentTimeTool
from server.providers.tools.fetch_url import FetchUrlTool
from server.providers.tools.registry import build_tools
from server.providers.web.base import PageError
from server.providers.web.fetch import HttpPageReader, fetch_page
from server.providers.web.text import extract_text

# --------------------------------------------------------------------------- loopback servers
# Each server answers with a script (fakes/scripted.py) that writes the response by hand,
# which lets a test stall, trickle or flood a client.

Serve = Callable[[Script], Awaitable[ScriptedServer]]


@pytest.fixture
async def serve(nursery: trio.Nursery) -> AsyncIterator[Serve]:
    """``await serve(script)`` starts a loopback server answering every request with
    ``script``; a script that crashed fails the test."""
    servers: list[ScriptedServer] = []

    async def start(script: Script) -> ScriptedServer:
        server = ScriptedServer(script)
        await server.start(nursery)
        servers.append(server)
        return server

    yield start
    for server in servers:
        assert not server.errors, "a script crashed:\n" + "\n".join(server.errors)


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    # trust_env=False: no proxy from the environment may stand between us and loopback.
    async with httpx2.AsyncClient(trust_env=False) as client:
        yield client


async def wait_client_left(server: ScriptedServer) -> None:
    """The connection that carried the server's only request gets closed by the client."""
    (request,) = server.requests
    with trio.fail_after(5):
        conn = await server.wait_connection_closed(request.conn_id)
    assert conn.closed_by == "client"


# --------------------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("2 ^ 10", "1024"),
        ("2 ** -1", "0.5"),
        ("7 // 2", "3"),
        ("7 % 3", "1"),
        ("10 / 4", "2.5"),
        ("10 / 2", "5"),
        ("-3 + +4", "1"),
        ("sqrt(16)", "4"),
        ("sqrt(2)", "1.41421356237"),
        ("round(2.567, 2)", "2.57"),
        ("max(3, 9, 4) - min(3, 9, 4)", "6"),
        ("abs(-12)", "12"),
        ("log(8, 2)", "3"),
        ("sin(0) + cos(0)", "1"),
        ("2 * pi", "6.28318530718"),
        ("e", "2.71828182846"),
        ("0.1 + 0.2", "0.3"),
        ("12345678901234567890 * 10", "123456789012345678900"),
    ],
)
async def test_calculator_evaluates_arithmetic(expression: str, expected: str) -> None:
    assert await CalculatorTool().run({"expression": expression}) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "__import__('os').system('true')",
        "open('/etc/passwd')",
        "x + 1",
        "(1).real",
        "pi.__class__",
        "'a' * 3",
        "[1, 2]",
        "True + 1",
        "lambda: 1",
        "1 if 1 else 2",
        "1 < 2",
        "sqrt(x=4)",
        "",
        "1 +",
    ],
)
async def test_calculator_rejects_anything_but_arithmetic(expression: str) -> None:
    with pytest.raises(ToolError):
        await CalculatorTool().run({"expression": expression})


@pytest.mark.parametrize(
    "expression", ["9 ** 99999", "2 ** 10 ** 10", "10 ** 3000 * 10 ** 3000", "1e300 ** 2"]
)
async def test_calculator_refuses_huge_results(expression: str) -> None:
    with pytest.raises(ToolError):
        evaluate(expression)


@pytest.mark.parametrize("expression", ["1 / 0", "1 // 0", "5 % 0", "0 ** -1"])
async def test_calculator_reports_division_by_zero(expression: str) -> None:
    with pytest.raises(ToolError, match="division by zero"):
        evaluate(expression)


async def test_calculator_refuses_deep_nesting_and_long_input() -> None:
    with pytest.raises(ToolError):
        evaluate("-" * 500 + "1")
    with pytest.raises(ToolError):
        evaluate("1+" * 600 + "1")


async def test_calculator_needs_an_expression_string() -> None:
    with pytest.raises(ToolError):
        await CalculatorTool().run({})
    with pytest.raises(ToolError):
        await CalculatorTool().run({"expression": 42})


# --------------------------------------------------------------------------- other tools


async def test_current_time_is_utc_iso_8601_by_default() -> None:
    fixed = datetime(2025, 3, 1, 12, 30, 5, tzinfo=UTC)
    tool = CurrentTimeTool(clock=lambda: fixed)
    assert await tool.run({}) == "2025-03-01T12:30:05+00:00"
    assert datetime.fromisoformat(await CurrentTimeTool().run({})).tzinfo is not None


async def test_current_time_converts_to_an_iana_zone() -> None:
    fixed = datetime(2025, 7, 1, 12, 0, 0, tzinfo=UTC)
    tool = CurrentTimeTool(clock=lambda: fixed)
    assert await tool.run({"timezone": "Europe/Paris"}) == "2025-07-01T14:00:00+02:00"


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", 5])
async def test_current_time_rejects_unknown_zones(zone: object) -> None:
    with pytest.raises(ToolError):
        await CurrentTimeTool().run({"timezone": zone})


async def test_build_tools_names_the_three_tools_with_json_schemas(
    http: httpx2.AsyncClient,
) -> None:
    tools = build_tools(Settings(), HttpPageReader(http, Settings()))
    assert set(tools) == {"calculator", "current_time", "fetch_url"}
    for name, tool in tools.items():
        schema = tool.spec.openai_schema()
        assert schema["function"]["name"] == name
        assert schema["function"]["parameters"]["type"] == "object"
        json.dumps(schema)


async def test_fetch_url_tool_returns_title_and_text(
    serve: Serve, http: httpx2.AsyncClient
) -> None:
    page = b"<html><head><title>Cats</title></head><body><p>Cats purr.</p></body></html>"
    server = await serve(constant(200, page, "text/html; charset=utf-8"))
    tool = FetchUrlTool(HttpPageReader(http, Settings()))
    assert await tool.run({"url": server.base_url + "/cats"}) == "Title: Cats\n\nCats purr."


async def test_fetch_url_tool_turns_page_errors_into_tool_errors(
    serve: Serve, http: httpx2.AsyncClient
) -> None:
    server = await serve(constant(404, b"nope", "text/plain"))
    tool = FetchUrlTool(HttpPageReader(http, Settings()))
    with pytest.raises(ToolError, match="404"):
        await tool.run({"url": server.base_url + "/missing"})
    with pytest.raises(ToolError):
        await tool.run({"url": "file:///etc/passwd"})


# --------------------------------------------------------------------------- extract_text

ARTICLE = """<!doctype html>
<html><head><title> The  Daily   Fish </title>
<style>body { color: red }</style>
<script>var tracking = "SCRIPT-TEXT";</script>
</head>
<body>
<nav><a href="/">Home</a> <a href="/about">NAV-TEXT</a></nav>
<header>SITE-HEADER</header>
<main>
  <h1>Salmon swim upstream</h1>
  <p>Salmon   return to the
     river where they <b>hatched</b>.</p>
  <script>document.write("INLINE-SCRIPT")</script>
  <noscript>NOSCRIPT-TEXT</noscript>
  <svg><text>SVG-TEXT</text></svg>
  <template><p>TEMPLATE-TEXT</p></template>
  <div hidden>HIDDEN-TEXT</div>
  <ul><li>First</li><li>Second</li></ul>
  <p>Line one<br>Line two &amp; more</p>
</main>
<footer>FOOTER-TEXT</footer>
</body></html>
"""


def test_extract_text_gets_the_title_and_drops_non_prose() -> None:
    title, text = extract_text(ARTICLE)
    assert title == "The Daily Fish"
    assert "Salmon return to the river where they hatched." in text
    for junk in (
        "SCRIPT-TEXT", "INLINE-SCRIPT", "color: red", "NOSCRIPT-TEXT", "SVG-TEXT",
        "TEMPLATE-TEXT", "HIDDEN-TEXT", "NAV-TEXT", "SITE-HEADER", "FOOTER-TEXT",
    ):  # fmt: skip
        assert junk not in text


def test_extract_text_keeps_paragraph_breaks() -> None:
    _, text = extract_text(ARTICLE)
    assert text.split("\n\n") == [
        "Salmon swim upstream",
        "Salmon return to the river where they hatched.",
        "First",
        "Second",
        "Line one\nLine two & more",
    ]


def test_extract_text_prefers_a_lone_article_and_falls_back_to_the_body() -> None:
    html = "<body><div>MENU</div><article><p>The story.</p></article></body>"
    assert extract_text(html) == ("", "The story.")
    assert extract_text("<p>Just a <i>fragment</i></p>") == ("", "Just a fragment")
    assert extract_text("") == ("", "")


def test_extract_text_takes_the_first_heading_when_there_is_no_title() -> None:
    assert extract_text("<body><h1>Heading</h1><p>Body</p></body>")[0] == "Heading"


def test_extract_text_survives_very_deep_nesting() -> None:
    html = "<div>" * 5000 + "deep" + "</div>" * 5000
    assert extract_text(html)[1] == "deep"


# --------------------------------------------------------------------------- fetch_page


async def test_fetch_page_reads_html(serve: Serve, http: httpx2.AsyncClient) -> None:
    server = await serve(constant(200, ARTICLE.encode(), "text/html; charset=utf-8"))
    page = await fetch_page(
        http, server.base_url + "/fish", timeout=5, max_bytes=1_000_000, max_chars=10_000
    )
    assert page.title == "The Daily Fish"
    assert page.text.startswith("Salmon swim upstream")
    assert page.url == server.base_url + "/fish"
    assert not page.truncated


async def test_fetch_page_extracts_big_documents(serve: Serve, http: httpx2.AsyncClient) -> None:
    paragraphs = "".join(f"<p>Paragraph number {i}.</p>" for i in range(10_000))
    html = f"<html><head><title>Big</title></head><body>{paragraphs}</body></html>".encode()
    server = await serve(constant(200, html, "text/html"))
    page = await fetch_page(http, server.base_url, timeout=10, max_bytes=2_000_000, max_chars=100)
    assert page.title == "Big"
    assert page.text.startswith("Paragraph number 0.\n\nParagraph number 1.")
    assert len(page.text) <= 100
    assert page.truncated


async def test_fetch_page_keeps_plain_text_and_markdown(
    serve: Serve, http: httpx2.AsyncClient
) -> None:
    text_server = await serve(constant(200, b"  plain <b>words</b>\n", "text/plain"))
    page = await fetch_page(http, text_server.base_url, timeout=5, max_bytes=1000, max_chars=1000)
    assert (page.title, page.text) == ("", "plain <b>words</b>")

    md_server = await serve(constant(200, b"# Notes\n\nSome *text*.", "text/markdown"))
    page = await fetch_page(http, md_server.base_url, timeout=5, max_bytes=1000, max_chars=1000)
    assert (page.title, page.text) == ("Notes", "# Notes\n\nSome *text*.")


async def test_fetch_page_decodes_the_declared_charset(
    serve: Serve, http: httpx2.AsyncClient
) -> None:
    body = "<title>Café</title><p>Crème brûlée</p>".encode("latin-1")
    server = await serve(constant(200, body, "text/html; charset=ISO-8859-1"))
    page = await fetch_page(http, server.base_url, timeout=5, max_bytes=1000, max_chars=1000)
    assert (page.title, page.text) == ("Café", "Crème brûlée")


async def test_fetch_page_replaces_undecodable_bytes(
    serve: Serve, http: httpx2.AsyncClient
) -> None:
    server = await serve(constant(200, b"ok \xff\xfe end", "text/plain"))
    page = await fetch_page(http, server.base_url, timeout=5, max_bytes=1000, max_chars=1000)
    assert page.text == "ok \ufffd\ufffd end"


async def test_fetch_page_size_cap_truncates_and_closes_the_connection(
    serve: Serve, http: httpx2.AsyncClient
) -> None:
    server = await serve(endless(b"all work and no play " * 1000))
    page = await fetch_page(http, server.base_url, timeout=5, max_bytes=50_000, max_chars=1_000_000)
    assert page.truncated
    assert page.text.startswith("all work and no play")
    assert len(page.text) <= 50_000
    await wait_client_left(server)


async def test_fetch_page_timeout_is_a_page_error_and_closes_the_connection(
    serve: Serve, http: httpx2.AsyncClient
) -> None:
    server = await serve(stall_after_headers())
    with pytest.raises(PageError, match="timed out"):
        await fetch_page(http, server.base_url, timeout=0.2, max_bytes=1000, max_chars=1000)
    await wait_client_left(server)


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png"),
        (b"%PDF-1.7\n", "application/pdf"),
        (b'{"a": 1}', "application/json"),
        (b"\x00\x01\x02\x03binary", None),
    ],
)
async def test_fetch_page_refuses_content_that_is_not_text(
    serve: Serve, http: httpx2.AsyncClient, body: bytes, content_type: str | None
) -> None:
    server = await serve(constant(200, body, content_type))
    with pytest.raises(PageError, match="unsupported content"):
        await fetch_page(http, server.base_url, timeout=5, max_bytes=1000, max_chars=1000)


async def test_fetch_page_reports_http_errors(serve: Serve, http: httpx2.AsyncClient) -> None:
    server = await serve(constant(503, b"busy", "text/html"))
    with pytest.raises(PageError, match="HTTP 503"):
        await fetch_page(http, server.base_url, timeout=5, max_bytes=1000, max_chars=1000)


async def test_fetch_page_follows_redirects(serve: Serve, http: httpx2.AsyncClient) -> None:
    async def moved(ex: Exchange) -> None:
        await respond(ex, 302, b"", None, [("location", "/new")])

    server = await serve(constant(200, b"<title>New</title><p>moved</p>", "text/html"))
    server.route("GET", "/old", moved)
    page = await fetch_page(
        http, server.base_url + "/old", timeout=5, max_bytes=1000, max_chars=1000
    )
    assert (page.url, page.title, page.text) == (server.base_url + "/new", "New", "moved")


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/file", "file:///etc/passwd", "javascript:alert(1)", "http://", "x"]
)
async def test_fetch_page_only_fetches_http_urls(http: httpx2.AsyncClient, url: str) -> None:
    with pytest.raises(PageError):
        await fetch_page(http, url, timeout=5, max_bytes=1000, max_chars=1000)


async def test_fetch_page_connection_refused_is_a_page_error(http: httpx2.AsyncClient) -> None:
    url = await _closed_port_url()
    with pytest.raises(PageError):
        await fetch_page(http, url, timeout=5, max_bytes=1000, max_chars=1000)


async def _closed_port_url() -> str:
    listener = trio.socket.socket()
    await listener.bind(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.close()
    return f"http://127.0.0.1:{port}"


# --------------------------------------------------------------------------- web search APIs


async def test_searxng_asks_for_json_and_reads_results(
    serve: Serve, http: httpx2.AsyncClient
) -> None:
    answer = {
        "results": [
            {"url": "https://a.example/", "title": "A", "content": "about a"},
            {"title": "no url"},
            {"url": "https://b.example/", "title": "B &amp; b", "content": "about <b>b</b>"},
            {"url": "https://c.example/", "title": "C", "content": "about c"},
        ]
    }
    server = await serve(json_answer(answer))
    results = await SearxngSearch(http, server.base_url + "/", timeout=5).search(
        "trio nurseries", 2
    )
    assert [(r.url, r.title, r.snippet) for r in results] == [
        ("https://a.example/", "A", "about a"),
        ("https://b.example/", "B & b", "about b"),
    ]
    (request,) = server.requests
    assert (request.method, request.path) == ("GET", "/search")
    assert parse_qs(request.raw_query) == {"q": ["trio nurseries"], "format": ["json"]}


async def test_brave_sends_the_key_and_reads_web_results(
    serve: Serve, http: httpx2.AsyncClient
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
    server = await serve(json_answer(answer))
    brave = BraveSearch(http, "brave-key", base_url=server.base_url, timeout=5)
    results = await brave.search("trio", 3)
    assert [(r.url, r.title, r.snippet) for r in results] == [
        ("https://trio.example/", "Trio", "A friendly async library")
    ]
    (request,) = server.requests
    assert request.path == "/res/v1/web/search"
    assert parse_qs(request.raw_query) == {"q": ["trio"], "count": ["3"]}
    assert request.headers["x-subscription-token"] == "brave-key"


async def test_brave_without_a_web_section_has_no_results(
    serve: Serve, http: httpx2.AsyncClient
) -> None:
    server = await serve(json_answer({"type": "search", "query": {"original": "zzz"}}))
    brave = BraveSearch(http, "k", base_url=server.base_url, timeout=5)
    assert await brave.search("zzz", 3) == []


async def test_tavily_posts_the_query_with_a_bearer_key(
    serve: Serve, http: httpx2.AsyncClient
) -> None:
    answer = {"results": [{"url": "https://t.example/", "title": "T", "content": "tee"}]}
    server = await serve(json_answer(answer))
    tavily = TavilySearch(http, "tvly-key", base_url=server.base_url, timeout=5)
    results = await tavily.search("what is trio", 4)
    assert [(r.url, r.title, r.snippet) for r in results] == [("https://t.example/", "T", "tee")]
    (request,) = server.requests
    assert (request.method, request.path) == ("POST", "/search")
    assert request.headers["authorization"] == "Bearer tvly-key"
    assert json.loads(request.body) == {"query": "what is trio", "max_results": 4}


def _providers(http: httpx2.AsyncClient, url: str, timeout: float = 5) -> list[Any]:
    return [
        SearxngSearch(http, url, timeout=timeout),
        BraveSearch(http, "k", base_url=url, timeout=timeout),
        TavilySearch(http, "k", base_url=url, timeout=timeout),
    ]


@pytest.mark.parametrize("index", [0, 1, 2], ids=["searxng", "brave", "tavily"])
async def test_search_bad_json_is_a_search_error(
    serve: Serve, http: httpx2.AsyncClient, index: int
) -> None:
    server = await serve(constant(200, b"{not json", "application/json"))
    provider = _providers(http, server.base_url)[index]
    with pytest.raises(SearchError, match="not valid JSON"):
        await provider.search("q", 3)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["searxng", "brave", "tavily"])
async def test_search_server_error_is_a_search_error(
    serve: Serve, http: httpx2.AsyncClient, index: int
) -> None:
    server = await serve(constant(500, b'{"error": "boom"}', "application/json"))
    provider = _providers(http, server.base_url)[index]
    with pytest.raises(SearchError, match="HTTP 500"):
        await provider.search("q", 3)


@pytest.mark.parametrize("index", [0, 1, 2], ids=["searxng", "brave", "tavily"])
@pytest.mark.parametrize(
    "answer", [[1, 2], {"results": "nope", "web": {"results": "nope"}}, {"web": []}, "text"]
)
async def test_search_answer_of_the_wrong_shape_is_a_search_error(
    serve: Serve, http: httpx2.AsyncClient, index: int, answer: Any
) -> None:
    server = await serve(json_answer(answer))
    provider = _providers(http, server.base_url)[index]
    with pytest.raises(SearchError, match="unexpected answer shape"):
        await provider.search("q", 3)


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
    provider = SearxngSearch(http, await _closed_port_url(), timeout=5)
    with pytest.raises(SearchError, match="could not connect"):
        await provider.search("q", 3)


# --------------------------------------------------------------------------- local search


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    _write(tmp_path, "nurseries.md", "# Nurseries\n\nA nursery waits for every child task.\n")
    _write(tmp_path, "guide/cancel.md", "# Cancel scopes\n\nCancelling a scope stops its tasks.")
    _write(tmp_path, "notes.txt", "Plain notes about penguins and their habits.")
    _write(tmp_path, "untitled.markdown", "No heading here, only otters.")
    _write(tmp_path, "image.png", "penguins penguins penguins")
    _write(tmp_path, ".hidden/secret.md", "# Secret\n\npenguins")
    return tmp_path


async def test_local_search_finds_documents_by_word(corpus: Path) -> None:
    results = await LocalSearch(corpus).search("how do I cancel?", 5)
    assert [r.url for r in results] == ["/api/local-docs/guide/cancel.md"]
    (result,) = results
    assert result.title == "Cancel scopes"
    assert "Cancelling a scope" in result.snippet
    assert result.content == "# Cancel scopes\n\nCancelling a scope stops its tasks."


async def test_local_search_stems_and_ranks(corpus: Path) -> None:
    results = await LocalSearch(corpus).search("nurseries tasks", 5)
    assert results[0].url == "/api/local-docs/nurseries.md"
    assert {r.url for r in results} == {"/api/local-docs/nurseries.md",
                                        "/api/local-docs/guide/cancel.md"}


async def test_local_search_titles_and_file_types(corpus: Path) -> None:
    index = await LocalSearch.build(corpus)
    penguins = await index.search("penguins", 5)
    assert [(r.url, r.title) for r in penguins] == [("/api/local-docs/notes.txt", "notes.txt")]
    otters = await index.search("otters", 5)
    assert [(r.url, r.title) for r in otters] == [
        ("/api/local-docs/untitled.markdown", "untitled.markdown")
    ]


async def test_local_search_reads_back_indexed_documents_only(corpus: Path) -> None:
    _write(corpus.parent, "outside.md", "# Outside\n\npenguins")
    index = LocalSearch(corpus, max_content_chars=10)
    # The whole text, whatever the cap on a result's content.
    assert await index.document("guide/cancel.md") == (
        "# Cancel scopes\n\nCancelling a scope stops its tasks.")
    for path in ("../outside.md", "guide/../nurseries.md", "/nurseries.md", ".hidden/secret.md",
                 "image.png", "missing.md", "guide", ""):
        assert await index.document(path) is None, path


async def test_local_search_urls_are_percent_encoded(tmp_path: Path) -> None:
    _write(tmp_path, "two words/ünïcode #1.md", "# Walruses\n\nWalruses dive.")
    [result] = await LocalSearch(tmp_path).search("walruses", 3)
    assert result.url == "/api/local-docs/two%20words/%C3%BCn%C3%AFcode%20%231.md"


async def test_local_search_caps_content_and_count(tmp_path: Path) -> None:
    for i in range(5):
        _write(tmp_path, f"doc{i}.md", f"# Doc {i}\n\n" + "walrus " * 1000)
    results = await LocalSearch(tmp_path, max_content_chars=50).search("walrus", 3)
    assert len(results) == 3
    assert all(r.content is not None and len(r.content) == 50 for r in results)


@pytest.mark.parametrize(
    "query",
    [
        '"AND OR NEAR( *',
        'title:secret OR "',
        "NEAR(a b, 3)",
        "* ^ - + ()",
        "AND",
        "'; DROP TABLE docs; --",
        "cancel\x00scope",
        "🐧 émoji",
    ],
)
async def test_local_search_survives_fts_syntax_in_queries(corpus: Path, query: str) -> None:
    results = await LocalSearch(corpus).search(query, 5)
    assert isinstance(results, list)


def test_fts_match_expression_quotes_every_word() -> None:
    assert fts_match_expression('"AND OR NEAR( *') == '"near"'
    assert fts_match_expression("x-y x") == '"x" OR "y"'
    assert fts_match_expression("how do I cancel a task?") == '"cancel" OR "task"'
    assert fts_match_expression("what is it") == '"what" OR "is" OR "it"'
    assert fts_match_expression(" ?! ") is None


async def test_local_search_of_a_missing_or_empty_folder_has_no_results(tmp_path: Path) -> None:
    assert await LocalSearch(tmp_path / "missing").search("anything", 3) == []
    assert await LocalSearch(tmp_path).search("anything", 3) == []
    assert await LocalSearch(tmp_path).search("", 3) == []


async def test_concurrent_first_searches_share_one_index(corpus: Path) -> None:
    index = LocalSearch(corpus)
    found: list[int] = []

    async def one() -> None:
        found.append(len(await index.search("penguins", 5)))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
    assert found == [1] * 10


async def test_the_project_docs_are_searchable() -> None:
    index = LocalSearch(Settings().search_local_dir)
    results = await index.search("cancel scope", 3)
    assert results
    assert all(r.url.startswith("/api/local-docs/") and r.content for r in results)


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
