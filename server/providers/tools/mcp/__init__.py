"""Tools of MCP servers (``TETHER_MCP_CONFIG``), called through the official ``mcp`` SDK."""

from server.providers.tools.mcp.connection import McpConnection, McpUnavailable
from server.providers.tools.mcp.servers import McpServers
from server.providers.tools.mcp.tool import McpTool, function_name, result_text, tool_id

__all__ = [
    "McpConnection",
    "McpServers",
    "McpTool",
    "McpUnavailable",
    "function_name",
    "result_text",
    "tool_id",
]
