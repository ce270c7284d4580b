"""Clients for the control API (``/_fake/...``) of the loopback fakes in ``fakes/``."""

from __future__ import annotations

import urllib.parse
from typing import Any

from bench.httpclient import HttpConnection, HttpError


class FakeControl:
    """One fake process: configure it, reset it, read its connection and request records.

    Keeps a few keep-alive control connections, one per concurrent call (the fakes flag
    connections that carried only control requests, and leave them out of
    ``/_fake/connections``).
    """

    def __init__(self, name: str, port: int) -> None:
        self.name = name
        self.port = port
        self.base_url = f"http://127.0.0.1:{port}"
        self._idle: list[HttpConnection] = []

    async def _call(
        self, method: str, path: str, body: Any = None, timeout_ok: bool = False
    ) -> Any:
        conn = self._idle.pop() if self._idle else HttpConnection("127.0.0.1", self.port)
        try:
            answer = await conn.request(method, path, body)
        except BaseException:
            conn.abort()
            raise
        self._idle.append(conn)
        if answer.status == 504 and timeout_ok:
            return None
        if answer.status >= 400:
            raise HttpError(
                f"{self.name} {method} {path} -> {answer.status}: {answer.body[:300]!r}"
            )
        return answer.json()

    async def configure(self, **settings: Any) -> Any:
        return await self._call("POST", "/_fake/config", settings)

    async def reset(self) -> None:
        await self._call("POST", "/_fake/reset", {})

    async def connections(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = await self._call("GET", "/_fake/connections")
        return result

    async def open_connections(self) -> list[dict[str, Any]]:
        return [c for c in await self.connections() if c["closed_at"] is None]

    async def requests(self, path_prefix: str = "/") -> list[dict[str, Any]]:
        q = urllib.parse.urlencode({"path_prefix": path_prefix})
        result: list[dict[str, Any]] = await self._call("GET", f"/_fake/requests?{q}")
        return result

    async def wait_request(
        self, path_prefix: str = "/", count: int = 1, timeout: float = 10.0
    ) -> dict[str, Any] | None:
        """The latest request under ``path_prefix`` once ``count`` have arrived, or None."""
        q = urllib.parse.urlencode({"path_prefix": path_prefix, "count": count, "timeout": timeout})
        result: dict[str, Any] | None = await self._call(
            "GET", f"/_fake/wait_request?{q}", timeout_ok=True
        )
        return result

    async def wait_closed(self, conn_id: int, timeout: float = 10.0) -> dict[str, Any] | None:
        """The connection record once closed, or None after ``timeout``."""
        q = urllib.parse.urlencode({"conn_id": conn_id, "timeout": timeout})
        result: dict[str, Any] | None = await self._call(
            "GET", f"/_fake/wait_closed?{q}", timeout_ok=True
        )
        return result

    async def aclose(self) -> None:
        while self._idle:
            await self._idle.pop().aclose()
