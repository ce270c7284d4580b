"""Reading the little structure a Markdown document has: its title."""

from __future__ import annotations


def markdown_title(text: str) -> str | None:
    """The text of the first level-one ATX heading (``# Title``), or ``None``.

    Headings inside fenced code blocks do not count: a ``# comment`` in a shell
    example is not the document's title.
    """
    in_fence = False
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith(("```", "~~~")):
            in_fence = not in_fence
            continue
        if in_fence:
            continue
        if stripped.startswith("# ") or stripped == "#":
            title = stripped[1:].strip().rstrip("#").strip()
            if title:
                return title
    return None
