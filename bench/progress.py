"""A line-per-step progress display on stderr, with the elapsed time of the run, and a bar
for the long loops of a step (redrawn in place on a terminal; a line a quarter elsewhere)."""

from __future__ import annotations

import sys
import time


class Progress:
    def __init__(self, quiet: bool = False) -> None:
        self.started = time.monotonic()
        self.quiet = quiet
        self.scenario = ""

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def section(self, name: str) -> None:
        self.scenario = name
        self._write(f"== {name}")

    def step(self, message: str) -> None:
        self._write(f"   {message}")

    def bar(self, label: str, done: int, total: int) -> None:
        """Progress of a loop: ``done`` of ``total``."""
        if self.quiet or total <= 0:
            return
        if sys.stderr.isatty():
            filled = 30 * done // total
            line = f"[{self.elapsed():6.1f}s]    [{'#' * filled}{'.' * (30 - filled)}]"
            end = "\n" if done >= total else ""
            print(f"\r{line} {done}/{total} {label}", end=end, file=sys.stderr, flush=True)
        elif done > 0 and (4 * done // total) != (4 * (done - 1) // total):
            self.step(f"{label}: {done}/{total}")

    def warn(self, message: str) -> None:
        self._write(f"!! {message}")

    def _write(self, text: str) -> None:
        if self.quiet and not text.startswith("!!"):
            return
        print(f"[{self.elapsed():6.1f}s] {text}", file=sys.stderr, flush=True)
