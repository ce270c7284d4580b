"""The server-side tool interface (OpenAI function calling, run by the server)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


class ToolError(Exception):
    """A tool could not do what it was asked; the message goes back to the model."""


@dataclass(frozen=True)
class ToolSpec:
    name: str
    description: str
    parameters: dict[str, Any]

    def openai_schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {
                "name": self.name,
                "description": self.description,
                "parameters": self.parameters,
            },
        }


class Tool(Protocol):
    spec: ToolSpec

    async def run(self, arguments: dict[str, Any]) -> str:
        """Run the tool; the result text goes back to the model.

        Raises ``ToolError`` for a bad call. Cancelling it closes any connection it opened.
        """
        ...
