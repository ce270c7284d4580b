"""Which provider serves a model id, decided without I/O at request time."""

from __future__ import annotations

from typing import Any

import httpx2

from server.config import Settings
from server.providers.llm.base import ModelError, ModelProvider
from server.providers.llm.local import LocalModel
from server.providers.llm.openai_compat import OpenAICompatibleModel


class ModelRouter:
    def __init__(self, local: LocalModel, upstream: OpenAICompatibleModel | None) -> None:
        self.local = local
        self.upstream = upstream
        self._upstream_models: list[str] | None = None
        self.last_error: str | None = None

    async def refresh(self) -> None:
        """Fetch the upstream's model list; on failure keep the old one. Never raises."""
        if self.upstream is None:
            return
        try:
            self._upstream_models = await self.upstream.list_models()
            self.last_error = None
        except ModelError as exc:
            self.last_error = exc.message

    def resolve(self, model_id: str) -> ModelProvider | None:
        if model_id == "local":
            return self.local
        if self.upstream is None:
            return None
        if self._upstream_models is None or model_id in self._upstream_models:
            # An upstream whose list is unknown decides for itself.
            return self.upstream
        return None

    def list_models(self) -> list[dict[str, Any]]:
        models = [{"id": "local", "object": "model", "created": 0, "owned_by": "tether"}]
        for model_id in self._upstream_models or []:
            models.append({"id": model_id, "object": "model", "created": 0,
                           "owned_by": "upstream"})
        return models


def build_model_router(settings: Settings, http: httpx2.AsyncClient) -> ModelRouter:
    upstream = None
    if settings.llm_base_url:
        upstream = OpenAICompatibleModel(http, settings.llm_base_url, settings.llm_api_key,
                                         settings.llm_timeout_s)
    return ModelRouter(LocalModel(settings.local_model_tokens_per_s), upstream)
