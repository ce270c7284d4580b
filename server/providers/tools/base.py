"""The server-side tool interface (OpenAI function calling, run by the server)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol


class ToolError(Exception):
    """A tool could not do what it was asked; the message goes back to the model."""


@dataclass(frozen=True)
class ToolSpec:
    """What the model and the API are told about a tool.

    ``name`` is the function name the model calls it by; ``id`` is what ``tool_ids`` and
    ``GET /api/tools`` call it (the same for the built-ins; ``mcp:<server>:<tool>`` for a tool
    of an MCP server, whose name is then ``server`` and whose own name is ``remote_name``).
    """

    name: str
    description: str
    parameters: dict[str, Any]
    id: str = ""
    server: str | None = None
    remote_name: str | None = None

    @property
    def tool_id(self) -> str:
        return self.id or self.name

    def openai_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


@dataclass(frozen=True)
class ToolProgress:
    """A tool's report that it is getting on (an MCP progress notification)."""

    progress: float
    total: float | None = None
    message: str | None = None


ProgressReporter = Callable[[ToolProgress], Awaitable[None]]


class Tool(Protocol):
    spec: ToolSpec

    async def run(self, arguments: dict[str, Any], progress: ProgressReporter | None = None) -> str:
        """Run the tool; the result text goes back to the model. ``progress``, when given,
        is awaited with each progress report the tool makes, in the caller's task.

        Raises ``ToolError`` for a bad call. Cancelling it closes any connection it opened.
        """
        ...
