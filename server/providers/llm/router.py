"""Which provider serves a model id, decided without I/O at request time.

The upstream's model list is fetched in the background (``refresh``) and cached, so that
validating a request's model never waits on the network before the task id is answered.
"""

from __future__ import annotations

import logging
from typing import Any

import httpx2

from server.config import Settings
from server.providers.llm.base import ModelError, ModelProvider
from server.providers.llm.local import MODEL_ID as LOCAL_MODEL_ID
from server.providers.llm.local import LocalModel
from server.providers.llm.openai_compat import OpenAICompatibleModel

log = logging.getLogger(__name__)


class ModelRouter:
    """The built-in ``local`` model and, optionally, one upstream (any ``ModelProvider``)."""

    def __init__(self, local: ModelProvider, upstream: ModelProvider | None) -> None:
        self.local = local
        self.upstream = upstream
        # None until a fetch succeeds: an unknown list lets the upstream judge any id.
        self._upstream_models: list[str] | None = None
        self.last_error: str | None = None

    async def refresh(self) -> None:
        """Fetch the upstream's model list into the cache. Never raises: on failure the old
        list is kept and the error is kept in ``last_error``.

        Cancelling it abandons the fetch (its connection is closed) and leaves the cache as
        it was.
        """
        if self.upstream is None:
            return
        try:
            models = await self.upstream.list_models()
        except ModelError as exc:
            self.last_error = exc.message
            return
        except Exception as exc:
            # This runs in the app's nursery, where an escaping exception would end the
            # server: a provider bug is logged and remembered instead.
            log.exception("listing the upstream's models failed")
            self.last_error = f"listing models failed: {type(exc).__name__}"
            return
        self._upstream_models = models
        self.last_error = None

    def resolve(self, model_id: str) -> ModelProvider | None:
        """The provider for ``model_id``, or None (the caller answers 404
        ``model_not_found``). No I/O."""
        if model_id == LOCAL_MODEL_ID:
            return self.local
        if self.upstream is None:
            return None
        if self._upstream_models is None or model_id in self._upstream_models:
            return self.upstream
        return None

    def list_models(self) -> list[dict[str, Any]]:
        """OpenAI model-list entries: ``local``, then the cached upstream models. No I/O."""
        models = [_entry(LOCAL_MODEL_ID, "tether")]
        for model_id in self._upstream_models or []:
            if model_id != LOCAL_MODEL_ID:  # that id always means the built-in model
                models.append(_entry(model_id, "upstream"))
        return models


def build_model_router(settings: Settings, http: httpx2.AsyncClient) -> ModelRouter:
    upstream = None
    if settings.llm_base_url:
        upstream = OpenAICompatibleModel(
            http, settings.llm_base_url, settings.llm_api_key, settings.llm_timeout_s
        )
    return ModelRouter(LocalModel(settings.local_model_tokens_per_s), upstream)


def _entry(model_id: str, owner: str) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": 0, "owned_by": owner}
