"""One PNG chart per scenario (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path

from bench.results import Results


def draw_all(res: Results, directory: Path) -> list[Path]:
    return []
