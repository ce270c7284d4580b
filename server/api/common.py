"""Helpers shared by the thin HTTP adapters."""

from __future__ import annotations

import json
from typing import Any, cast

import trio
from quart import Response, current_app, g, request
from werkzeug.exceptions import HTTPException

from server.runtime import Runtime
from server.schemas import RequestError


def runtime() -> Runtime:
    return cast(Runtime, current_app.extensions["tether"])


def current_user() -> str:
    return runtime().auth.user_for(request.headers.get("Authorization"))


def json_response(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    # A final newline, so that curl's output does not run into the shell prompt.
    return Response(
        json.dumps(data, separators=(",", ":")) + "\n",
        status=status,
        headers=headers or {},
        mimetype="application/json",
    )


def error_response(error: RequestError) -> Response:
    return json_response(error.body(), error.status, error.headers)


async def read_json_body() -> Any:
    """The request body as JSON; 413 past the size limit, 400 when it is not JSON."""
    limit = runtime().settings.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise RequestError(
            413, "payload_too_large", f"The request body is larger than {limit} bytes."
        )
    body = await request.get_data(cache=False)
    g.tether_body_read = True
    if len(body) > limit:
        raise RequestError(
            413, "payload_too_large", f"The request body is larger than {limit} bytes."
        )
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RequestError(400, "invalid_request", "The request body is not valid JSON.") from None


def sse_headers(task_id: str) -> dict[str, str]:
    return {
        "Content-Type": "text/event-stream; charset=utf-8",
        "Cache-Control": "no-cache",
        "X-Accel-Buffering": "no",
        "X-Task-Id": task_id,
    }


async def close_if_body_unread(response: Response) -> Response:
    """An answer sent before the request's body was read (a 413 from its declared length,
    a 401, a route that takes no body ...) would leave the rest of the body on its way, and
    a keep-alive client's next request on that connection would wait behind it. A small
    body (up to ``_SMALL_BODY`` bytes, such as the ``{}`` of a stop) is read, within a
    second, and the connection kept; otherwise the answer closes the connection."""
    length = request.content_length
    declared = length or "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if not declared or g.get("tether_body_read", False):
        return response
    if length is not None and length <= min(_SMALL_BODY, runtime().settings.max_body_bytes):
        with trio.move_on_after(1.0):
            try:
                await request.get_data(cache=False)
            except HTTPException:  # the body broke the framework's own limits
                pass
            else:
                return response
    response.headers["Connection"] = "close"
    return response


_SMALL_BODY = 64 * 1024
