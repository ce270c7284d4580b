"""Many timers of one fixed span, served by one task."""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

import trio

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    """Keys, each with a deadline ``span_s`` after it was last set; a key whose deadline
    passes is removed and handed to ``expire``.

    Why one task and not a cancel scope per key: a timer is set for every request head and
    for every request body, and nearly all are cleared long before they expire. Because
    the span is the same for every key, a key set later expires later, so the keys in the
    order they were (last) set are also in the order of their deadlines: the one task
    sleeps until the oldest deadline, and setting or clearing a key is a dict operation,
    with no task started and no scope entered on the request's path.
    """

    def __init__(self, span_s: float, expire: Callable[[K], None]) -> None:
        self.span_s = span_s
        self._expire = expire
        self._pending: dict[K, float] = {}
        self._wake = trio.Event()

    def __len__(self) -> int:
        return len(self._pending)

    def set(self, key: K) -> None:
        """(Re)start ``key``'s timer: it expires ``span_s`` from now unless cleared or set
        again first."""
        self._pending.pop(key, None)
        self._pending[key] = trio.current_time() + self.span_s
        if len(self._pending) == 1:
            self._wake.set()

    def clear(self, key: K) -> None:
        """Stop ``key``'s timer, if it runs."""
        self._pending.pop(key, None)

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Expire keys as their deadlines pass, until cancelled (cancelling it stops every
        timer; none expires afterwards)."""
        task_status.started()
        while True:
            if not self._pending:
                self._wake = trio.Event()
                await self._wake.wait()
                continue
            key, deadline = next(iter(self._pending.items()))
            if trio.current_time() < deadline:
                # The oldest key may be cleared or set again meanwhile: waking for nothing
                # then costs one look at the next oldest.
                await trio.sleep_until(deadline)
                continue
            del self._pending[key]
            self._expire(key)
