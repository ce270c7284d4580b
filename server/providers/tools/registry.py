"""The server-side tools, by id: the built-ins and the tools of the MCP servers."""

from __future__ import annotations

from collections.abc import Iterator, Mapping

from server.config import Settings
from server.providers.tools.base import Tool
from server.providers.tools.calculator import CalculatorTool
from server.providers.tools.current_time import CurrentTimeTool
from server.providers.tools.fetch_url import FetchUrlTool
from server.providers.tools.mcp import McpServers, McpTool, function_name
from server.providers.web.base import PageReader


def build_tools(settings: Settings, pages: PageReader) -> dict[str, Tool]:
    """Every built-in tool keyed by its ``spec.name``: calculator, current_time, fetch_url."""
    tools: list[Tool] = [CalculatorTool(), CurrentTimeTool(), FetchUrlTool(pages)]
    return {tool.spec.name: tool for tool in tools}


class ToolRegistry(Mapping[str, Tool]):
    """Every server tool by its id (what ``tool_ids`` names): the built-ins, then each MCP
    server's current tools as ``mcp:<server>:<tool>``. The MCP part changes as servers come
    and go; a tool of a server that is down stays listed while its session is reopened, and
    calling it meanwhile gives the model an error result."""

    def __init__(
        self, builtins: dict[str, Tool], mcp: McpServers | None, max_result_chars: int
    ) -> None:
        self._builtins = builtins
        self._mcp = mcp
        self._max_result_chars = max_result_chars
        self._tools: dict[str, Tool] = dict(builtins)
        if mcp is not None:
            mcp.on_tools_changed(self.refresh)

    def refresh(self) -> None:
        """Rebuild the MCP part from the servers' current tool lists. The function names
        are given in a fixed order (servers as configured, their tools as listed), so a
        tool keeps its name for as long as the lists stay the same."""
        tools: dict[str, Tool] = dict(self._builtins)
        taken = set(tools)
        for connection in self._mcp.connections.values() if self._mcp else ():
            for remote in connection.tools:
                name = function_name(connection.name, remote.name, taken)
                taken.add(name)
                tool = McpTool(connection, remote, name, self._max_result_chars)
                tools[tool.spec.tool_id] = tool
        self._tools = tools

    def __getitem__(self, tool_id: str) -> Tool:
        return self._tools[tool_id]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tools)

    def __len__(self) -> int:
        return len(self._tools)
