"""Limits on client connections, below the framework: how many may be open (in all and per
client address), and how long a request head may take to arrive (slowloris)."""

from __future__ import annotations

import json

import trio

from server.api.deadlines import Deadlines
from server.config import Settings
from server.library_internals import ConnectionHooks, WatchedConnection
from server.metrics import Metrics
from server.schemas import RequestError

# A refused connection is told when to come back: connections are short-lived as a rule,
# and a second is long enough for some to have closed.
RETRY_AFTER_S = 1


def error_json(error: RequestError) -> bytes:
    """The body of ``error``'s answer, as ``common.error_response`` writes it."""
    return (json.dumps(error.body(), separators=(",", ":")) + "\n").encode()


def raw_answer(error: RequestError) -> bytes:
    """``error`` as a whole HTTP/1.1 answer that closes its connection, for answers written
    below the framework (no request was parsed, or none whole)."""
    body = error_json(error)
    reason = {408: "Request Timeout", 503: "Service Unavailable"}.get(error.status, "Error")
    headers = [
        f"HTTP/1.1 {error.status} {reason}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
        *(f"{name}: {value}" for name, value in (error.headers or {}).items()),
    ]
    return ("\r\n".join(headers) + "\r\n\r\n").encode() + body


HEAD_TIMEOUT = RequestError(
    408, "request_timeout", "The request head did not arrive in time; the connection is closed."
)


def _refusal(limit: str) -> bytes:
    return raw_answer(
        RequestError(
            503,
            "too_many_connections",
            f"The server holds as many connections as it takes ({limit}); try again shortly.",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    )


class ConnectionGuard(ConnectionHooks):
    """The limits of ``Settings`` on the connections of one process (hypercorn reports each
    connection's life to it: see ``library_internals.WatchedConnection``).

    Past ``max_connections`` open connections, or ``max_connections_per_client`` from one
    address, a new connection is answered 503 with ``Retry-After`` at once, before any of
    its request is read, and closed: at that point nobody can tell whether a request will
    come, and a client that sends one reads the answer. A request head that is not whole
    ``request_head_timeout_s`` after it became due is answered 408 and closed; a
    connection that sent no byte of it is closed without an answer (there is no request to
    answer, and a client that opened a connection ahead of need takes a plain close for
    what it is). A WebSocket (after its upgrade) and a keep-alive connection between two
    requests have no head pending: their bounds are the ping and ``keep_alive_timeout``.
    """

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.max_connections = settings.max_connections
        self.max_per_client = settings.max_connections_per_client
        self.open = 0
        self.by_client: dict[str | None, int] = {}
        self._metrics = metrics
        self._heads: Deadlines[WatchedConnection] | None = (
            Deadlines(settings.request_head_timeout_s, self._head_timed_out)
            if settings.request_head_timeout_s > 0
            else None
        )
        self._nursery: trio.Nursery | None = None
        self._refusals = {
            "max_connections": _refusal("per process"),
            "max_connections_per_client": _refusal("per client address"),
        }
        self._head_timeout_answer = raw_answer(HEAD_TIMEOUT)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Time request heads out until cancelled; cancelling it stops the timers and
        abandons the closes under way (hypercorn closes those connections on its shutdown)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            if self._heads is not None:
                await nursery.start(self._heads.run)
            task_status.started()
            await trio.sleep_forever()

    def admit(self, connection: WatchedConnection) -> bytes | None:
        reason = None
        if self.open >= self.max_connections:
            reason = "max_connections"
        elif 0 < self.max_per_client <= self.by_client.get(connection.client, 0):
            reason = "max_connections_per_client"
        if reason is not None:
            self._metrics.connections_refused.labels(reason).inc()
            return self._refusals[reason]
        self.open += 1
        self.by_client[connection.client] = self.by_client.get(connection.client, 0) + 1
        self._metrics.connections_open.inc()
        return None

    def head_pending(self, connection: WatchedConnection) -> None:
        if self._heads is not None:
            self._heads.set(connection)

    def head_received(self, connection: WatchedConnection) -> None:
        if self._heads is not None:
            self._heads.clear(connection)

    def closed(self, connection: WatchedConnection) -> None:
        if self._heads is not None:
            self._heads.clear(connection)
        self.open -= 1
        left = self.by_client[connection.client] - 1
        if left:
            self.by_client[connection.client] = left
        else:
            del self.by_client[connection.client]
        self._metrics.connections_open.dec()

    def _head_timed_out(self, connection: WatchedConnection) -> None:
        if self._nursery is None:
            return
        self._metrics.request_timeouts.labels("head").inc()
        answer = self._head_timeout_answer if connection.head_started else None
        self._nursery.start_soon(connection.answer_and_close, answer)
