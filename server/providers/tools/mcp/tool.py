"""An MCP server's tool as a Tether ``Tool``: its id, the function name the model sees, and
its result as the text of a tool message."""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import mcp_types
import trio
from mcp.shared.exceptions import MCPError
from pydantic import ValidationError

from server.providers.tools.base import ProgressReporter, ToolError, ToolProgress, ToolSpec
from server.providers.tools.mcp.connection import McpConnection, McpUnavailable

__all__ = ["McpTool", "function_name", "result_text", "tool_id"]

# OpenAI's function names: ^[a-zA-Z0-9_-]{1,64}$.
_MAX_NAME = 64
_NOT_IN_NAME = re.compile(r"[^a-zA-Z0-9_-]")
# Progress reports waiting to become status events; past this, the newest are dropped
# (a server may report far faster than a status event is worth).
_PROGRESS_BUFFER = 16


def tool_id(server: str, tool: str) -> str:
    return f"mcp:{server}:{tool}"


def function_name(server: str, tool: str, taken: set[str]) -> str:
    """The name the model calls ``mcp:<server>:<tool>`` by: ``mcp__<server>__<tool>`` when
    that is a valid OpenAI function name and not ``taken``; otherwise the same, with the
    characters a name cannot hold as ``_``, cut to leave room for ``_`` and 8 hex digits of
    a hash of the id (so two tools that read alike still get two names)."""
    plain = f"mcp__{server}__{tool}"
    if len(plain) <= _MAX_NAME and not _NOT_IN_NAME.search(plain) and plain not in taken:
        return plain
    digest = hashlib.sha256(tool_id(server, tool).encode()).hexdigest()
    for start in range(0, len(digest) - 8):
        suffix = "_" + digest[start : start + 8]
        name = _NOT_IN_NAME.sub("_", plain)[: _MAX_NAME - len(suffix)] + suffix
        if name not in taken:
            return name
    raise ValueError(f"no free function name for {tool_id(server, tool)}")


class McpTool:
    """``mcp:<server>:<tool>``: calls the tool on the server's shared session."""

    def __init__(
        self, connection: McpConnection, tool: mcp_types.Tool, name: str, max_result_chars: int
    ) -> None:
        parameters = dict(tool.input_schema)
        parameters.setdefault("type", "object")
        self.spec = ToolSpec(
            name=name,
            description=tool.description
            or tool.title
            or f"{tool.name} (MCP server {connection.name})",
            parameters=parameters,
            id=tool_id(connection.name, tool.name),
            server=connection.name,
            remote_name=tool.name,
        )
        self._connection = connection
        self._name = tool.name
        self._max_chars = max_result_chars

    async def run(self, arguments: dict[str, Any], progress: ProgressReporter | None = None) -> str:
        """Call the tool; ``ToolError`` for an error result, a protocol error or a server
        that is down. Progress notifications are handed to ``progress`` in this task.

        Cancelling it cancels the request on the server (``notifications/cancelled``; over
        HTTP its response stream is closed too) and leaves the session open for the next
        call (see ``McpConnection.call_tool``).
        """
        if progress is None:
            result = await self._call(arguments, None)
        else:
            result = await self._call_reporting(arguments, progress)
        text, failed = result_text(result, self._max_chars)
        if failed:
            raise ToolError(text)
        return text

    async def _call_reporting(
        self, arguments: dict[str, Any], progress: ProgressReporter
    ) -> mcp_types.CallToolResult:
        # The SDK calls back from its reader task, in the app's nursery, while events of a
        # task must be emitted by the task: the reports cross over in a channel, and a
        # child of this call forwards them, so that none outlives the call.
        send, receive = trio.open_memory_channel[ToolProgress](_PROGRESS_BUFFER)

        async def on_progress(done: float, total: float | None, message: str | None) -> None:
            try:
                send.send_nowait(ToolProgress(done, total, message))
            except (trio.WouldBlock, trio.ClosedResourceError, trio.BrokenResourceError):
                pass

        async def forward() -> None:
            async with receive:
                async for report in receive:
                    await progress(report)

        outcome: mcp_types.CallToolResult | ToolError
        async with trio.open_nursery() as nursery:
            nursery.start_soon(forward)
            try:
                outcome = await self._call(arguments, on_progress)
            except ToolError as exc:  # raised outside the nursery, not as a group
                outcome = exc
            finally:
                send.close()
        if isinstance(outcome, ToolError):
            raise outcome
        return outcome

    async def _call(self, arguments: dict[str, Any], on_progress: Any) -> mcp_types.CallToolResult:
        server = self._connection.name
        try:
            return await self._connection.call_tool(self._name, arguments, on_progress)
        except McpUnavailable as exc:
            raise ToolError(str(exc)) from None
        except MCPError as exc:
            raise ToolError(
                f"MCP server {server} answered {self._name} with an error: {exc.error.message}"
            ) from None
        except (RuntimeError, ValidationError) as exc:  # a result the SDK would not accept
            raise ToolError(
                f"MCP server {server} gave {self._name} an invalid result: {_first_line(str(exc))}"
            ) from None


def result_text(result: mcp_types.CallToolResult, max_chars: int) -> tuple[str, bool]:
    """The tool message for ``result`` and whether it is an error: the text blocks, one per
    paragraph; the structured content as JSON when there is no text (a tool that returns
    both is to make the text the JSON of the structure); a line naming each image, audio
    clip or resource, whose bytes a chat model's tool message cannot carry. Cut at
    ``max_chars`` with ``[cut short]``."""
    parts: list[str] = []
    for block in result.content:
        if isinstance(block, mcp_types.TextContent):
            parts.append(block.text)
        elif isinstance(block, mcp_types.EmbeddedResource):
            resource = block.resource
            if isinstance(resource, mcp_types.TextResourceContents):
                parts.append(resource.text)
            else:
                parts.append(f"[resource {resource.uri} ({resource.mime_type or 'binary'})]")
        elif isinstance(block, mcp_types.ResourceLink):
            parts.append(f"[resource link {block.uri}: {block.name}]")
        elif isinstance(block, mcp_types.ImageContent | mcp_types.AudioContent):
            parts.append(f"[{block.type} ({block.mime_type}), not shown]")
    text = "\n\n".join(p for p in parts if p)
    if not text and result.structured_content is not None:
        text = json.dumps(result.structured_content, ensure_ascii=False)
    if result.is_error:
        text = text or "the tool failed and said nothing more"
    elif not text:
        text = "(the tool returned nothing)"
    if len(text) > max_chars:
        text = text[:max_chars] + "\n\n[cut short]"
    return text, result.is_error


def _first_line(text: str) -> str:
    line = text.strip().splitlines()[0] if text.strip() else "no details"
    return line if len(line) <= 300 else line[:297] + "..."
