"""Fetching a web page and turning it into readable text.

``fetch_page`` owns the network part (one streamed GET, capped in time and size);
``extract_text`` owns the HTML part (a real parser, no pattern matching over markup).
The two meet only after the response is closed, so a worker thread that parses a big
document never holds a connection that a cancel should have closed.
"""

from __future__ import annotations

import codecs
from contextlib import aclosing
from urllib.parse import urlsplit

import httpx2
import trio
from selectolax.lexbor import LexborHTMLParser, LexborNode

from server.providers.web.base import Page, PageError
from server.providers.web.markdown import markdown_title

__all__ = ["extract_text", "fetch_page", "fragment_text"]

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

# Never part of the readable text, wherever they are.
_DROP_TAGS = frozenset(
    {
        "script", "style", "noscript", "template", "svg", "math", "canvas", "iframe",
        "object", "embed", "video", "audio", "picture", "img", "button", "input", "select",
        "textarea", "head", "title", "meta", "link",
    }
)  # fmt: skip
# Page chrome: dropped, except that a <header> inside the chosen <main>/<article> is
# usually the article's own heading and is kept.
_CHROME_TAGS = frozenset({"nav", "footer", "header"})
# Elements that start and end a paragraph.
_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "caption", "center", "dd",
        "details", "dialog", "div", "dl", "dt", "fieldset", "figcaption", "figure", "form",
        "h1", "h2", "h3", "h4", "h5", "h6", "hr", "html", "li", "main", "ol", "p", "pre",
        "section", "summary", "table", "tbody", "tfoot", "thead", "tr", "ul",
    }
)  # fmt: skip
_CELL_TAGS = frozenset({"td", "th"})

_PARAGRAPH = "\n\n"
_LINE = "\n"


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
            final_url, media_type, body, truncated, charset = await _download(
                http, url, max_bytes)
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


def extract_text(html: str) -> tuple[str, str]:
    """``(title, readable text)`` of an HTML document.

    Scripts, styles, navigation, headers and footers, forms' controls and other markup
    that is not prose are dropped; ``<main>`` (or a lone ``<article>``) is preferred
    over the whole body when the page has one. Whitespace is collapsed inside
    paragraphs and paragraphs are separated by a blank line.

    This is CPU work: callers on the event loop should run big documents in a thread.
    """
    tree = LexborHTMLParser(html)
    title_node = tree.css_first("title")
    title = _collapse(title_node.text()) if title_node is not None else ""

    for root, is_content in _candidate_roots(tree):
        text = _readable_text(root, keep_header=is_content)
        if text:
            if not title:
                heading = root.css_first("h1")
                title = _collapse(heading.text()) if heading is not None else ""
            return title, text
    return title, ""


def _candidate_roots(tree: LexborHTMLParser) -> list[tuple[LexborNode, bool]]:
    """Where the readable text may be, best first; the flag marks a content element."""
    roots: list[tuple[LexborNode, bool]] = []
    main = tree.css_first("main") or tree.css_first('[role="main"]')
    if main is not None:
        roots.append((main, True))
    articles = tree.css("article")
    if len(articles) == 1:
        roots.append((articles[0], True))
    fallback = tree.body or tree.root
    if fallback is not None:
        roots.append((fallback, False))
    return roots


def _readable_text(root: LexborNode, *, keep_header: bool) -> str:
    # An explicit stack instead of recursion: real pages nest deeper than Python's
    # recursion limit allows. Strings on the stack are separators to emit when the
    # walk leaves an element.
    pieces: list[str] = []
    stack: list[LexborNode | str] = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            pieces.append(item)
            continue
        if item.is_text_node:
            pieces.append(_collapse_inline(item.text_content or ""))
            continue
        if not item.is_element_node:
            continue  # comments, doctype
        tag = item.tag or ""
        if tag in _DROP_TAGS or _is_hidden(item):
            continue
        if tag in _CHROME_TAGS and not (keep_header and tag == "header"):
            continue
        if tag == "br":
            pieces.append(_LINE)
            continue
        if tag == "pre":
            pieces.extend((_PARAGRAPH, item.text(), _PARAGRAPH))
            continue
        if tag in _BLOCK_TAGS:
            pieces.append(_PARAGRAPH)
            stack.append(_PARAGRAPH)
        elif tag in _CELL_TAGS:
            stack.append(" ")
        stack.extend(reversed(list(item.iter(include_text=True))))
    return _paragraphs("".join(pieces))


def _is_hidden(node: LexborNode) -> bool:
    attributes = node.attributes
    if "hidden" in attributes:
        return True
    return (attributes.get("aria-hidden") or "").strip().lower() == "true"


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _collapse_inline(text: str) -> str:
    """Collapse whitespace but keep one space at either end, where words meet tags."""
    core = " ".join(text.split())
    if not core:
        return " " if text else ""
    lead = " " if text[0].isspace() else ""
    trail = " " if text[-1].isspace() else ""
    return f"{lead}{core}{trail}"


def _paragraphs(raw: str) -> str:
    """Tidy lines and keep at most one blank line between paragraphs."""
    out: list[str] = []
    blank = False
    for line in raw.split("\n"):
        line = _collapse(line)
        if not line:
            blank = bool(out)
            continue
        if blank:
            out.append("")
            blank = False
        out.append(line)
    return "\n".join(out)


def fragment_text(fragment: str) -> str:
    """Plain text of a short HTML fragment (search snippets carry ``<strong>`` and entities)."""
    if "<" not in fragment and "&" not in fragment:
        return _collapse(fragment)
    tree = LexborHTMLParser(fragment)
    return _collapse(tree.text(separator=""))
