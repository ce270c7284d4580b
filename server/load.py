"""How busy the server's event loop is, and the pause between model reads that follows.

Every model token costs a socket read, an event and a WebSocket frame, whoever reads it;
what a read brings is handed on as one delta (see ``openai_compat``). When the loop's
thread has CPU to spare, streams are read as soon as bytes arrive: nothing is held back.
When it is nearly saturated, every read costs latency to everyone (time to task id, stops,
pings all queue behind the runnable tasks), so each stream pauses a little between reads and
the next read brings several tokens at once: fewer reads, events and frames for the same
text. The pause grows with the load, up to ``max_pause_s``, which bounds what it adds to
a token's delivery.

Busy is the loop thread's CPU time over wall time (``time.thread_time``, so worker threads
do not count), measured every ``window_s`` and smoothed over the last few windows.
"""

from __future__ import annotations

import time

import trio


class LoadGauge:
    def __init__(
        self,
        *,
        window_s: float = 0.2,
        low: float = 0.5,
        high: float = 0.9,
        max_pause_s: float = 0.04,
    ) -> None:
        self._window_s = window_s
        self._low = low
        self._high = high
        self._max_pause_s = max_pause_s
        self.busy = 0.0
        self.read_pause_s = 0.0

    def update(self, busy: float) -> None:
        """Take one window's busy fraction (0 to 1)."""
        self.busy = 0.5 * self.busy + 0.5 * busy
        share = (self.busy - self._low) / (self._high - self._low)
        self.read_pause_s = min(max(share, 0.0), 1.0) * self._max_pause_s

    async def run(self) -> None:
        """Measure until cancelled (the app's shutdown); cancelling it just stops that."""
        cpu, wall = time.thread_time(), time.perf_counter()
        while True:
            await trio.sleep(self._window_s)
            cpu_now, wall_now = time.thread_time(), time.perf_counter()
            if wall_now > wall:
                self.update((cpu_now - cpu) / (wall_now - wall))
            cpu, wall = cpu_now, wall_now
