"""Reading a web page (server/providers/web/fetch.py, ``fetch_page``): what it makes of an
answer (HTML, plain text, Markdown, a charset, bytes that are not text, an HTTP error, a
redirect) and what it does to its connection (the size cap and the timeout close it). What
it makes of an answer needs no connection: those pages come from httpx2's MockTransport
(tests/mock_upstream.py). Closing a connection needs one: those tests keep real loopback
servers (fakes/scripted.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx2
import pytest

from fakes.scripted import endless, stall_after_headers
from server.providers.web.base import PageError
from server.providers.web.fetch import fetch_page
from tests.connection_checks import closed_port_url, wait_client_left
from tests.mock_upstream import MockUpstream
from tests.scripted import Serve
from tests.test_page_text import ARTICLE


@pytest.fixture
def upstream() -> MockUpstream:
    return MockUpstream("http://pages.test")


@pytest.fixture
async def pages(upstream: MockUpstream) -> AsyncIterator[httpx2.AsyncClient]:
    """A client whose every request ``upstream`` answers."""
    async with upstream.client() as client:
        yield client


def page(status: int, body: bytes, content_type: str | None) -> httpx2.Response:
    """A whole answer; ``content_type=None`` sends no Content-Type header at all."""
    headers = {} if content_type is None else {"content-type": content_type}
    return httpx2.Response(status, content=body, headers=headers)


# --------------------------------------------------------------------------- what it reads


async def test_fetch_page_reads_html(upstream: MockUpstream, pages: httpx2.AsyncClient) -> None:
    upstream.answer_everything(page(200, ARTICLE.encode(), "text/html; charset=utf-8"))
    read = await fetch_page(
        pages, upstream.base_url + "/fish", timeout=5, max_bytes=1_000_000, max_chars=10_000
    )
    assert read.title == "The Daily Fish"
    assert read.text.startswith("Salmon swim upstream")
    assert read.url == upstream.base_url + "/fish"
    assert not read.truncated


async def test_fetch_page_extracts_big_documents(
    upstream: MockUpstream, pages: httpx2.AsyncClient
) -> None:
    paragraphs = "".join(f"<p>Paragraph number {i}.</p>" for i in range(10_000))
    html = f"<html><head><title>Big</title></head><body>{paragraphs}</body></html>".encode()
    upstream.answer_everything(page(200, html, "text/html"))
    read = await fetch_page(
        pages, upstream.base_url, timeout=10, max_bytes=2_000_000, max_chars=100
    )
    assert read.title == "Big"
    assert read.text.startswith("Paragraph number 0.\n\nParagraph number 1.")
    assert len(read.text) <= 100
    assert read.truncated


async def test_fetch_page_keeps_plain_text_and_markdown(
    upstream: MockUpstream, pages: httpx2.AsyncClient
) -> None:
    upstream.route("GET", "/text", page(200, b"  plain <b>words</b>\n", "text/plain"))
    upstream.route("GET", "/md", page(200, b"# Notes\n\nSome *text*.", "text/markdown"))
    read = await fetch_page(
        pages, upstream.base_url + "/text", timeout=5, max_bytes=1000, max_chars=1000
    )
    assert (read.title, read.text) == ("", "plain <b>words</b>")

    read = await fetch_page(
        pages, upstream.base_url + "/md", timeout=5, max_bytes=1000, max_chars=1000
    )
    assert (read.title, read.text) == ("Notes", "# Notes\n\nSome *text*.")


async def test_fetch_page_decodes_the_declared_charset(
    upstream: MockUpstream, pages: httpx2.AsyncClient
) -> None:
    body = "<title>Café</title><p>Crème brûlée</p>".encode("latin-1")
    upstream.answer_everything(page(200, body, "text/html; charset=ISO-8859-1"))
    read = await fetch_page(pages, upstream.base_url, timeout=5, max_bytes=1000, max_chars=1000)
    assert (read.title, read.text) == ("Café", "Crème brûlée")


async def test_fetch_page_replaces_undecodable_bytes(
    upstream: MockUpstream, pages: httpx2.AsyncClient
) -> None:
    upstream.answer_everything(page(200, b"ok \xff\xfe end", "text/plain"))
    read = await fetch_page(pages, upstream.base_url, timeout=5, max_bytes=1000, max_chars=1000)
    assert read.text == "ok \ufffd\ufffd end"


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
    upstream: MockUpstream, pages: httpx2.AsyncClient, body: bytes, content_type: str | None
) -> None:
    upstream.answer_everything(page(200, body, content_type))
    with pytest.raises(PageError, match="unsupported content"):
        await fetch_page(pages, upstream.base_url, timeout=5, max_bytes=1000, max_chars=1000)


async def test_fetch_page_reports_http_errors(
    upstream: MockUpstream, pages: httpx2.AsyncClient
) -> None:
    upstream.answer_everything(page(503, b"busy", "text/html"))
    with pytest.raises(PageError, match="HTTP 503"):
        await fetch_page(pages, upstream.base_url, timeout=5, max_bytes=1000, max_chars=1000)


async def test_fetch_page_follows_redirects(
    upstream: MockUpstream, pages: httpx2.AsyncClient
) -> None:
    upstream.route("GET", "/old", httpx2.Response(302, headers={"location": "/new"}))
    upstream.answer_everything(page(200, b"<title>New</title><p>moved</p>", "text/html"))
    read = await fetch_page(
        pages, upstream.base_url + "/old", timeout=5, max_bytes=1000, max_chars=1000
    )
    assert (read.url, read.title, read.text) == (upstream.base_url + "/new", "New", "moved")


@pytest.mark.parametrize(
    "url", ["ftp://127.0.0.1/file", "file:///etc/passwd", "javascript:alert(1)", "http://", "x"]
)
async def test_fetch_page_only_fetches_http_urls(
    upstream: MockUpstream, pages: httpx2.AsyncClient, url: str
) -> None:
    with pytest.raises(PageError):
        await fetch_page(pages, url, timeout=5, max_bytes=1000, max_chars=1000)
    assert upstream.requests == []


# --------------------------------------------------------------------------- its connection


async def test_fetch_page_size_cap_truncates_and_closes_the_connection(
    serve: Serve, http: httpx2.AsyncClient
) -> None:
    server = await serve(endless(b"all work and no play " * 1000))
    read = await fetch_page(http, server.base_url, timeout=5, max_bytes=50_000, max_chars=1_000_000)
    assert read.truncated
    assert read.text.startswith("all work and no play")
    assert len(read.text) <= 50_000
    await wait_client_left(server)


async def test_fetch_page_timeout_is_a_page_error_and_closes_the_connection(
    serve: Serve, http: httpx2.AsyncClient
) -> None:
    server = await serve(stall_after_headers())
    with pytest.raises(PageError, match="timed out"):
        await fetch_page(http, server.base_url, timeout=0.2, max_bytes=1000, max_chars=1000)
    await wait_client_left(server)


async def test_fetch_page_connection_refused_is_a_page_error(http: httpx2.AsyncClient) -> None:
    url = await closed_port_url()
    with pytest.raises(PageError):
        await fetch_page(http, url, timeout=5, max_bytes=1000, max_chars=1000)
