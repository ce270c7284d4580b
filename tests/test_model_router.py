"""The model router (server/providers/llm/router.py): which provider serves a model name, the
list it shows, and how a failed refresh of the upstream's list is kept; and the router the
settings build. The upstream is a stand-in provider, or an answer behind httpx2's
MockTransport (tests/mock_upstream.py) where the router's HTTP client is built."""

from __future__ import annotations

from typing import Any

import trio

from server.config import Settings
from server.providers.llm.base import ModelError, ModelProvider
from server.providers.llm.local import LocalModel
from server.providers.llm.openai_compat import OpenAICompatibleModel
from server.providers.llm.router import ModelRouter, build_model_router
from tests.mock_upstream import MockUpstream, json_response


class ListingUpstream:
    """A ``ModelProvider`` whose model list (or failure) the test sets."""

    def __init__(self) -> None:
        self.models: list[str] | Exception = []

    async def list_models(self) -> list[str]:
        await trio.lowlevel.checkpoint()
        if isinstance(self.models, Exception):
            raise self.models
        return self.models

    async def stream_chat(self, body: dict[str, Any], on_delta: Any) -> None:
        raise NotImplementedError


def router_with(upstream: ModelProvider | None) -> ModelRouter:
    return ModelRouter(LocalModel(0), upstream)


async def test_router_without_upstream_serves_only_local() -> None:
    router = router_with(None)
    await router.refresh()
    assert isinstance(router.resolve("local"), LocalModel)
    assert router.resolve("gpt-x") is None
    assert router.list_models() == [
        {"id": "local", "object": "model", "created": 0, "owned_by": "tether"}
    ]


async def test_router_lets_the_upstream_decide_until_its_list_is_known() -> None:
    upstream = ListingUpstream()
    router = router_with(upstream)
    assert router.resolve("anything") is upstream
    upstream.models = ["gpt-x"]
    await router.refresh()
    assert router.resolve("gpt-x") is upstream
    assert router.resolve("anything") is None
    assert isinstance(router.resolve("local"), LocalModel)
    assert [(m["id"], m["owned_by"]) for m in router.list_models()] == [
        ("local", "tether"),
        ("gpt-x", "upstream"),
    ]


async def test_router_refresh_failure_keeps_the_old_list_and_remembers_the_error() -> None:
    upstream = ListingUpstream()
    router = router_with(upstream)
    upstream.models = ["gpt-x"]
    await router.refresh()
    upstream.models = ModelError("upstream answered HTTP 503", status=503)
    await router.refresh()
    assert router.resolve("gpt-x") is upstream
    assert router.last_error == "upstream answered HTTP 503"
    upstream.models = RuntimeError("a provider bug")
    await router.refresh()  # never raises
    assert router.last_error is not None and "RuntimeError" in router.last_error
    upstream.models = ["gpt-y"]
    await router.refresh()
    assert router.last_error is None
    assert router.resolve("gpt-x") is None and router.resolve("gpt-y") is upstream


async def test_build_model_router_uses_the_settings() -> None:
    upstream = MockUpstream()
    upstream.route("GET", "/v1/models", json_response({"data": [{"id": "remote"}]}))
    async with upstream.client() as http:
        assert build_model_router(Settings(), http).upstream is None
        router = build_model_router(
            Settings(llm_base_url=upstream.base_url + "/v1", llm_api_key="k"), http
        )
        await router.refresh()
    assert [m["id"] for m in router.list_models()] == ["local", "remote"]
    assert isinstance(router.resolve("remote"), OpenAICompatibleModel)
    assert upstream.requests[0].headers["authorization"] == "Bearer k"
