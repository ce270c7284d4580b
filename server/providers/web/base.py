"""Fetching and reading web pages."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class Page:
    url: str
    title: str
    text: str
    truncated: bool = False


class PageError(Exception):
    """The page could not be fetched or read (status, timeout, size, content type)."""


class PageReader(Protocol):
    """Reads one web page for the pipeline and for ``fetch_url``."""

    async def read(self, url: str) -> Page:
        """The page's readable text; ``PageError`` when it cannot be had. Cancelling it
        closes the connection to the web server."""
        ...
