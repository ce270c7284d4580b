"""Fetching and reading web pages."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Page:
    url: str
    title: str
    text: str
    truncated: bool = False


class PageError(Exception):
    """The page could not be fetched or read (status, timeout, size, content type)."""
