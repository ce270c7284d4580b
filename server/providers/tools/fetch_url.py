"""A tool that reads a web page for the model."""

from __future__ import annotations

from typing import Any

from server.providers.tools.base import ProgressReporter, ToolError, ToolSpec
from server.providers.web.base import PageError, PageReader

__all__ = ["FetchUrlTool"]

SPEC = ToolSpec(
    name="fetch_url",
    description=(
        "Fetch a web page (http or https) and return its title and readable text. "
        "Long pages are cut short."
    ),
    parameters={
        "type": "object",
        "properties": {
            "url": {"type": "string", "description": "The absolute http(s) URL to read."}
        },
        "required": ["url"],
        "additionalProperties": False,
    },
)


class FetchUrlTool:
    """The ``fetch_url`` tool: ``{"url": str}`` → ``"Title: ...\\n\\n<text>"``."""

    def __init__(self, pages: PageReader) -> None:
        self.spec = SPEC
        self._pages = pages

    async def run(self, arguments: dict[str, Any], progress: ProgressReporter | None = None) -> str:
        """Fetch the page; ``ToolError`` when it cannot be fetched or read.

        Cancelling it closes the connection to the web server (and abandons a parse
        running in a worker thread).
        """
        url = arguments.get("url")
        if not isinstance(url, str) or not url.strip():
            raise ToolError("fetch_url needs a 'url' string")
        url = url.strip()
        try:
            page = await self._pages.read(url)
        except PageError as exc:
            raise ToolError(f"could not fetch {url}: {exc}") from None
        text = page.text or "(the page has no readable text)"
        if page.truncated:
            text += "\n\n[cut short]"
        return f"Title: {page.title or page.url}\n\n{text}"
