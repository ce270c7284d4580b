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
    manager = runtime().manager
    if not manager.accepting:
        return error_response(RequestError(503, "shutting_down", "The server is shutting down."))
    return json_response({"status": "ready", "active_tasks": manager.running_count,
                          "replica": manager.replica_id})


@blueprint.get("/metrics")
async def metrics() -> Response:
    body = runtime().metrics.render()
    return Response(body, mimetype="text/plain; version=0.0.4; charset=utf-8")
