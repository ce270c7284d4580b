"""Server-sent events, encoded in one place for every SSE the server writes.

In an event stream a line ends at CR, LF or CRLF. Text from outside (a URL or a page title
in a status, an upstream's error message) may hold any of them; written as it is, it would
end a comment or a field early and let the rest be read as a field of its own, a ``data:``
line in the user's stream. Here comments and single-line fields have every line break
replaced by a space, and data is split into one ``data:`` line per line, which readers join
back with LF.
"""

from __future__ import annotations

import re

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def comment(text: str) -> str:
    """A comment line (clients ignore it; proxies see traffic)."""
    return ": " + _LINE_BREAK.sub(" ", text) + "\n\n"


def event(data: str, *, id: str | int | None = None) -> str:
    """One event: its ``id`` if given, then its data."""
    lines = [] if id is None else ["id: " + _LINE_BREAK.sub(" ", str(id))]
    lines.extend("data: " + line for line in _LINE_BREAK.split(data))
    return "\n".join(lines) + "\n\n"


DONE = event("[DONE]")
KEEPALIVE = comment("keepalive")
