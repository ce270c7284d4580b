"""What the pipeline reports through. It never sees HTTP or WebSocket objects."""

from __future__ import annotations

from typing import Any, Protocol

from server.schemas import Phase


class Emitter(Protocol):
    async def __call__(self, type_: str, data: dict[str, Any]) -> None:
        """Record an event on the task (``status``, ``source``, ``delta``)."""
        ...

    async def set_phase(self, phase: Phase) -> None:
        """Say where the task is now (``web_search``, ``tools``, ``generating``)."""
        ...

    async def set_result(
        self,
        *,
        usage: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> None:
        """Record facts about the answer that are not events."""
        ...

    def keep_usage(self, usage: dict[str, Any] | None) -> None:
        """Put the answer's usage so far on the task, without a write of its own: the
        terminal event, written after the pipeline has ended, carries it. Synchronous, so
        that a generation being cancelled can still leave it. None changes nothing."""
        ...
