"""One MCP server: its client session, kept open by the app and used by the tasks.

Who owns what. The session (its transport, the stdio server's process, the SDK's reader
task) lives in the app's lifetime nursery, in ``McpConnection.run``, so that it outlives
any one task and is shared by all of them. A call, though, runs in the task that makes it:
``call_tool`` writes the request and awaits the answer in the task, inside the task's
cancel scope, while the reader in the app's nursery hands the answer over. When the task's
scope is cancelled (a stop, a disconnect, the task or tool timeout), the SDK's
``send_request`` sends ``notifications/cancelled`` for the request from a shielded write
bounded at 5 s, and forgets the request; over HTTP, ``CancellingTransport`` then aborts the
call's POST. Nothing of the call is left in the app's nursery.

A cancelled call may leave the server in a bad way (a tool that ignores the cancel and
blocks a stdio server's only thread). So after a call is abandoned, the supervisor here
pings the server; a server that does not answer within ``mcp_ping_timeout_s`` has its
session restarted, which ends a stdio server's process (closing its stdin, then SIGTERM and
SIGKILL to its process group, each wait bounded, and reaping it). A session whose transport
ends (the process died, the HTTP server went away) is opened again, with backoff.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any, Literal, cast

import anyio
import httpx2
import mcp_types
import trio
from anyio.streams.memory import MemoryObjectSendStream
from mcp import ClientSession, StdioServerParameters, stdio_client
from mcp.client.session import IncomingMessage
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.dispatcher import ProgressFnT
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp_types import CONNECTION_CLOSED

from server.config import McpHttpServer, McpServerConfig, McpStdioServer, Settings
from server.exception_groups import first_leaf
from server.providers.tools.mcp._http import CancellingTransport
from server.tracing import trace_meta

__all__ = ["McpConnection", "McpUnavailable"]

log = logging.getLogger("tether.mcp")

_CLIENT_INFO = mcp_types.Implementation(name="tether", version="0.1.0")
_FIRST_BACKOFF_S = 0.5
_MAX_BACKOFF_S = 30.0
_HEALTHY_S = 10.0
_MAX_TOOL_PAGES = 100

Status = Literal["ready", "down"]


class McpUnavailable(Exception):
    """The server has no open session to call (it is down, or shutting down)."""


class McpConnection:
    """The session with one configured MCP server, opened by ``run`` and used by
    ``call_tool``. ``tools`` is the server's current tool list."""

    def __init__(
        self, config: McpServerConfig, settings: Settings, on_tools_changed: Callable[[], None]
    ) -> None:
        self.config = config
        self.name = config.name
        self.tools: list[mcp_types.Tool] = []
        self.status: Status = "down"
        self.error: str | None = "not connected yet"
        self.sessions_opened = 0
        self.limiter = trio.CapacityLimiter(max(1, settings.mcp_max_concurrent_calls))
        self._connect_timeout = settings.mcp_connect_timeout_s
        self._ping_timeout = settings.mcp_ping_timeout_s
        self._on_tools_changed = on_tools_changed
        self._session: ClientSession | None = None
        self._connecting = True
        self._closing = False
        # Set on every change of state (a waiting call looks again); replaced once set.
        self._changed = trio.Event()
        # What the supervisor of an open session should look at (see _supervise).
        self._attention = trio.Event()
        self._ping_wanted = False
        self._relist_wanted = False
        self._lost = trio.Event()  # set by the relay when the open session's transport ends
        self.first_attempt_done = trio.Event()

    # ------------------------------------------------------------------ the app's side

    async def run(self) -> None:
        """Keep a session open until ``close()``: open it, supervise it, open it again when
        it is lost (after 0.5 s, doubling up to 30 s while attempts fail). Never raises for
        the server's failures: they are logged and shown in ``status`` and ``error``.
        Cancelling it closes the session and ends a stdio server's process (bounded waits,
        shielded)."""
        backoff = _FIRST_BACKOFF_S
        while not self._closing:
            self._connecting = True
            self._notify()
            opened_at: float | None = None
            try:
                async with self._open_session() as session:
                    opened_at = trio.current_time()
                    reason = await self._supervise(session)
            except Exception as exc:  # the server's failure, never ours to crash on
                reason = describe_failure(exc)
            self._session = None
            if self._closing:
                break
            if opened_at is not None:
                # A session that was lost is opened again while calls wait for it (they
                # are bounded by the tool timeout): at once after one that served a while,
                # after the backoff after one that failed straight away.
                log.warning("MCP server %s: %s; opening a new session", self.name, reason)
                self.status, self.error, self._connecting = "down", reason, True
                self._notify()
                if trio.current_time() - opened_at >= _HEALTHY_S:
                    backoff = _FIRST_BACKOFF_S
                    continue
            else:
                self.status, self.error, self._connecting = "down", reason, False
                self._notify()
                self.first_attempt_done.set()
                log.warning(
                    "MCP server %s is down (%s); trying again in %g s", self.name, reason, backoff
                )
            with trio.move_on_after(backoff):
                while not self._closing:
                    await self._wait_for_attention()
            backoff = min(backoff * 2, _MAX_BACKOFF_S)
        self.status, self.error, self._connecting = "down", "closed", False
        self._notify()
        self.first_attempt_done.set()

    def close(self) -> None:
        """Ask ``run`` to close the session and return (synchronous; ``run`` ends soon)."""
        self._closing = True
        self._wake()

    @asynccontextmanager
    async def _open_session(self) -> AsyncIterator[ClientSession]:
        async with AsyncExitStack() as stack:
            read, write = await stack.enter_async_context(self._transport())
            # The transport's read stream passes through a relay, whose end tells the
            # supervisor that the connection is gone (the SDK's session does not say).
            relay_send, relay_receive = anyio.create_memory_object_stream[
                SessionMessage | Exception
            ](0)
            nursery = await stack.enter_async_context(trio.open_nursery())
            stack.callback(nursery.cancel_scope.cancel)
            lost = trio.Event()
            nursery.start_soon(self._relay, read, relay_send, lost)
            session = await stack.enter_async_context(
                ClientSession(
                    relay_receive, write, client_info=_CLIENT_INFO, message_handler=self._on_message
                )
            )
            with trio.move_on_after(self._connect_timeout) as deadline:
                await session.initialize()
                tools = await _list_tools(session)
            if deadline.cancelled_caught:
                raise McpUnavailable(f"no answer within {self._connect_timeout:g} s")
            self._lost = lost
            self._set_ready(session, tools)
            yield session

    def _transport(self) -> AbstractAsyncContextManager[Any]:
        config = self.config
        if isinstance(config, McpStdioServer):
            return stdio_client(
                StdioServerParameters(
                    command=config.command,
                    args=list(config.args),
                    env=dict(config.env) or None,
                    cwd=config.cwd,
                )
            )
        assert isinstance(config, McpHttpServer)
        return _http_client(config)

    async def _relay(
        self, read: Any, send: MemoryObjectSendStream[SessionMessage | Exception], lost: trio.Event
    ) -> None:
        try:
            async with send:
                async for item in read:
                    await send.send(item)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError, anyio.EndOfStream):
            pass
        finally:
            lost.set()
            self._wake()

    async def _on_message(self, message: IncomingMessage) -> None:
        if isinstance(message, mcp_types.ToolListChangedNotification):
            self._relist_wanted = True
            self._wake()
        elif isinstance(message, Exception):
            log.warning("MCP server %s sent something unreadable: %s", self.name, message)

    def _set_ready(self, session: ClientSession, tools: list[mcp_types.Tool]) -> None:
        self._session = session
        self.sessions_opened += 1
        self.tools = tools
        self.status, self.error, self._connecting = "ready", None, False
        log.info("MCP server %s is ready with %d tools", self.name, len(tools))
        self._on_tools_changed()
        self._notify()
        self.first_attempt_done.set()

    async def _supervise(self, session: ClientSession) -> str:
        """Watch an open session; returns why it must be closed."""
        while True:
            await self._wait_for_attention()
            if self._closing:
                return "closed"
            if self._lost.is_set():
                return "the connection was lost"
            if self._ping_wanted:
                self._ping_wanted = False
                with trio.move_on_after(self._ping_timeout) as scope:
                    await session.send_ping()
                if scope.cancelled_caught:
                    return (
                        f"no answer to a ping within {self._ping_timeout:g} s after a "
                        "cancelled call; restarting the session"
                    )
            if self._relist_wanted:
                self._relist_wanted = False
                with trio.move_on_after(self._connect_timeout) as deadline:
                    tools = await _list_tools(session)
                if deadline.cancelled_caught:
                    return f"no answer to tools/list within {self._connect_timeout:g} s"
                self.tools = tools
                self._on_tools_changed()

    async def _wait_for_attention(self) -> None:
        await self._attention.wait()
        self._attention = trio.Event()

    def _wake(self) -> None:
        self._attention.set()

    def _notify(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    # ------------------------------------------------------------------ the tasks' side

    async def call_tool(
        self, name: str, arguments: dict[str, Any], progress: ProgressFnT | None = None
    ) -> mcp_types.CallToolResult:
        """Call the tool ``name`` in the calling task, at most ``mcp_max_concurrent_calls``
        at a time on this server. Waits while a session is being opened; raises
        ``McpUnavailable`` when the server is down, and the SDK's ``MCPError`` (an error
        answer, the connection closed) or ``RuntimeError`` (a result that breaks the tool's
        output schema) as they come.

        Cancelling it sends ``notifications/cancelled`` for the request (over HTTP, also
        aborting its POST) and has the server pinged, and restarted if it does not answer.
        """
        async with self.limiter:
            session = await self._ready_session()
            abandoned = True
            try:
                # Traced, the call carries its span's traceparent in ``_meta`` (MCP's
                # place for trace context), and over HTTP in the POST's header.
                meta = trace_meta()
                result = await session.call_tool(
                    name,
                    arguments,
                    progress_callback=progress,
                    meta=cast(mcp_types.RequestParamsMeta, meta) if meta else None,
                )
                abandoned = False
            except MCPError as exc:
                abandoned = False
                # The SDK's own word for a transport that ended under the call (a server's
                # error answer may carry the same code, not this text).
                if exc.code == CONNECTION_CLOSED and exc.message == "Connection closed":
                    await self._forget_if_lost(session)
                raise
            except Exception:
                abandoned = False
                raise
            finally:
                if abandoned:
                    self._ping_wanted = True
                    self._wake()
        return result

    async def _forget_if_lost(self, session: ClientSession) -> None:
        """A call met a closed connection: once the relay confirms that the session's
        transport ended (waited for at most a second), the calls after this one wait for
        the next session instead of meeting this dead one before the supervisor has seen
        it go (a stdio server killed mid-call, and the model's next call right after)."""
        lost = self._lost
        with trio.move_on_after(1.0):
            await lost.wait()
        if lost.is_set() and self._session is session:
            self._session = None
            self._connecting = True
            self._notify()

    async def _ready_session(self) -> ClientSession:
        while True:
            if self._session is not None:
                return self._session
            if self._closing:
                raise McpUnavailable(f"MCP server {self.name} is shutting down")
            if not self._connecting:
                raise McpUnavailable(f"MCP server {self.name} is unavailable: {self.error}")
            await self._changed.wait()


def _http_client(config: McpHttpServer) -> AbstractAsyncContextManager[Any]:
    @asynccontextmanager
    async def client() -> AsyncIterator[Any]:
        # The SDK's own defaults: 30 s to connect or write, 300 s between two reads of a
        # response stream. Tether's own bounds (the tool timeout) sit inside the task.
        http = httpx2.AsyncClient(
            transport=CancellingTransport(httpx2.AsyncHTTPTransport(trust_env=False)),
            headers=dict(config.headers),
            timeout=httpx2.Timeout(30.0, read=300.0),
            trust_env=False,
        )
        async with http, streamable_http_client(config.url, http_client=http) as streams:
            yield streams

    return client()


async def _list_tools(session: ClientSession) -> list[mcp_types.Tool]:
    capabilities = session.server_capabilities
    if capabilities is not None and capabilities.tools is None:
        return []
    tools: list[mcp_types.Tool] = []
    cursor: str | None = None
    for _ in range(_MAX_TOOL_PAGES):
        params = mcp_types.PaginatedRequestParams(cursor=cursor) if cursor else None
        page = await session.list_tools(params=params)
        tools.extend(page.tools)
        cursor = page.next_cursor
        if not cursor:
            break
    return tools


def describe_failure(exc: BaseException) -> str:
    """One line on why a session failed, from the first leaf of an exception group."""
    leaf = first_leaf(exc)
    text = str(leaf).strip() or type(leaf).__name__
    return text if len(text) <= 300 else text[:297] + "..."
