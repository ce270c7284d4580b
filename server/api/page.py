"""GET / (the chat page) and GET /static/<path> (its script, styles and vendored libraries).

The files live in ``server/static/`` inside the package, so an installed wheel serves the
same page as a checkout. Nothing here needs a key: the files say nothing about any user, and
the page asks for the key itself before it calls the API.

Two kinds of cache rule, because the files' names carry no version: the page and Tether's
own files may change with any upgrade, so a browser revalidates them on every load
(``no-cache`` with an ETag: a 304 costs one round trip, a stale script after an upgrade
would cost a broken page); the vendored libraries sit in folders named with their version
(``vendor/marked-18.2.1/``), so a name always means the same bytes and they are cached for
good.

The page's Content-Security-Policy allows scripts and styles from this server only, and no
inline script at all, so text that slipped into the DOM as markup could still not run; it
allows connections to this server only (``connect-src 'self'``, which in CSP Level 3 also
covers ``ws:``/``wss:`` to the same host and port); and it allows images from this server
only, so that a model cannot make the page load a tracking pixel. DOMPurify's Trusted Types
policy is the only one allowed to create HTML from strings.
"""

from __future__ import annotations

from pathlib import Path

from quart import Blueprint, Response
from quart.helpers import send_from_directory
from werkzeug.exceptions import NotFound

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

# Content types by suffix, fixed here rather than read from the machine's mime.types: a
# module script served as anything but JavaScript is refused by the browser. (The framework
# adds "; charset=utf-8" to the text types.)
_TYPES = {
    ".html": "text/html",
    ".js": "text/javascript",
    ".mjs": "text/javascript",
    ".css": "text/css",
    ".png": "image/png",
    ".svg": "image/svg+xml",
    ".txt": "text/plain",
    ".md": "text/plain",
}
_NO_CACHE = "no-cache"
_FOREVER = "public, max-age=31536000, immutable"

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types dompurify",
    ]
)

blueprint = Blueprint("page", __name__)


@blueprint.get("/")
async def index() -> Response:
    response = await _send("index.html")
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["Referrer-Policy"] = "no-referrer"
    return response


@blueprint.get("/static/<path:name>")
async def static_file(name: str) -> Response:
    return await _send(name)


async def _send(name: str) -> Response:
    """One file of ``STATIC_DIR`` with its type and cache rule; 404 for anything else (an
    unknown type, a path that leaves the folder)."""
    content_type = _TYPES.get(Path(name).suffix.lower())
    if content_type is None:
        raise NotFound()
    response = await send_from_directory(STATIC_DIR, name, mimetype=content_type)
    response.headers["Cache-Control"] = _FOREVER if name.startswith("vendor/") else _NO_CACHE
    response.headers.pop("Expires", None)  # the framework's 12 h default; Cache-Control rules
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
