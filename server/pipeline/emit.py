"""What the pipeline reports through. It never sees HTTP or WebSocket objects."""

from __future__ import annotations

from contextlib import AbstractContextManager
from typing import Any, Literal, Protocol

from server.events import DeltaData, SourceData, StatusData
from server.record import Phase
from server.tracing import Attributes


class StepHandle(Protocol):
    """A step as it ends: ``cut`` says why it ended early (a skip, or its deadline)."""

    @property
    def cut(self) -> Literal["skipped", "deadline"] | None: ...

    @property
    def skipped_by(self) -> str | None: ...


class Emitter(Protocol):
    """Each report is an event on the task, typed by what it reports. Cancelled while
    waiting for an earlier report of the task to be written, a report writes nothing."""

    async def delta(self, data: DeltaData) -> None:
        """A piece of the answer."""
        ...

    async def status(self, data: StatusData) -> None:
        """A step of the payload phase began, progressed or ended."""
        ...

    async def source(self, data: SourceData) -> None:
        """A web source the answer may cite."""
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
        other_finish_reasons: dict[int, str] | None = None,
    ) -> None:
        """Record facts about the answer that are not events; ``other_finish_reasons``
        are those of the choices after the first (``n`` > 1), by index."""
        ...

    def step(
        self,
        step_id: str,
        kind: Literal["web_search", "page", "tool"],
        *,
        deadline_s: float | None = None,
        attributes: Attributes | None = None,
    ) -> AbstractContextManager[StepHandle]:
        """Run the block as a step that a skip (or ``deadline_s``) may cut short: then the
        block ends without an exception and the handle's ``cut`` says why; the code
        around it goes on with what the step produced. A stop goes through it as usual.
        ``attributes`` go on the step's span when traced."""
        ...

    def keep_usage(self, usage: dict[str, Any] | None) -> None:
        """Put the answer's usage so far on the task, without a write of its own: the
        terminal event, written after the pipeline has ended, carries it. Synchronous, so
        that a generation being cancelled can still leave it. None changes nothing."""
        ...
