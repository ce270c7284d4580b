"""Fake web pages for fetch/extract tests.

Routes (custom pages from :meth:`FakePages.set_page` win over these):

* ``/page/{name}``       HTML with <title>, <script>/<style>/<nav> junk and
  paragraphs mentioning ``name`` (and the ``q`` query parameter if given)
* ``/slow/{seconds}``    waits, then answers like ``/page/slow``
* ``/hang``              headers, then nothing until the client leaves
* ``/huge/{megabytes}``  that many MB (float ok) of HTML paragraphs, chunked
* ``/binary``            application/octet-stream
* ``/json``              application/json
* ``/text``              text/plain
* ``/status/{code}``     that status code with a small HTML body
* ``/redirect/{name}``   302 to ``/page/{name}``

Settings: ``delay`` (seconds before every answer), ``pages`` (dict of custom
pages; via ``/_fake/config`` it is merged, ``{path: {"html", "content_type",
"delay", "status"}}``).
"""

from __future__ import annotations

import html
import json
import urllib.parse
from dataclasses import dataclass
from typing import Any, ClassVar

import trio

from .base import Exchange, FakeServer, run_main

__all__ = ["JUNK_MARKERS", "FakePages", "PageSpec", "main", "page_html"]

# Strings that only occur inside <script>/<style>/<nav> of generated pages: an
# extractor's output must not contain them.
JUNK_MARKERS = ("SCRIPT_JUNK", "STYLE_JUNK", "NAV_JUNK")

_MB = 1024 * 1024
_HUGE_CHUNK = 64 * 1024


@dataclass
class PageSpec:
    html: str | bytes
    content_type: str = "text/html; charset=utf-8"
    delay: float = 0.0
    status: int = 200


def page_html(name: str, query: str = "") -> str:
    """The HTML served at ``/page/{name}``."""
    n = html.escape(name)
    about = f" It is relevant to the query {html.escape(query)}." if query else ""
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>Fake page {n}</title>
<style>body {{ font-family: sans-serif; }} .STYLE_JUNK {{ color: red; }}</style>
<script>var tracker = "SCRIPT_JUNK {n}"; window.analytics = [];</script>
</head>
<body>
<nav><a href="/">Home</a> NAV_JUNK menu</nav>
<article>
<h1>All about {n}</h1>
<p>This is the fake page named {n}. It exists so that tests can fetch real HTML
over a real socket.{about}</p>
<p>The second paragraph about {n} says the answer is 42, according to page {n}.</p>
<p>A third paragraph mentions {n} once more, with some filler text to extract.</p>
</article>
<script>console.log("SCRIPT_JUNK trailing");</script>
</body>
</html>
"""


class FakePages(FakeServer):
    SETTING_NAMES: ClassVar[tuple[str, ...]] = ("delay", "pages")

    delay: float
    pages: dict[str, PageSpec]

    def _reset_settings(self) -> None:
        self.delay = 0.0
        self.pages = {}

    def _apply_setting(self, key: str, value: Any) -> None:
        if key == "delay":
            super()._apply_setting(key, float(value))
        elif key == "pages":
            for path, spec in dict(value).items():
                if isinstance(spec, str):
                    self.set_page(path, spec)
                else:
                    self.set_page(path, **spec)
        else:
            super()._apply_setting(key, value)

    def set_page(
        self,
        path: str,
        html: str | bytes,
        content_type: str = "text/html; charset=utf-8",
        delay: float = 0.0,
        status: int = 200,
    ) -> str:
        """Serve ``html`` at ``path``; returns the page's full URL."""
        if not path.startswith("/"):
            path = "/" + path
        self.pages[path] = PageSpec(html, content_type, delay, status)
        return self.url(path)

    def url(self, path: str) -> str:
        return self.base_url + (path if path.startswith("/") else "/" + path)

    async def handle(self, ex: Exchange) -> None:
        req = ex.request
        await trio.sleep(self.delay)
        custom = self.pages.get(req.path)
        if custom is not None:
            await trio.sleep(custom.delay)
            await ex.respond(custom.status, custom.html, custom.content_type)
            return
        parts = [urllib.parse.unquote(p) for p in req.path.strip("/").split("/")]
        head, arg = parts[0], "/".join(parts[1:])
        query = req.query.get("q", "")
        if head == "page" and arg:
            await ex.respond(200, page_html(arg, query), "text/html; charset=utf-8")
        elif head == "slow" and arg:
            await trio.sleep(float(arg))
            await ex.respond(200, page_html(f"slow {arg}", query), "text/html; charset=utf-8")
        elif head == "hang" and not arg:
            await ex.start_response(200, [("content-type", "text/html; charset=utf-8")])
            await trio.sleep_forever()
        elif head == "huge" and arg:
            await self._huge(ex, float(arg))
        elif head == "binary" and not arg:
            data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 16
            await ex.respond(200, data, "application/octet-stream")
        elif head == "json" and not arg:
            body = {"name": "json", "items": [1, 2, 3], "text": "a JSON document"}
            await ex.respond(200, json.dumps(body), "application/json")
        elif head == "text" and not arg:
            await ex.respond(200, "Plain text page.\nSecond line of plain text.\n")
        elif head == "status" and arg.isdigit():
            code = int(arg)
            page = (
                f"<html><head><title>Status {code}</title></head>"
                f"<body><p>status {code}</p></body></html>"
            )
            await ex.respond(code, page, "text/html; charset=utf-8")
        elif head == "redirect" and arg:
            location = "/page/" + urllib.parse.quote(arg)
            await ex.respond(302, "redirecting\n", headers=[("location", location)])
        else:
            await ex.respond(404, "<html><body><p>not found</p></body></html>", "text/html")

    async def _huge(self, ex: Exchange, megabytes: float) -> None:
        total = int(megabytes * _MB)
        await ex.start_response(200, [("content-type", "text/html; charset=utf-8")])
        head = b"<!DOCTYPE html><html><head><title>Huge page</title></head><body>\n"
        tail = b"</body></html>\n"
        para = b"<p>This is a very long page full of repeated filler paragraphs.</p>\n"
        block = para * (_HUGE_CHUNK // len(para))
        sent = 0
        await ex.send(head)
        sent += len(head)
        while sent + len(tail) < total:
            piece = block[: total - len(tail) - sent]
            await ex.send(piece)
            sent += len(piece)
        await ex.send(tail)
        await ex.finish()


def main(argv: list[str] | None = None) -> None:
    run_main(FakePages, argv, "Fake web pages")


if __name__ == "__main__":
    main()
