"""The server-side tools, by name."""

from __future__ import annotations

import httpx2

from server.config import Settings
from server.providers.tools.base import Tool
from server.providers.tools.calculator import CalculatorTool
from server.providers.tools.current_time import CurrentTimeTool
from server.providers.tools.fetch_url import FetchUrlTool


def build_tools(settings: Settings, http: httpx2.AsyncClient) -> dict[str, Tool]:
    """Every server-side tool keyed by its ``spec.name``: calculator, current_time, fetch_url."""
    tools: list[Tool] = [CalculatorTool(), CurrentTimeTool(), FetchUrlTool(http, settings)]
    return {tool.spec.name: tool for tool in tools}
