"""GET /api/tools: the server tools a request may name in ``tool_ids``."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from server.api.common import current_user, json_response, runtime

blueprint = Blueprint("tools", __name__)


@blueprint.get("/api/tools")
async def list_tools() -> Response:
    """Every id ``tool_ids`` accepts now: the built-ins, then each MCP server's tools as
    ``mcp:<server>:<tool>``, with the function name the model sees and the JSON schema of
    the arguments."""
    current_user()
    tools: list[dict[str, Any]] = []
    for tool_id, tool in runtime().tools.items():
        spec = tool.spec
        entry: dict[str, Any] = {
            "id": tool_id,
            "name": spec.name,
            "description": spec.description,
            "parameters": spec.parameters,
        }
        if spec.server is not None:
            entry["server"] = spec.server
        tools.append(entry)
    return json_response({"tools": tools})
