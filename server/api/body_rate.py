"""A floor on the rate at which a request body arrives (slow bodies: R.U.D.Y.), enforced
around the app at the ASGI level, where the body is received."""

from __future__ import annotations

import trio
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    Scope,
)

from server.api.binding import ASGIApp
from server.api.connections import error_json
from server.api.deadlines import Deadlines
from server.metrics import Metrics
from server.schemas import RequestError

BODY_TIMEOUT = RequestError(
    408,
    "request_timeout",
    "The request body arrived too slowly; the connection is closed.",
)


class _BodyRead:
    """One request's body as it arrives: the bytes of the current window, and the scope
    that the request runs in (cancelled when a window ends short)."""

    __slots__ = ("window_bytes", "measuring", "timed_out", "scope")

    def __init__(self, scope: trio.CancelScope) -> None:
        self.window_bytes = 0
        self.measuring = False
        self.timed_out = False
        self.scope = scope


class BodyRateFloor:
    """Requests whose body arrives slower than ``min_rate`` bytes a second end with 408,
    and their connection closes.

    The floor is measured over windows of ``window_s``: from the first part of a body
    that says more is coming, each window must bring ``min_rate * window_s`` bytes (a new
    window starts as soon as it has) or the body must end. Why a rate over windows rather
    than a timeout on the whole body (quart's ``BODY_TIMEOUT``, which stays as an outer
    bound) or between two reads (nginx's ``client_body_timeout``): a whole-body timeout
    lets a few bytes a second hold a connection for all of it, and must be long enough for
    the largest body on a slow link; a between-reads timeout is met by one byte every few
    seconds. A window keeps no credit beyond itself: a client that sent a burst cannot
    trickle on it for minutes after. The body is read by the framework as it arrives
    (quart-trio receives into its buffer while the handler runs), so what is measured is
    the client's pace, not the handler's. Once the app has started its answer the body is
    no longer its concern here (``common.close_if_body_unread`` deals with it).
    """

    def __init__(self, min_rate: int, window_s: float, metrics: Metrics) -> None:
        self.quota = max(1, int(min_rate * window_s))
        self.enabled = min_rate > 0 and window_s > 0
        self._windows: Deadlines[_BodyRead] = Deadlines(window_s, self._window_ended_short)
        self._metrics = metrics

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """End the windows as they pass, until cancelled (no window ends afterwards)."""
        await self._windows.run(task_status=task_status)

    def wrap(self, inner: ASGIApp) -> ASGIApp:
        if not self.enabled:
            return inner
        windows = self._windows
        quota = self.quota

        async def asgi(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
            if scope["type"] != "http":
                await inner(scope, receive, send)
                return
            answered = False
            cancel_scope = trio.CancelScope()
            body = _BodyRead(cancel_scope)

            async def metered_receive() -> ASGIReceiveEvent:
                message = await receive()
                if message["type"] == "http.request" and message.get("more_body", False):
                    body.window_bytes += len(message.get("body", b""))
                    if not body.measuring or body.window_bytes >= quota:
                        body.measuring = True
                        body.window_bytes = 0
                        windows.set(body)
                elif body.measuring:
                    body.measuring = False
                    windows.clear(body)
                return message

            async def watched_send(message: ASGISendEvent) -> None:
                nonlocal answered
                if message["type"] == "http.response.start":
                    answered = True
                    windows.clear(body)
                await send(message)

            with cancel_scope:
                try:
                    await inner(scope, metered_receive, watched_send)
                finally:
                    windows.clear(body)
            if body.timed_out and not answered:
                await _answer(send)

        return asgi

    def _window_ended_short(self, body: _BodyRead) -> None:
        body.timed_out = True
        self._metrics.request_timeouts.labels("body").inc()
        body.scope.cancel()


async def _answer(send: ASGISendCallable) -> None:
    """The 408, through hypercorn (which closes the connection after it, the body being
    unfinished: the rest of it is never read)."""
    content = error_json(BODY_TIMEOUT)
    await send(
        {
            "type": "http.response.start",
            "status": 408,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(content)).encode()),
                (b"connection", b"close"),
            ],
            "trailers": False,
        }
    )
    await send({"type": "http.response.body", "body": content, "more_body": False})
