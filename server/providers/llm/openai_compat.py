"""Any OpenAI-compatible upstream: OpenAI, Ollama, vLLM, llama.cpp, LiteLLM."""

from __future__ import annotations

import json
from typing import Any

import httpx2

from server.providers.llm.base import ModelDelta, ModelError, OnDelta, ToolCallDelta


class OpenAICompatibleModel:
    def __init__(self, http: httpx2.AsyncClient, base_url: str, api_key: str | None,
                 timeout: float) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._timeout = timeout
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}

    async def list_models(self) -> list[str]:
        """The upstream's model ids. Cancelling it closes the request's connection."""
        try:
            response = await self._http.get(self._base + "/models", headers=self._headers,
                                            timeout=10.0)
        except httpx2.HTTPError as exc:
            raise ModelError(f"upstream unreachable: {type(exc).__name__}") from None
        if response.status_code >= 400:
            raise ModelError(_error_message(response.content, response.status_code),
                             status=response.status_code)
        try:
            data = response.json().get("data", [])
            return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m]
        except (ValueError, AttributeError):
            raise ModelError("upstream sent an invalid model list") from None

    async def stream_chat(self, body: dict[str, Any], on_delta: OnDelta) -> None:
        """Stream one completion from the upstream, delta by delta.

        Cancelling it closes the upstream connection (the ``async with`` around the
        response exits) before the cancellation propagates.
        """
        payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
        finished = False
        try:
            async with self._http.stream("POST", self._base + "/chat/completions",
                                         json=payload, headers=self._headers,
                                         timeout=self._timeout) as response:
                if response.status_code >= 400:
                    raw = await response.aread()
                    raise ModelError(_error_message(raw, response.status_code),
                                     status=response.status_code)
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        finished = True
                        break
                    delta = _parse_chunk(data)
                    if delta.finish_reason:
                        finished = True
                    await on_delta(delta)
        except httpx2.HTTPError as exc:
            raise ModelError(f"upstream connection failed: {type(exc).__name__}: {exc}") from None
        if not finished:
            raise ModelError("upstream stream ended early")


def _parse_chunk(data: str) -> ModelDelta:
    try:
        chunk = json.loads(data)
    except ValueError:
        raise ModelError("upstream sent invalid JSON in its stream") from None
    if not isinstance(chunk, dict):
        raise ModelError("upstream sent an invalid chunk")
    if "error" in chunk:
        error = chunk["error"]
        message = error.get("message") if isinstance(error, dict) else str(error)
        raise ModelError(f"upstream error: {message}")
    result = ModelDelta(usage=chunk.get("usage") if isinstance(chunk.get("usage"), dict) else None)
    choices = chunk.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        return result
    choice = choices[0]
    delta = choice.get("delta") or {}
    result.content = delta.get("content") or ""
    result.reasoning = delta.get("reasoning_content") or delta.get("reasoning") or ""
    for i, call in enumerate(delta.get("tool_calls") or []):
        function = call.get("function") or {}
        result.tool_calls.append(ToolCallDelta(
            index=int(call.get("index", i)), id=call.get("id"), name=function.get("name"),
            arguments=function.get("arguments") or ""))
    result.finish_reason = choice.get("finish_reason")
    return result


def _error_message(raw: bytes, status: int) -> str:
    try:
        body = json.loads(raw)
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict) and error.get("message"):
            return f"upstream error {status}: {error['message']}"
        if isinstance(error, str):
            return f"upstream error {status}: {error}"
    except ValueError:
        pass
    return f"upstream error {status}"
