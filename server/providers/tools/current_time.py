"""A tool that tells the model the current date and time."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, tzinfo
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import trio

from server.providers.tools.base import ProgressReporter, ToolError, ToolSpec

__all__ = ["CurrentTimeTool"]

SPEC = ToolSpec(
    name="current_time",
    description=(
        "Get the current date and time as ISO 8601 (with the UTC offset). In UTC unless an "
        "IANA time zone such as 'Europe/Paris' or 'America/New_York' is given."
    ),
    parameters={
        "type": "object",
        "properties": {
            "timezone": {
                "type": "string",
                "description": "An IANA time zone name; UTC when omitted.",
            }
        },
        "required": [],
        "additionalProperties": False,
    },
)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class CurrentTimeTool:
    """The ``current_time`` tool: ``{"timezone"?: str}`` → e.g. ``2025-05-01T14:03:07+02:00``."""

    def __init__(self, clock: Callable[[], datetime] = _utc_now) -> None:
        self.spec = SPEC
        self._clock = clock

    async def run(self, arguments: dict[str, Any], progress: ProgressReporter | None = None) -> str:
        """The current time in the asked time zone; ``ToolError`` for an unknown zone.

        Loading a zone reads a small file in a worker thread; cancelling it abandons
        that thread.
        """
        name = arguments.get("timezone")
        if name is None or (isinstance(name, str) and name.strip().upper() in ("", "UTC", "Z")):
            zone: tzinfo = UTC
        elif isinstance(name, str):
            zone = await trio.to_thread.run_sync(_load_zone, name.strip(), abandon_on_cancel=True)
        else:
            raise ToolError("'timezone' must be a string such as 'Europe/Paris'")
        return self._clock().astimezone(zone).isoformat(timespec="seconds")


def _load_zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ToolError(
            f"unknown time zone {name!r}; use an IANA name like 'Europe/Paris'"
        ) from None
