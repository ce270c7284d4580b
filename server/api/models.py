"""GET /api/models and /v1/models, in OpenAI's list shape, and one model by id."""

from __future__ import annotations

from quart import Blueprint, Response

from server.api.common import current_user, json_response, runtime
from server.schemas import RequestError

blueprint = Blueprint("models", __name__)


@blueprint.get("/api/models")
@blueprint.get("/v1/models")
async def list_models() -> Response:
    current_user()
    return json_response({"object": "list", "data": runtime().models.list_models()})


@blueprint.get("/api/models/<path:model_id>")
@blueprint.get("/v1/models/<path:model_id>")
async def get_model(model_id: str) -> Response:
    """One listed model as an OpenAI ``Model``; 404 ``model_not_found`` otherwise (model
    ids may hold slashes: ``org/name``)."""
    current_user()
    for model in runtime().models.list_models():
        if model["id"] == model_id:
            return json_response(model)
    raise RequestError(
        404, "model_not_found", f"The model {model_id!r} does not exist.", param="model"
    )
