"""A line-per-step progress display on stderr, with the elapsed time of the run."""

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

    def warn(self, message: str) -> None:
        self._write(f"!! {message}")

    def _write(self, text: str) -> None:
        if self.quiet and not text.startswith("!!"):
            return
        print(f"[{self.elapsed():6.1f}s] {text}", file=sys.stderr, flush=True)
