"""Fetching a web page: one streamed GET, capped in time and size, and its readable text.

The network part ends before the HTML part begins (``text.extract_text``): the response is
closed first, so a worker thread that parses a big document never holds a connection that
a cancel should have closed. Which addresses may be reached is the client's to say (the
server's page client connects to public addresses only: ``net.public_only``).
"""

from __future__ import annotations

import codecs
from contextlib import aclosing
from urllib.parse import urlsplit

import httpx2
import trio

from server.config import Settings
from server.providers.web.base import Page, PageError
from server.providers.web.markdown import markdown_title
from server.providers.web.text import extract_text

__all__ = ["HttpPageReader", "fetch_page"]

# Parsing is fast (tens of MB/s), but a 2 MB page still costs tens of milliseconds, which
# is too long to hold the event loop; small pages are not worth a thread hop.
THREAD_THRESHOLD_CHARS = 50_000

_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml"})
_TEXT_TYPES = frozenset({"text/plain", "text/markdown", "text/x-markdown"})
_MARKDOWN_TYPES = frozenset({"text/markdown", "text/x-markdown"})

_REQUEST_HEADERS = {
    "User-Agent": "Tether/0.1 (page reader)",
    "Accept": (
        "text/html,application/xhtml+xml;q=0.9,text/plain;q=0.8,text/markdown;q=0.8,*/*;q=0.1"
    ),
}


class HttpPageReader:
    """The server's ``PageReader``: ``fetch_page`` over the page client, with the page
    limits of the settings."""

    def __init__(self, http: httpx2.AsyncClient, settings: Settings) -> None:
        self._http = http
        self._timeout = settings.page_timeout_s
        self._max_bytes = settings.page_max_bytes
        self._max_chars = settings.page_max_chars

    async def read(self, url: str) -> Page:
        """See ``fetch_page``; cancelling it closes the connection."""
        return await fetch_page(
            self._http,
            url,
            timeout=self._timeout,
            max_bytes=self._max_bytes,
            max_chars=self._max_chars,
        )


async def fetch_page(
    http: httpx2.AsyncClient,
    url: str,
    *,
    timeout: float,
    max_bytes: int,
    max_chars: int,
) -> Page:
    """GET ``url`` with ``http`` and return its readable text.

    Which addresses may be reached is the client's to say: the server's page client
    connects to public addresses only, checked where it connects (``net.public_only``),
    unless ``TETHER_FETCH_ALLOW_PRIVATE`` is set.

    Only http and https URLs are fetched. The whole call (connect, body, extraction) is
    bounded by ``timeout`` seconds; at most ``max_bytes`` of body are read (then the
    response is closed and the page is marked ``truncated``), and the text is capped at
    ``max_chars``. HTML and XHTML are reduced to their readable text, plain text and
    Markdown are kept as they are, anything else is refused. Every failure is a
    ``PageError`` whose message says what went wrong (it does not repeat the URL).

    Cancelling it closes the connection to the web server; a parse running in a
    worker thread is abandoned (it holds no connection).
    """
    _check_url(url)
    try:
        with trio.fail_after(timeout):
            final_url, media_type, body, truncated, charset = await _download(http, url, max_bytes)
            text = _decode(body, charset)
            if media_type in _HTML_TYPES:
                if len(text) > THREAD_THRESHOLD_CHARS:
                    title, readable = await trio.to_thread.run_sync(
                        extract_text, text, abandon_on_cancel=True
                    )
                else:
                    title, readable = extract_text(text)
            else:
                readable = text.strip()
                title = (markdown_title(readable) if media_type in _MARKDOWN_TYPES else None) or ""
    except trio.TooSlowError:
        raise PageError(f"timed out after {timeout:g} s") from None

    if len(readable) > max_chars:
        readable = readable[:max_chars].rstrip()
        truncated = True
    return Page(url=final_url, title=title, text=readable, truncated=truncated)


def _check_url(url: str) -> None:
    try:
        parts = urlsplit(url)
    except ValueError as exc:
        raise PageError(f"{url!r} is not a valid URL: {exc}") from None
    if parts.scheme.lower() not in ("http", "https"):
        raise PageError(f"{url!r}: only http and https URLs can be fetched")
    if not parts.hostname:
        raise PageError(f"{url!r} has no host")


_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_MAX_REDIRECTS = 5


async def _download(
    http: httpx2.AsyncClient, url: str, max_bytes: int
) -> tuple[str, str, bytes, bool, str | None]:
    """(final url, media type, body, truncated, charset); the response is closed on return.

    Redirects are followed here, not by the client, so that every hop's URL is checked."""
    for _ in range(_MAX_REDIRECTS + 1):
        result = await _read_body(http, url, max_bytes)
        if isinstance(result, tuple):
            return result
        url = result
        _check_url(url)
    raise PageError(f"more than {_MAX_REDIRECTS} redirects")


async def _read_body(
    http: httpx2.AsyncClient, url: str, max_bytes: int
) -> tuple[str, str, bytes, bool, str | None] | str:
    """One GET: the page, or the URL it redirects to."""
    chunks: list[bytes] = []
    size = 0
    truncated = False
    try:
        async with http.stream(
            "GET", url, headers=_REQUEST_HEADERS, follow_redirects=False
        ) as response:
            final_url = str(response.url)
            if response.status_code in _REDIRECTS and "location" in response.headers:
                return str(response.url.join(response.headers["location"]))
            if not 200 <= response.status_code < 300:
                reason = response.reason_phrase or ""
                raise PageError(f"HTTP {response.status_code} {reason}".rstrip())
            content_type = response.headers.get("content-type", "")
            media_type = content_type.split(";", 1)[0].strip().lower()
            if media_type and media_type not in _HTML_TYPES | _TEXT_TYPES:
                # Refused before a byte of the body is read; leaving the block closes it.
                raise PageError(f"unsupported content type {media_type!r}")
            async with aclosing(response.aiter_bytes()) as body:
                async for chunk in body:
                    room = max_bytes - size
                    if len(chunk) >= room:
                        chunks.append(chunk[:room])
                        size += room
                        # Whether the body ends exactly here is unknown without reading
                        # on, and reading on is what the cap forbids.
                        truncated = True
                        break
                    chunks.append(chunk)
                    size += len(chunk)
            charset = response.charset_encoding
    except (httpx2.HTTPError, httpx2.InvalidURL, httpx2.StreamError) as exc:
        raise PageError(_describe(exc)) from None
    data = b"".join(chunks)
    if not media_type:
        media_type = _sniff(data)
    return final_url, media_type, data, truncated, charset


def _sniff(data: bytes) -> str:
    """The media type of a body served without a Content-Type header."""
    head = data[:1024]
    if b"\x00" in head:
        raise PageError("unsupported content (binary, no content type)")
    lowered = head.lstrip().lower()
    if lowered.startswith((b"<!doctype html", b"<html", b"<?xml")) or b"<body" in lowered:
        return "text/html"
    return "text/plain"


def _decode(data: bytes, charset: str | None) -> str:
    encoding = "utf-8"
    if charset:
        try:
            encoding = codecs.lookup(charset).name
        except LookupError:
            pass
    return data.decode(encoding, errors="replace")


def _describe(exc: Exception) -> str:
    if isinstance(exc, httpx2.TimeoutException):
        return "timed out"
    if isinstance(exc, httpx2.ConnectError):
        return f"could not connect ({exc})" if str(exc) else "could not connect"
    if isinstance(exc, httpx2.TooManyRedirects):
        return "too many redirects"
    message = str(exc)
    return f"{type(exc).__name__}: {message}" if message else type(exc).__name__
