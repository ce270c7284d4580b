"""A real MCP server (built with the official SDK) for Tether's tests, over stdio and over
streamable HTTP, that records what it sees.

Tools: ``echo(text)``, ``add(a, b)`` (structured content), ``slow(seconds, steps)`` (reports
progress, then answers), ``fail(message)`` (an ``isError`` result), ``refuse(message)`` (a
JSON-RPC error), ``stubborn(seconds)`` (ignores cancellation, until the server stops) and
``block(seconds)`` (blocks the process's only thread: a wedged server that cannot even answer
a ping; stdio only).

Records, as dicts with ``event`` and ``server`` (the label the server was given):

- ``started`` (``pid``), once, when the server runs;
- ``call`` (``tool``, ``request_id``, always a string) as a tool starts; ``finished`` as it answers;
- ``cancelled`` (``tool``, ``request_id``) when a running tool's scope is cancelled;
- ``notification_cancelled`` (``request_id``) when ``notifications/cancelled`` arrives;
- over HTTP only, ``stream_closed`` (``request_id``, ``by``: ``client`` or ``server``) when
  the response stream of a ``tools/call`` POST ends: the client went away first, or the server
  sent the last of it.

In the test process, an HTTP server (``McpHttpFake``) records straight into a
``McpRecorder``. A stdio server is a subprocess, ``python -m fakes.mcp_server --record
127.0.0.1:PORT --label NAME``: it sends its records as JSON lines to the recorder's loopback
port, so the test sees them the moment they happen.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import anyio
import trio
from hypercorn.config import Config
from hypercorn.trio import serve
from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError

__all__ = ["McpHttpFake", "McpRecorder", "build_server", "stdio_command"]

Record = Callable[[dict[str, Any]], None]


class McpRecorder:
    """What the fake MCP servers saw, in order, with waits on it."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._changed = trio.Event()
        self.port = 0

    def record(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        self._changed.set()
        self._changed = trio.Event()

    def of(self, event: str, **match: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events
            if e["event"] == event and all(e.get(k) == v for k, v in match.items())
        ]

    async def wait_for(self, event: str, count: int = 1, **match: Any) -> dict[str, Any]:
        """The ``count``-th record of ``event`` with the given fields, once it is there."""
        while len(self.of(event, **match)) < count:
            await self._changed.wait()
        return self.of(event, **match)[count - 1]

    async def start(self, nursery: trio.Nursery) -> None:
        """Listen on a loopback port for the records of stdio servers."""
        listeners = await nursery.start(partial(trio.serve_tcp, self._reader, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]

    async def _reader(self, stream: trio.SocketStream) -> None:
        buffer = b""
        async with stream:
            async for chunk in stream:
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    if line.strip():
                        self.record(json.loads(line))


def build_server(label: str, record: Record, stopping: trio.Event | None = None) -> MCPServer:
    """The fake server; ``record`` gets every record as it happens. ``stopping``, once set,
    lets ``stubborn`` calls end."""
    released = stopping if stopping is not None else trio.Event()

    async def observe(ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method == "notifications/cancelled":
            request_id = (ctx.params or {}).get("requestId")
            record(
                {"event": "notification_cancelled", "server": label, "request_id": str(request_id)}
            )
        return await call_next(ctx)

    mcp = MCPServer(f"fake-{label}", middleware=[observe], log_level="WARNING")

    def note(event: str, ctx: Context, tool: str) -> None:
        record({"event": event, "server": label, "tool": tool, "request_id": ctx.request_id})

    async def recorded(ctx: Context, tool: str, work: Any) -> Any:
        note("call", ctx, tool)
        try:
            result = await work()
        except anyio.get_cancelled_exc_class():
            note("cancelled", ctx, tool)
            raise
        note("finished", ctx, tool)
        return result

    @mcp.tool()
    async def echo(text: str, ctx: Context) -> str:
        """Say the text back."""

        async def work() -> str:
            return f"echo: {text}"

        return str(await recorded(ctx, "echo", work))

    @mcp.tool()
    async def add(a: int, b: int, ctx: Context) -> dict[str, int]:
        """Add two whole numbers (structured result)."""

        async def work() -> dict[str, int]:
            return {"sum": a + b}

        result: dict[str, int] = await recorded(ctx, "add", work)
        return result

    @mcp.tool()
    async def slow(seconds: float, ctx: Context, steps: int = 2) -> str:
        """Take ``seconds``, reporting progress ``steps`` times on the way."""

        async def work() -> str:
            for step in range(steps):
                await ctx.report_progress(step + 1, steps, f"step {step + 1} of {steps}")
                await anyio.sleep(seconds / max(steps, 1))
            return f"slept {seconds:g} s"

        return str(await recorded(ctx, "slow", work))

    @mcp.tool()
    async def fail(message: str, ctx: Context) -> str:
        """Fail with the message (an isError result)."""

        async def work() -> str:
            raise ToolError(message)

        return str(await recorded(ctx, "fail", work))

    @mcp.tool()
    async def refuse(message: str, ctx: Context) -> str:
        """Answer with a JSON-RPC error (a protocol error, not a result)."""

        async def work() -> str:
            raise MCPError(code=-32000, message=message)

        return str(await recorded(ctx, "refuse", work))

    @mcp.tool()
    async def stubborn(seconds: float, ctx: Context) -> str:
        """Take ``seconds`` and ignore any cancel meanwhile."""

        async def work() -> str:
            with anyio.move_on_after(seconds, shield=True):
                await released.wait()
            return "done anyway"

        return str(await recorded(ctx, "stubborn", work))

    @mcp.tool()
    async def block(seconds: float, ctx: Context) -> str:
        """Block the whole server for ``seconds`` (nothing else is answered meanwhile)."""

        async def work() -> str:
            time.sleep(seconds)  # noqa: ASYNC251 - blocking the server is the point
            return "unblocked"

        return str(await recorded(ctx, "block", work))

    return mcp


class McpHttpFake:
    """The fake server over streamable HTTP on a loopback port, in the test's process.
    ``url`` is its endpoint; ``stop()`` closes it (its clients' streams break). A response
    stream closed by the client before it ended is recorded as ``stream_closed`` by
    ``client``, when the server next reads from it."""

    def __init__(self, label: str, recorder: McpRecorder, *, json_response: bool = False) -> None:
        self.label = label
        self.recorder = recorder
        self.url = ""
        self._stop = trio.Event()
        # json_response: a call is answered with one JSON body once the tool is done (nothing
        # is sent before), instead of an SSE stream that starts at once.
        self._inner = build_server(label, recorder.record, self._stop).streamable_http_app(
            json_response=json_response
        )
        self._json_response = json_response

    async def start(self, nursery: trio.Nursery) -> None:
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.graceful_timeout = 0.5
        binds = await nursery.start(
            partial(
                serve,
                self._app,
                config,  # type: ignore[arg-type]
                shutdown_trigger=self._stop.wait,
            )
        )
        self.url = binds[0] + "/mcp"
        self.recorder.record({"event": "started", "server": self.label, "pid": os.getpid()})

    def stop(self) -> None:
        self._stop.set()

    async def _app(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The SDK's app, watched: which JSON-RPC request a POST carries, and whether its
        response stream ended by the client leaving or by the server's last byte."""
        if scope["type"] != "http" or scope["method"] != "POST":
            await self._inner(scope, receive, send)
            return
        body = b""
        body_read = trio.Event()
        call_id: Any = None
        ended = False

        def closed(by: str) -> None:
            nonlocal ended
            if not ended and call_id is not None:
                self.recorder.record(
                    {
                        "event": "stream_closed",
                        "server": self.label,
                        "request_id": call_id,
                        "by": by,
                    }
                )
            ended = True

        async def watched_receive() -> dict[str, Any]:
            nonlocal body, call_id
            message: dict[str, Any] = await receive()
            if message["type"] == "http.request":
                body += message.get("body", b"")
                if not message.get("more_body"):
                    try:
                        parsed = json.loads(body)
                    except ValueError:
                        parsed = None
                    if isinstance(parsed, dict) and parsed.get("method") == "tools/call":
                        call_id = str(parsed.get("id"))
                    body_read.set()
            elif message["type"] == "http.disconnect":
                closed("client")
            return message

        async def watched_send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body" and not message.get("more_body"):
                closed("server")
            await send(message)

        async with trio.open_nursery() as nursery:
            if self._json_response:
                # A JSON answer is written once the tool is done, and the SDK reads nothing
                # from the request meanwhile: the fake listens for the client leaving.
                async def watch() -> None:
                    await body_read.wait()
                    if call_id is not None:
                        await watched_receive()

                nursery.start_soon(watch)
            await self._inner(scope, watched_receive, watched_send)
            nursery.cancel_scope.cancel()


def stdio_command(label: str, recorder: McpRecorder) -> tuple[str, list[str]]:
    """The command and arguments that run the fake as a stdio server recording to
    ``recorder``."""
    return sys.executable, [
        "-m",
        "fakes.mcp_server",
        "--label",
        label,
        "--record",
        f"127.0.0.1:{recorder.port}",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="A fake MCP server over stdio.")
    parser.add_argument("--label", default="stdio")
    parser.add_argument("--record", help="host:port of a McpRecorder to send records to")
    args = parser.parse_args(argv)

    # Records go out on a blocking socket, each before record() returns: a tool that then
    # blocks the process (``block``) or a kill cannot hold one back.
    sink: socket.socket | None = None
    if args.record:
        host, _, port = args.record.rpartition(":")
        sink = socket.create_connection((host, int(port)))

    def record(event: dict[str, Any]) -> None:
        if sink is not None:
            sink.sendall(json.dumps(event).encode() + b"\n")

    server = build_server(args.label, record)
    record({"event": "started", "server": args.label, "pid": os.getpid()})

    async def run() -> None:
        await server.run_stdio_async()

    trio.run(run)


if __name__ == "__main__":
    main()
