"""Any OpenAI-compatible upstream: OpenAI, Ollama, vLLM, llama.cpp, LiteLLM.

Every completion is requested as a stream (``"stream": true`` with usage included), whatever
the client asked for: the pipeline decides how to present it, and a stream lets the task hold
the partial answer at every moment. The SSE body is parsed by httpx2's ``EventSource``, with
a bound on one event's size, so that an upstream sending a line without end cannot grow our
memory without bound.

Every failure comes out as ``ModelError``: an error status (with the upstream's own message
when its body has one), a transport error or timeout, a chunk that is not JSON, an error
chunk, or a stream that ends before ``[DONE]`` and before any ``finish_reason``. No httpx2
exception escapes.
"""

from __future__ import annotations

import json
from typing import Any

import httpx2

from server import fastjson
from server.providers.llm.base import ModelDelta, ModelError, OnDelta, ToolCallDelta
from server.providers.llm.paced import PacedStream

# An SSE event is one chunk: a few hundred bytes, a few KiB for a large tool-call argument.
_MAX_EVENT_BYTES = 1_000_000
# Enough for any JSON error message; an HTML error page is cut here and not shown anyway.
_MAX_ERROR_BODY_BYTES = 64 * 1024
# A whole non-streamed completion (from an upstream that ignores "stream": true) or model list.
_MAX_JSON_BODY_BYTES = 16 * 1024 * 1024
# Connecting never needs the generation timeout: a dead host should fail fast.
_CONNECT_TIMEOUT_S = 10.0
_LIST_TIMEOUT_S = 10.0

# What httpx2 can raise from a request: HTTPError covers transport errors and timeouts,
# StreamError a misused body, InvalidURL a bad base URL. None of them may escape.
_HTTP_FAILURES: tuple[type[Exception], ...] = (
    httpx2.HTTPError,
    httpx2.StreamError,
    httpx2.InvalidURL,
)


class OpenAICompatibleModel:
    """A model served by an OpenAI-compatible HTTP API at ``base_url`` (``.../v1``).

    ``http`` is the app's shared client; this class never closes it. ``api_key``, when set,
    is sent as ``Authorization: Bearer``. ``timeout`` bounds each read of the stream (the
    longest silence tolerated between two chunks), not the whole completion.
    With a paced client (``paced.paced_client``), reads wait while the server is busy.
    """

    def __init__(
        self, http: httpx2.AsyncClient, base_url: str, api_key: str | None, timeout: float
    ) -> None:
        self._http = http
        self._base = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._stream_timeout = httpx2.Timeout(timeout, connect=min(timeout, _CONNECT_TIMEOUT_S))
        self._list_timeout = httpx2.Timeout(min(timeout, _LIST_TIMEOUT_S))

    async def list_models(self) -> list[str]:
        """The upstream's model ids (``GET {base}/models``). Raises ``ModelError``.

        Cancelling it closes the request's connection.
        """
        try:
            async with self._http.stream(
                "GET", self._base + "/models", headers=self._headers, timeout=self._list_timeout
            ) as response:
                if not _is_success(response.status_code):
                    raw, _ = await _read_at_most(response, _MAX_ERROR_BODY_BYTES)
                    raise ModelError(
                        _error_message(raw, response.status_code), status=response.status_code
                    )
                raw, complete = await _read_at_most(response, _MAX_JSON_BODY_BYTES)
        except _HTTP_FAILURES as exc:
            raise ModelError(_describe_failure(exc)) from None
        if not complete:
            raise ModelError("upstream sent a model list that is too large")
        return _parse_model_list(raw)

    async def stream_chat(self, body: dict[str, Any], on_delta: OnDelta) -> None:
        """Stream one completion from the upstream, calling ``on_delta`` for every chunk that
        carries something (content, reasoning, tool-call pieces, finish reason, usage).

        Raises ``ModelError`` after the deltas already delivered. Cancelling it closes the
        upstream connection (the ``async with`` around the response exits) before the
        cancellation propagates; nothing is shielded, so a stop is never delayed by the
        upstream.
        """
        payload = {**body, "stream": True, "stream_options": {"include_usage": True}}
        # Identity encoding lets the stream be read raw, without a decoder layer per chunk:
        # this loop runs once per token of every task.
        headers = {**self._headers, "Accept": "text/event-stream", "Accept-Encoding": "identity"}
        finished = False  # saw [DONE] or a finish_reason: the answer is whole
        try:
            async with self._http.stream(
                "POST",
                self._base + "/chat/completions",
                json=payload,
                headers=headers,
                timeout=self._stream_timeout,
            ) as response:
                if not _is_success(response.status_code):
                    raw, _ = await _read_at_most(response, _MAX_ERROR_BODY_BYTES)
                    raise ModelError(
                        _error_message(raw, response.status_code), status=response.status_code
                    )
                if _media_type(response) == "application/json":
                    # Some servers ignore "stream": true and answer with one completion.
                    raw, complete = await _read_at_most(response, _MAX_JSON_BODY_BYTES)
                    if not complete:
                        raise ModelError("upstream sent a completion that is too large")
                    for delta in _completion_deltas(raw):
                        await on_delta(delta)
                    return
                # What arrived together is handed on as one delta. On a paced connection
                # (see ``paced``) "together" is everything one socket read brought, handed
                # on when the connection next needs bytes; otherwise it is one event.
                pending: list[ModelDelta] = []

                async def flush() -> None:
                    if len(pending) == 1:  # the common case: one chunk, one delta
                        delta = pending.pop()
                        await on_delta(delta)
                    elif pending:
                        merged = _merged_by_choice(pending)
                        pending.clear()
                        for delta in merged:
                            await on_delta(delta)

                network = response.extensions.get("network_stream")
                paced = isinstance(network, PacedStream)
                if isinstance(network, PacedStream):
                    network.before_wait = flush
                try:
                    # httpx2's parser follows the SSE spec: CR, LF and CRLF line ends, an
                    # event's data lines joined, comments and other fields skipped, an
                    # event ended by its blank line (one cut off at the end is dropped),
                    # and a bound on the size of one event.
                    async for event in httpx2.EventSource(response, _MAX_EVENT_BYTES):
                        data = event.data.strip()
                        if not data:
                            continue  # an event of other fields only (retry:, id:)
                        if data == "[DONE]":
                            await flush()
                            return
                        try:
                            deltas = _parse_chunk(data)
                        except ModelError:
                            await flush()  # a bad chunk fails the stream after the good ones
                            raise
                        for delta in deltas:
                            finished = finished or delta.finish_reason is not None
                            if _carries_something(delta):
                                pending.append(delta)
                        if not paced:
                            await flush()
                    await flush()
                except _HTTP_FAILURES:
                    await flush()  # what arrived before the connection failed is kept
                    raise
                finally:
                    if isinstance(network, PacedStream):
                        network.before_wait = None
        except _HTTP_FAILURES as exc:
            if finished:
                # The answer is complete; only the usage chunk or [DONE] was lost with the
                # connection, which is no reason to fail the task.
                return
            raise ModelError(_describe_failure(exc)) from None
        if not finished:
            raise ModelError("upstream stream ended early")


def _json_object(raw: str | bytes, invalid: str) -> dict[str, Any]:
    """Decode an upstream JSON object, raising ``ModelError`` for bad JSON, a non-object,
    or an ``error`` the upstream put in place of an answer."""
    try:
        value = fastjson.loads(raw)
    except (ValueError, RecursionError):
        raise ModelError(invalid) from None
    if not isinstance(value, dict):
        raise ModelError(invalid)
    if value.get("error"):
        raise ModelError(f"upstream error: {_error_text(value['error'])}")
    return value


def _parse_chunk(data: str) -> list[ModelDelta]:
    """A chunk's deltas, one per choice it carries (one, unless ``n`` > 1), the chunk's
    usage on the last."""
    chunk = _json_object(data, "upstream sent invalid JSON in its stream")
    usage = chunk.get("usage")
    usage = usage if isinstance(usage, dict) else None
    choices = chunk.get("choices")
    if not isinstance(choices, list):
        return [ModelDelta(usage=usage)]
    deltas = [_choice_delta(choice, "delta") for choice in choices if isinstance(choice, dict)]
    if not deltas:
        return [ModelDelta(usage=usage)]
    deltas[-1].usage = usage
    return deltas


def _choice_delta(choice: dict[str, Any], key: str) -> ModelDelta:
    """One choice of a chunk (``key`` "delta") or of a whole completion ("message")."""
    delta = ModelDelta()
    index = choice.get("index")
    if type(index) is int and index > 0:
        delta.index = index
    piece = choice.get(key)
    if isinstance(piece, dict):
        delta.content = _string(piece.get("content"))
        delta.reasoning = _string(piece.get("reasoning_content")) or _string(piece.get("reasoning"))
        delta.tool_calls = _tool_call_deltas(piece.get("tool_calls"))
    finish = choice.get("finish_reason")
    delta.finish_reason = finish if isinstance(finish, str) and finish else None
    logprobs = choice.get("logprobs")
    if logprobs is not None:  # null unless asked for: the common chunk stops here
        tokens = logprobs.get("content") if isinstance(logprobs, dict) else None
        if isinstance(tokens, list):
            delta.logprobs = [token for token in tokens if isinstance(token, dict)]
    return delta


def _completion_deltas(raw: bytes) -> list[ModelDelta]:
    """A non-streamed ``chat.completion`` as the deltas a stream would have carried."""
    completion = _json_object(raw, "upstream sent an invalid completion")
    choices = completion.get("choices")
    answers = [
        _choice_delta(choice, "message")
        for choice in (choices if isinstance(choices, list) else [])
        if isinstance(choice, dict)
    ]
    if not answers:
        raise ModelError("upstream sent a completion without choices")
    for answer in answers:
        answer.finish_reason = answer.finish_reason or "stop"
    usage = completion.get("usage")
    if isinstance(usage, dict):
        return [*answers, ModelDelta(usage=usage)]
    return answers


def _tool_call_deltas(raw: Any) -> list[ToolCallDelta]:
    if not isinstance(raw, list):
        return []
    calls: list[ToolCallDelta] = []
    for position, call in enumerate(raw):
        if not isinstance(call, dict):
            continue
        index = call.get("index")
        function = call.get("function")
        function = function if isinstance(function, dict) else {}
        arguments = function.get("arguments")
        if isinstance(arguments, dict):
            # A few servers send the arguments as an object rather than a JSON string.
            arguments = json.dumps(arguments)
        calls.append(
            ToolCallDelta(
                index=index if isinstance(index, int) and not isinstance(index, bool) else position,
                id=_string(call.get("id")) or None,
                name=_string(function.get("name")) or None,
                arguments=_string(arguments),
            )
        )
    return calls


def _merged_by_choice(deltas: list[ModelDelta]) -> list[ModelDelta]:
    """Consecutive deltas as one per choice, the choices in the order they first came
    (``n`` > 1 interleaves them; each choice's pieces keep their order)."""
    by_choice: dict[int, list[ModelDelta]] = {}
    for delta in deltas:
        by_choice.setdefault(delta.index, []).append(delta)
    return [_merged(group) for group in by_choice.values()]


def _merged(deltas: list[ModelDelta]) -> ModelDelta:
    """Consecutive deltas of one choice as one: texts joined, tool-call pieces in order
    (they are assembled by index downstream), token logprobs in order, the chunks of text
    or tool calls counted, the last finish reason and usage."""
    if len(deltas) == 1:
        return deltas[0]
    merged = ModelDelta(
        content="".join(d.content for d in deltas),
        reasoning="".join(d.reasoning for d in deltas),
        tool_calls=[piece for d in deltas for piece in d.tool_calls],
        chunks=sum(d.chunks for d in deltas if d.content or d.reasoning or d.tool_calls),
        index=deltas[0].index,
    )
    if any(d.logprobs is not None for d in deltas):
        merged.logprobs = [token for d in deltas for token in d.logprobs or ()]
    for d in deltas:
        merged.finish_reason = d.finish_reason or merged.finish_reason
        merged.usage = d.usage or merged.usage
    return merged


def _carries_something(delta: ModelDelta) -> bool:
    return bool(
        delta.content
        or delta.reasoning
        or delta.tool_calls
        or delta.finish_reason
        or delta.usage
        or delta.logprobs
    )


def _parse_model_list(raw: bytes) -> list[str]:
    try:
        listing = json.loads(raw)
    except ValueError:
        raise ModelError("upstream sent an invalid model list") from None
    data = listing.get("data") if isinstance(listing, dict) else None
    if not isinstance(data, list):
        raise ModelError("upstream sent an invalid model list")
    return [str(m["id"]) for m in data if isinstance(m, dict) and m.get("id")]


def _error_message(raw: bytes, status: int) -> str:
    """The upstream's own words when its error body has them (OpenAI ``error.message``,
    ``error`` as a string, or the ``message``/``detail`` that other servers use)."""
    text = raw.decode("utf-8", errors="replace").strip()
    try:
        body = json.loads(text)
    except ValueError:
        body = None
    if isinstance(body, dict):
        for key in ("error", "message", "detail"):
            if body.get(key):
                return f"upstream error: {_error_text(body[key])}"
    elif text and not text.startswith("<") and len(text) <= 300:
        # A short plain-text body is the message; an HTML error page is noise.
        return f"upstream error: {' '.join(text.split())}"
    return f"upstream answered HTTP {status}"


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        message = error.get("message")
        if message:
            return str(message)[:500]
    if isinstance(error, str):
        return error[:500]
    return json.dumps(error)[:500]


def _describe_failure(exc: Exception) -> str:
    if isinstance(exc, httpx2.TimeoutException):
        return f"upstream timed out ({type(exc).__name__})"
    detail = str(exc)
    return f"upstream connection failed: {type(exc).__name__}" + (f": {detail}" if detail else "")


async def _read_at_most(response: httpx2.Response, limit: int) -> tuple[bytes, bool]:
    """Up to ``limit`` bytes of the body, and whether that was all of it."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            return b"".join(chunks)[:limit], False
    return b"".join(chunks), True


def _is_success(status: int) -> bool:
    return 200 <= status < 300


def _media_type(response: httpx2.Response) -> str:
    return response.headers.get("content-type", "").split(";", 1)[0].strip().lower()


def _string(value: Any) -> str:
    return value if isinstance(value, str) else ""
