"""The steps of a running task, each in a cancel scope of its own that a skip can reach.

A task's work is a tree of steps inside the task's one cancel scope: the web search phase
(``web_search``), each page read (``page:<url>``), each tool call (its ``tool_call_id``).
A step is registered by its id for as long as it runs. A skip cancels that one scope, and a
deadline is the same scope with a deadline (``move_on_after``'s semantics): the code around
the step takes what the step produced so far and goes on. A stop still cancels the task's
scope, and with it every step. No I/O here: the registry is synchronous, so a skip, like a
stop, is given without awaiting anything.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from server import tracing

StepKind = Literal["web_search", "page", "tool"]
StepState = Literal["running", "completed", "skipped", "deadline", "cancelled"]
# A step's span is named for its kind; its id is the attribute ``tether.step``.
_SPAN_NAMES: dict[StepKind, str] = {
    "web_search": "web_search",
    "page": "page.read",
    "tool": "tool.call",
}


@dataclass(eq=False)
class Step:
    """One running step. ``cut`` says why it ended early: a skip, or its deadline."""

    id: str
    kind: StepKind
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    skipped_by: str | None = None
    state: StepState = "running"
    # Set once the step's block has been left: its connections are closed by then.
    ended: trio.Event = field(default_factory=trio.Event)

    @property
    def cut(self) -> Literal["skipped", "deadline"] | None:
        if self.state in ("skipped", "deadline"):
            return self.state
        return None


class Steps:
    """The steps of one task: the running ones by id, and how each ended one ended."""

    def __init__(self) -> None:
        self._running: dict[str, Step] = {}
        self._ended: dict[str, StepState] = {}

    @contextmanager
    def step(
        self,
        step_id: str,
        kind: StepKind,
        *,
        deadline: float = math.inf,
        attributes: tracing.Attributes | None = None,
    ) -> Iterator[Step]:
        """Run the block as the step ``step_id``, until the absolute ``deadline`` (trio's
        clock) at most. A skip or the deadline ends the block without an exception (the
        step's ``cut`` says which); a stop of the task goes through it as usual. Traced,
        the step is a span (``_SPAN_NAMES``) with ``attributes``; a cut marks it."""
        step = Step(step_id, kind)
        step.scope.deadline = deadline
        self._running[step_id] = step
        with tracing.span(
            _SPAN_NAMES[kind], {"tether.step": step_id, **(attributes or {})}
        ) as span:
            try:
                with step.scope:
                    yield step
            except BaseException:
                step.state = "cancelled"
                raise
            finally:
                if self._running.get(step_id) is step:
                    del self._running[step_id]
                if step.state == "running":
                    if step.scope.cancelled_caught:
                        step.state = "skipped" if step.skipped_by is not None else "deadline"
                    else:
                        step.state = "completed"
                self._ended[step_id] = step.state
                step.ended.set()
                cut = step.cut
                if span is not None and cut is not None:
                    tracing.mark_cut(span, cut, step.skipped_by)

    def skip(self, step_id: str, by: str) -> tuple[StepState, bool] | None:
        """Cancel the step's scope (synchronous). Its state after, and whether it was
        running: ``skipped`` for a running step (or one unwinding from an earlier skip), how
        it ended for an ended one (nothing changes); None for a step that never ran."""
        step = self._running.get(step_id)
        if step is not None:
            if step.skipped_by is None:
                step.skipped_by = by
                step.scope.cancel()
            return "skipped", True
        ended = self._ended.get(step_id)
        return None if ended is None else (ended, False)

    async def wait_ended(self, step_id: str) -> None:
        """Wait until the step ``step_id`` has ended, if it is running; at once if not.
        Cancelling it only ends the wait."""
        step = self._running.get(step_id)
        if step is not None:
            await step.ended.wait()

    def running(self) -> list[Step]:
        """The steps running now, oldest first."""
        return list(self._running.values())


def state_in_log(events: list[Any], step_id: str) -> StepState | None:
    """A step's state as a task's log tells it (``Event``s, in order), for a task that runs
    in another process or has ended: None if the step never began."""
    state: StepState | None = None
    for event in events:
        data = event.data
        if event.type == "status" and data.get("step") == step_id:
            if data.get("skipped"):
                state = "skipped"
            elif data.get("deadline"):
                state = "deadline"
            elif step_id == "web_search":
                state = state or "running"
            else:
                state = "completed" if data.get("done") else "running"
        elif event.type == "status" and step_id.startswith("page:"):
            if state is None and step_id[5:] in (data.get("urls") or ()) and not data.get("done"):
                state = "running"
        elif step_id == "web_search" and state == "running" and event.type != "status":
            state = "completed"  # a source, the answer or the end: the search phase is over
        elif step_id == "web_search" and state == "running" and data.get("phase") != "web_search":
            state = "completed"
        if event.terminal and state == "running":
            state = "cancelled"
    return state
