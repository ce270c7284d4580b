"""GET /api/models and /v1/models, in OpenAI's list shape."""

from __future__ import annotations

from quart import Blueprint, Response

from server.api.common import current_user, json_response, runtime

blueprint = Blueprint("models", __name__)


@blueprint.get("/api/models")
@blueprint.get("/v1/models")
async def list_models() -> Response:
    current_user()
    return json_response({"object": "list", "data": runtime().models.list_models()})
