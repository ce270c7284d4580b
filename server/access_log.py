"""The optional access log (``TETHER_ACCESS_LOG``): one line per HTTP request or WebSocket.

A line is ``<time> <client> <method> <target> <status> <duration>ms``, plus ``task=<id>``
when the answer named a task (``X-Task-Id``)::

    2025-06-01 12:00:00,123 127.0.0.1:41234 POST /v1/chat/completions 200 1532.4ms task=task_…

The target is the path and query as the client sent them (percent-encoded, so a line has no
spaces of the client's), except that the values of the query parameters that carry keys
(``token``, the WebSocket's way to send one, and the usual ``access_token``, ``api_key``,
``apikey``, ``key``) are written as ``***``. The line is written when the request's handling
ends: a streamed answer (SSE) or a WebSocket is logged with its whole duration, and a client
that went away mid-answer with the status it had been sent. A WebSocket's status is 101 once
accepted, or its refusal's (401, 403).

It is written here, around the app, rather than by hypercorn's access logger: that one
writes some requests twice (a curl request gets a second line without a status: hypercorn
issue #357), and builds a dictionary of every request header and environment variable for
each line.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any, cast

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope

from server.api.binding import ASGIApp
from server.config import SettingsError

STDOUT = ("-", "stdout")
STDERR = ("stderr",)

_SECRET_PARAM = re.compile(r"(^|&)(token|access_token|api_key|apikey|key)=[^&]*", re.IGNORECASE)


def redact_query(query: str) -> str:
    """The query string with the values of key-carrying parameters replaced by ``***``."""
    return _SECRET_PARAM.sub(r"\1\2=***", query)


def open_access_log(target: str | None) -> logging.Logger | None:
    """The logger that writes the access log to ``target``: ``-`` or ``stdout``, ``stderr``,
    or a file (appended to); None (no access log) for no target. Raises ``SettingsError``
    when the file cannot be opened."""
    if not target:
        return None
    handler: logging.Handler
    if target in STDOUT:
        handler = logging.StreamHandler(sys.stdout)
    elif target in STDERR:
        handler = logging.StreamHandler(sys.stderr)
    else:
        try:
            handler = logging.FileHandler(target)
        except OSError as exc:
            raise SettingsError(
                f"TETHER_ACCESS_LOG={target!r} cannot be opened: {exc.strerror or exc}"
            ) from exc
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    # Not from logging.getLogger: each app has its own (tests run several in one process),
    # and nothing is passed on to the root logger's handlers.
    logger = logging.Logger("tether.access", logging.INFO)
    logger.addHandler(handler)
    return logger


def close_access_log(logger: logging.Logger) -> None:
    """Close the access log's file (a stream handler leaves stdout and stderr open)."""
    for handler in logger.handlers:
        handler.close()


def log_access(inner: ASGIApp, logger: logging.Logger) -> ASGIApp:
    """``inner``, writing one line to ``logger`` for each HTTP request and WebSocket when
    its handling ends, however it ends (cancelled too: the line is written from a
    ``finally``, with no await)."""

    async def asgi(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        if scope["type"] not in ("http", "websocket"):
            await inner(scope, receive, send)
            return
        started = trio.current_time()
        answer: dict[str, Any] = {"status": "-", "task": None}

        async def noting_send(message: ASGISendEvent) -> None:
            fields = cast(dict[str, Any], message)
            kind = fields["type"]
            if kind in ("http.response.start", "websocket.http.response.start"):
                answer["status"] = str(fields["status"])
                for name, value in fields.get("headers", ()):
                    if name.lower() == b"x-task-id":
                        answer["task"] = value.decode("latin-1")
            elif kind == "websocket.accept":
                answer["status"] = "101"
            elif kind == "websocket.close" and answer["status"] == "-":
                answer["status"] = "403"  # closed before accepting: the server answers 403
            await send(message)

        try:
            await inner(scope, receive, noting_send)
        finally:
            logger.info(
                "%s", _line(cast(dict[str, Any], scope), answer, trio.current_time() - started)
            )

    return asgi


def _line(scope: dict[str, Any], answer: dict[str, Any], duration_s: float) -> str:
    client = scope.get("client")
    peer = f"{client[0]}:{client[1]}" if client else "-"
    method = scope["method"] if scope["type"] == "http" else "GET"
    target = (scope.get("raw_path") or scope["path"].encode()).decode("latin-1")
    query = scope["query_string"].decode("latin-1")
    if query:
        target += "?" + redact_query(query)
    line = f"{peer} {method} {target} {answer['status']} {duration_s * 1000:.1f}ms"
    if answer["task"]:
        line += f" task={answer['task']}"
    return line
