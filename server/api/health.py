"""Liveness, readiness and metrics."""

from __future__ import annotations

from quart import Blueprint, Response

from server.api.common import error_response, json_response, runtime
from server.schemas import RequestError

blueprint = Blueprint("health", __name__)


@blueprint.get("/healthz")
@blueprint.get("/health")  # the name vLLM and load testers such as guidellm probe
async def healthz() -> Response:
    return json_response({"status": "ok"})


@blueprint.get("/readyz")
async def readyz() -> Response:
    rt = runtime()
    manager = rt.manager
    if not manager.accepting:
        return error_response(RequestError(503, "shutting_down", "The server is shutting down."))
    if not manager.cluster.reachable:
        return error_response(
            RequestError(
                503,
                "backend_unavailable",
                "This replica cannot reach its task store: its tasks may be taken over by "
                "another replica. Retry elsewhere.",
            )
        )
    ready: dict[str, object] = {
        "status": "ready",
        "active_tasks": manager.running_count,
        "replica": manager.cluster.replica_id,
    }
    if rt.mcp is not None:
        # Shown, not judged: a process whose MCP server is down still serves everything
        # else (and gives the model an error for that server's tools), so it stays ready.
        ready["mcp"] = rt.mcp.status()
    return json_response(ready)


@blueprint.get("/metrics")
async def metrics() -> Response:
    body = runtime().metrics.render()
    return Response(body, mimetype="text/plain; version=0.0.4; charset=utf-8")
