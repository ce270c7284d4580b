"""Every configured MCP server, run side by side in the app's lifetime nursery."""

from __future__ import annotations

from collections.abc import Callable

import trio

from server.config import McpServerConfig, Settings
from server.providers.tools.mcp.connection import McpConnection

__all__ = ["McpServers"]

# How long a shutdown waits for the sessions to close on their own before cancelling them
# (a stdio server gets its stdin closed, then 2 s, SIGTERM, 2 s, SIGKILL: all bounded).
_CLOSE_GRACE_S = 10.0


class McpServers:
    """The sessions of the configured MCP servers. ``on_tools_changed`` is called whenever a
    server's tool list changes (a session opened, a list_changed notification)."""

    def __init__(self, configs: tuple[McpServerConfig, ...], settings: Settings) -> None:
        self._listeners: list[Callable[[], None]] = []
        self.connections = {
            c.name: McpConnection(c, settings, self._tools_changed) for c in configs
        }
        self._done = trio.Event()
        self._cancel_scope: trio.CancelScope | None = None

    def on_tools_changed(self, listener: Callable[[], None]) -> None:
        self._listeners.append(listener)

    def _tools_changed(self) -> None:
        for listener in self._listeners:
            listener()

    def status(self) -> dict[str, dict[str, str | None]]:
        """Per server ``{"status": "ready" | "down", "error": why it is down or null}``."""
        return {
            name: {"status": c.status, "error": c.error} for name, c in self.connections.items()
        }

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Open every server's session and keep them open until ``close()``. It reports
        started once each server has answered or failed its first attempt (bounded by
        ``mcp_connect_timeout_s``), so that the first requests see their tools; a server
        that is down never holds up the start. Cancelling it closes the sessions and ends
        the stdio servers' processes."""
        try:
            with trio.CancelScope() as scope:
                self._cancel_scope = scope
                async with trio.open_nursery() as nursery:
                    for connection in self.connections.values():
                        nursery.start_soon(connection.run)
                    for connection in self.connections.values():
                        await connection.first_attempt_done.wait()
                    task_status.started()
        finally:
            self._done.set()

    async def close(self) -> None:
        """Close every session and wait for it (stdio servers' processes ended and reaped).
        Cancelling it leaves ``run`` to finish the closing in the app's nursery."""
        for connection in self.connections.values():
            connection.close()
        if self._cancel_scope is None:  # never started
            return
        with trio.move_on_after(_CLOSE_GRACE_S):
            await self._done.wait()
        if not self._done.is_set() and self._cancel_scope is not None:
            self._cancel_scope.cancel()
            await self._done.wait()
