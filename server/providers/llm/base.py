"""The model interface: anything that streams an OpenAI-style chat completion.

The pipeline passes an OpenAI chat-completions body (``model``, ``messages``, ``tools``,
``temperature``, ...) and receives the streamed pieces through ``on_delta``. Callback style
rather than an async generator so that cancellation never has to finalize a suspended
generator: when the task's scope is cancelled, ``stream_chat`` unwinds and its ``async with``
closes the upstream connection.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass
class ToolCallDelta:
    """One piece of a streamed tool call, as in OpenAI's ``delta.tool_calls[i]``."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


@dataclass
class ModelDelta:
    content: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)
    finish_reason: str | None = None
    usage: dict[str, Any] | None = None
    # The model's stream chunks this delta carries (more than one when they were read
    # together): what a round's usage counts when the model reports none.
    chunks: int = 1
    # The choice it belongs to (``n`` > 1), and its tokens' log probabilities in OpenAI's
    # ``logprobs.content`` shape when the request asked for them.
    index: int = 0
    logprobs: list[dict[str, Any]] | None = None


OnDelta = Callable[[ModelDelta], Awaitable[None]]


class ModelError(Exception):
    """The model failed: an upstream HTTP error, a broken stream, bad data.

    ``status`` is the upstream HTTP status when there was one.
    """

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class ModelProvider(Protocol):
    async def list_models(self) -> list[str]:
        """The model ids this provider serves. Cancelling it abandons the request."""
        ...

    async def stream_chat(self, body: dict[str, Any], on_delta: OnDelta) -> None:
        """Run one chat completion, calling ``on_delta`` for every streamed piece.

        Raises ``ModelError`` on failure (after any deltas already delivered). Cancelling it
        closes the upstream connection before the cancellation propagates.
        """
        ...
