"""What the model providers' tests share: a collector of the deltas a provider streams,
OpenAI-style chunks and request bodies, and a cancel in the middle of a stream."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from fakes.base import ConnRecord
from fakes.scripted import ScriptedServer
from server.providers.llm.base import ModelDelta, ModelProvider
from tests.conftest import WAIT


@dataclass
class Collected:
    deltas: list[ModelDelta] = field(default_factory=list)
    # Set once the first delta is in: scripts wait on it to send what comes next.
    first: trio.Event = field(default_factory=trio.Event)

    async def __call__(self, delta: ModelDelta) -> None:
        self.deltas.append(delta)
        self.first.set()

    @property
    def content(self) -> str:
        return "".join(d.content for d in self.deltas)

    @property
    def reasoning(self) -> str:
        return "".join(d.reasoning for d in self.deltas)

    @property
    def finish_reason(self) -> str | None:
        reasons = [d.finish_reason for d in self.deltas if d.finish_reason]
        assert len(reasons) <= 1
        return reasons[0] if reasons else None

    @property
    def usage(self) -> dict[str, Any] | None:
        usages = [d.usage for d in self.deltas if d.usage]
        return usages[-1] if usages else None

    def tool_calls(self) -> list[dict[str, str]]:
        """The streamed pieces assembled by index, as the pipeline does."""
        calls: dict[int, dict[str, str]] = {}
        for delta in self.deltas:
            for piece in delta.tool_calls:
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = piece.id or call["id"]
                call["name"] = piece.name or call["name"]
                call["arguments"] += piece.arguments
        return [calls[i] for i in sorted(calls)]


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def chunk(content: str | None = None, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    if content is not None:
        delta["content"] = content
    return {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
USAGE_CHUNK = {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}
BODY = {"model": "m", "messages": [user("hi")], "stream": False}


async def cancel_after_first_delta(
    upstream: ScriptedServer, model: ModelProvider, collected: Collected
) -> ConnRecord:
    """Stream from ``model`` (a client of ``upstream``), cancel once the first delta is in,
    and return the upstream's record of the connection once it saw it closed."""
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(model.stream_chat, BODY, collected)
            await collected.first.wait()
            nursery.cancel_scope.cancel()
        return await upstream.wait_connection_closed(upstream.requests[0].conn_id)
