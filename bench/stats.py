"""Latency samples: taken interleaved with their floor, summarized as n, p50, p90, p99, max
(milliseconds)."""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import trio

Op = Callable[[], Awaitable[None]]


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolated percentile ``q`` (0..100) of already sorted values."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac)


def summarize(values_s: Sequence[float], *, scale: float = 1000.0) -> dict[str, Any]:
    """Summary of samples given in seconds, reported in ms (``scale`` = 1000)."""
    vals = sorted(v * scale for v in values_s)
    if not vals:
        return {
            "n": 0,
            "p50": None,
            "p90": None,
            "p99": None,
            "max": None,
            "min": None,
            "mean": None,
        }
    return {
        "n": len(vals),
        "p50": round(percentile(vals, 50), 3),
        "p90": round(percentile(vals, 90), 3),
        "p99": round(percentile(vals, 99), 3),
        "max": round(vals[-1], 3),
        "min": round(vals[0], 3),
        "mean": round(sum(vals) / len(vals), 3),
    }


def ratio(a: float | None, b: float | None) -> float | None:
    """``a / b`` rounded, or None when either is missing or ``b`` is zero."""
    if a is None or b is None or b <= 0 or math.isnan(a) or math.isnan(b):
        return None
    return round(a / b, 2)


class Samples:
    """Latency samples (seconds) and failures, by key."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {}
        self.failures: dict[str, list[str]] = {}

    def add(self, key: str, seconds: float) -> None:
        self.values.setdefault(key, []).append(seconds)

    def fail(self, key: str, detail: str) -> None:
        self.failures.setdefault(key, []).append(detail)

    def summary(self, key: str) -> dict[str, Any]:
        """``summarize`` of the key's samples (ms), with its count of failures."""
        return {**summarize(self.values.get(key, [])), "failures": len(self.failures.get(key, []))}


async def interleaved_rounds(
    ops: list[Op],
    rounds: int,
    rng: random.Random,
    gap_s: float = 0.0,
    on_round: Callable[[int], None] | None = None,
) -> None:
    """Run every op once per round, in a random order each round, ``gap_s`` after each;
    ``on_round(n)`` after round n (1-based)."""
    for n in range(1, rounds + 1):
        order = list(ops)
        rng.shuffle(order)
        for op in order:
            await op()
            if gap_s:
                await trio.sleep(gap_s)
        if on_round is not None:
            on_round(n)
