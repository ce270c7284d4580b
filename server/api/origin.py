"""Which browser pages may open ``/ws``: the check of a WebSocket upgrade's ``Origin``.

Any page's JavaScript may open a WebSocket to any host: the same-origin policy that keeps
another site from reading ``fetch`` answers does not apply to WebSockets. In single-user
mode, where no key is needed, a page on another site that the user visits could start and
read their chats through the server on their own machine. Browsers always send the
``Origin`` of the page that opened the socket, and a page cannot forge it, so the server
refuses origins it does not know. Clients that are not browsers (curl, the
SDKs, ``examples/ws_chat.py``) send no ``Origin`` and are not concerned.

The page's own origin is always allowed: an ``Origin`` whose host and port are those of the
``Host`` header the browser sent with it. ``TETHER_WS_ALLOWED_ORIGINS`` adds others, for a
page served elsewhere or a proxy that rewrites ``Host``.
"""

from __future__ import annotations

from collections.abc import Sequence
from urllib.parse import urlsplit

from server.schemas import RequestError

_DEFAULT_PORTS = {"http": 80, "https": 443, "ws": 80, "wss": 443}


def check_origin(origin: str | None, host: str | None, allowed: Sequence[str]) -> None:
    """Raise 403 ``forbidden`` unless a WebSocket from ``origin`` (the ``Origin`` header,
    None when absent) to ``host`` (the ``Host`` header) may be served."""
    if origin is None or "*" in allowed:
        return
    normalised = origin.strip().rstrip("/").lower()
    if normalised in allowed or _same_origin(normalised, host):
        return
    raise RequestError(
        403,
        "forbidden",
        f"WebSocket connections from the origin {origin!r} are not allowed "
        "(TETHER_WS_ALLOWED_ORIGINS).",
        error_type="permission_error",
    )


def _same_origin(origin: str, host: str | None) -> bool:
    """True when ``origin`` names the host and port the request was sent to. A ``Host``
    without a port uses the default port of the origin's scheme: behind a TLS proxy the
    page is ``https://example.com`` and the Host header plain ``example.com``."""
    if not host:
        return False
    try:
        page = urlsplit(origin)
        target = urlsplit("//" + host.strip().lower())
        page_port = page.port or _DEFAULT_PORTS.get(page.scheme)
        target_port = target.port or _DEFAULT_PORTS.get(page.scheme)
    except ValueError:  # a port that is not a number, a broken IPv6 literal
        return False
    return (
        page.scheme in _DEFAULT_PORTS
        and page.hostname is not None
        and page.hostname == target.hostname
        and page_port == target_port
    )
