"""Assertions shared by the test modules."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

from server.events import TERMINAL_TYPES

TERMINAL = TERMINAL_TYPES


def assert_log_well_formed(events: list[dict[str, Any]], after: int = 0) -> dict[str, Any]:
    """Gapless seq from ``after + 1``, exactly one terminal event, and it is last.
    Returns the terminal event."""
    assert events, "no events"
    assert [e["seq"] for e in events] == list(range(after + 1, after + 1 + len(events)))
    terminals = [e for e in events if e["type"] in TERMINAL]
    assert len(terminals) == 1, [e["type"] for e in events]
    assert events[-1] is terminals[0]
    task_ids = {e["task_id"] for e in events}
    assert len(task_ids) == 1
    return terminals[0]


def chat_body(text: str = "hello", **extra: Any) -> dict[str, Any]:
    return {"model": "fake-model", "messages": [{"role": "user", "content": text}], **extra}


async def until(
    condition: Callable[[], Awaitable[bool]], *, timeout: float = 10.0, poll_s: float = 0.02
) -> None:
    """Wait for a condition that no event announces (retention's sweep, say): checked
    every ``poll_s`` until it holds, failing the test after ``timeout``."""
    with trio.fail_after(timeout):
        while not await condition():  # noqa: ASYNC110 - no event announces it
            await trio.sleep(poll_s)
