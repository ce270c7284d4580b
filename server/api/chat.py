"""POST /api/chat/completions in its three modes: background, streaming and sync.

Every mode spawns the same task. The background answer awaits nothing but admission. The
streaming and sync answers follow the task's event log and are bound to their connection:
when quart-trio cancels the handler because the client went away, the ``finally`` stops the
task with reason ``disconnect`` (``stop`` is synchronous, so nothing needs shielding).
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from functools import partial
from typing import Any

from quart import Blueprint, Response, request

from server import fastjson
from server.api import sse
from server.api.admission import check_chat, failure_status
from server.api.answers import (
    AssistantMessage,
    BackgroundAccepted,
    ChatCompletion,
    Choice,
    ChoiceLogprobs,
    TaskSummary,
)
from server.api.binding import on_connection_close
from server.api.common import current_user, json_response, read_json_body, runtime, sse_headers
from server.record import OtherChoice, TaskRecord, Usage
from server.runtime import Runtime
from server.schemas import RequestError
from server.tasks.backend import next_events
from server.tasks.errors import BackendUnavailable

log = logging.getLogger("tether.api")

blueprint = Blueprint("chat", __name__)


@blueprint.post("/api/chat/completions")
@blueprint.post("/v1/chat/completions")
async def chat_completions() -> Response:
    """Admit the request as a task and answer in its mode.

    Cancelled (the client went away): a streaming or sync task is stopped with reason
    ``disconnect``; a background task goes on."""
    arrived = time.perf_counter()
    rt = runtime()
    user = current_user()
    chat = await check_chat(rt, user, await read_json_body())
    record = await rt.manager.spawn(user, chat, trace_parent=request.headers.get("traceparent"))
    unbind = None
    if record.mode != "background":
        # Bound to this connection however it ends (see app.bind_to_connection).
        unbind = on_connection_close(partial(rt.manager.cancel, record.id, "disconnect"))
    rt.metrics.time_to_task_id.labels("http").observe(time.perf_counter() - arrived)
    headers = {"X-Task-Id": record.id}
    if record.mode == "background":
        accepted = BackgroundAccepted(
            task_id=record.id, chat_id=record.chat_id, message_id=record.message_id, status="queued"
        )
        return json_response(accepted.model_dump(), 202, headers)
    openai = request.path.startswith("/v1/")
    if record.mode == "stream":
        include_usage = bool((chat.stream_options or {}).get("include_usage"))
        response = Response(
            _stream(rt, record, include_usage, openai, unbind), headers=sse_headers(record.id)
        )
        response.timeout = None  # Quart's RESPONSE_TIMEOUT would cut a long stream
        return response
    ended = await rt.manager.wait_ended(record.id)
    if ended is None:  # expired already: retention shorter than the wait
        raise RequestError(500, "internal_error", "The task's result is no longer kept.")
    return _completion_response(ended, headers, openai, logprobs=chat.logprobs)


def _finish_reason(record: TaskRecord, openai: bool, choice: OtherChoice | None = None) -> str:
    """``cancelled`` for a stopped answer on Tether's own route; on ``/v1`` only OpenAI's
    values (a typed client with a closed set would throw on another), and the ``task``
    object tells that it was stopped. ``choice``: one after the first (``n`` > 1)."""
    if record.status == "cancelled":
        return "stop" if openai else "cancelled"
    reason = record.finish_reason if choice is None else choice["finish_reason"]
    return reason or "stop"


def _usage(record: TaskRecord) -> Usage:
    """The task's usage (see ``pipeline.usage``), or zeros for an answer that never reached
    the model (stopped during its web search, say): OpenAI's clients expect an object."""
    if record.usage is not None:
        return record.usage
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "estimated": True}


def _task_summary(record: TaskRecord) -> TaskSummary:
    return TaskSummary(id=record.id, status=record.status, cancel_reason=record.cancel_reason)


def _completion_response(
    record: TaskRecord, headers: dict[str, str], openai: bool, *, logprobs: bool
) -> Response:
    if record.status == "failed" and record.error is not None:
        code = record.error["type"]
        error = RequestError(failure_status(code), code, record.error["message"])
        return json_response(error.body(), error.status, headers)
    message = AssistantMessage(role="assistant", content=record.content, refusal=None)
    client_calls = [c for c in record.tool_calls if not c.get("server")]
    if client_calls:
        message.tool_calls = client_calls
        message.content = record.content or None  # as OpenAI: null beside tool calls
    if record.reasoning:
        message.reasoning_content = record.reasoning
    completion = ChatCompletion(
        id="chatcmpl-" + record.id,
        object="chat.completion",
        created=int(record.created_at),
        model=record.model,
        choices=[
            Choice(
                index=0,
                message=message,
                finish_reason=_finish_reason(record, openai),
                logprobs=ChoiceLogprobs(content=record.logprobs) if logprobs else None,
            ),
            # n > 1: the other answers the model gave (an upstream that ignores n gives
            # none, and the answer has one choice, as the model's own would).
            *(
                Choice(
                    index=choice["index"],
                    message=AssistantMessage(
                        role="assistant", content=choice["content"], refusal=None
                    ),
                    finish_reason=_finish_reason(record, openai, choice),
                    logprobs=ChoiceLogprobs(content=choice["logprobs"]) if logprobs else None,
                )
                for choice in record.other_choices
            ),
        ],
        usage=_usage(record),
        sources=record.sources,
        task_id=record.id,
        task=_task_summary(record),
    )
    return json_response(completion.model_dump(exclude_unset=True), 200, headers)


def _chunk(
    record: TaskRecord,
    delta: dict[str, Any],
    index: int = 0,
    logprobs: list[dict[str, Any]] | None = None,
) -> str:
    """A chunk of one choice's delta. Built in one expression: it runs per token."""
    body = {
        "id": "chatcmpl-" + record.id,
        "object": "chat.completion.chunk",
        "created": int(record.created_at),
        "model": record.model,
        "choices": [
            {
                "index": index,
                "delta": delta,
                "finish_reason": None,
                "logprobs": logprobs and {"content": logprobs},
            }
        ],
    }
    return sse.event(fastjson.dumps(body))


def _chunk_of(record: TaskRecord, choices: list[dict[str, Any]], **extra: Any) -> str:
    body = {
        "id": "chatcmpl-" + record.id,
        "object": "chat.completion.chunk",
        "created": int(record.created_at),
        "model": record.model,
        "choices": choices,
        **extra,
    }
    return sse.event(fastjson.dumps(body))


async def _stream(
    rt: Runtime,
    record: TaskRecord,
    include_usage: bool,
    openai: bool,
    unbind: Callable[[], None] | None = None,
) -> AsyncIterator[str]:
    """The OpenAI chunk stream of one task.

    Status steps go out as SSE comment lines, which clients ignore and proxies see as
    traffic; a comment is also sent every ``sse_keepalive_s`` while nothing else happens.
    If the client goes away, the task is stopped by the connection binding that the
    handler registered (``binding.bind_to_connection``), started or not; ``unbind`` takes
    that back, when the stream ends because the task store let its readers go.
    """
    store = rt.manager.store
    keepalive = rt.settings.sse_keepalive_s
    cursor = 0
    role_sent = False
    # n > 1: the choices after the first whose role went out (OpenAI sends it in each
    # choice's first delta).
    other_roles_sent: set[int] = set()
    with store.reading(record.id):
        yield sse.comment("task " + record.id)
        try:
            while (
                events := await next_events(store, record.id, cursor, wait_s=keepalive)
            ) is not None:
                if not events:
                    yield sse.KEEPALIVE
                    continue
                # Whatever piled up since the last write goes out in one write.
                parts: list[str] = []
                for event in events:
                    cursor = event.seq
                    if event.type == "delta":
                        data = event.data
                        index = data.get("index", 0)
                        delta: dict[str, Any] = {}
                        if index == 0:
                            if not role_sent:
                                delta["role"] = "assistant"
                                role_sent = True
                        elif index not in other_roles_sent:
                            delta["role"] = "assistant"
                            other_roles_sent.add(index)
                        delta["content"] = data.get("content", "")
                        if "reasoning" in data:
                            delta["reasoning_content"] = data["reasoning"]
                        if "tool_calls" in data:
                            delta["tool_calls"] = [
                                {"index": i, **call} for i, call in enumerate(data["tool_calls"])
                            ]
                        parts.append(_chunk(record, delta, index, data.get("logprobs")))
                    elif event.type == "status":
                        parts.append(sse.comment(str(event.data.get("description", ""))))
                    elif event.terminal:
                        # The terminal event carries the task as it ended.
                        ended = TaskRecord.from_dict(event.data)
                        parts.extend(_stream_end(ended, include_usage, openai))
                        yield "".join(parts)
                        return
                if parts:
                    yield "".join(parts)
        except BackendUnavailable as exc:
            # The task store cannot be heard (this replica is cut off from it): the
            # stream ends with the error, as a failed task's does; the task goes on (it
            # ends as its writes allow, or is ended by a replica that took this one for
            # dead), readable by its id in the payload.
            log.warning("task=%s: its stream ended early: %s", record.id, exc)
            if unbind is not None:
                unbind()  # the client did not leave: the task goes on, or ends, by itself
            error = RequestError(503, "backend_unavailable", exc.message)
            yield sse.event(fastjson.dumps({**error.body(), "task_id": record.id})) + sse.DONE


def _stream_end(record: TaskRecord, include_usage: bool, openai: bool) -> list[str]:
    if record.status == "failed" and record.error is not None:
        error = RequestError(
            failure_status(record.error["type"]), record.error["type"], record.error["message"]
        )
        payload = {**error.body(), "task_id": record.id}
        return [sse.event(fastjson.dumps(payload)), sse.DONE]
    # One chunk ends every choice: each with its finish reason.
    finishes = [
        {"index": 0, "delta": {}, "finish_reason": _finish_reason(record, openai), "logprobs": None}
    ]
    finishes += [
        {
            "index": choice["index"],
            "delta": {},
            "finish_reason": _finish_reason(record, openai, choice),
            "logprobs": None,
        }
        for choice in record.other_choices
    ]
    out = [
        _chunk_of(
            record,
            finishes,
            sources=record.sources,
            task_id=record.id,
            task=_task_summary(record).model_dump(),
        )
    ]
    if include_usage:
        body = {
            "id": "chatcmpl-" + record.id,
            "object": "chat.completion.chunk",
            "created": int(record.created_at),
            "model": record.model,
            "choices": [],
            "usage": _usage(record),
        }
        out.append(sse.event(fastjson.dumps(body)))
    out.append(sse.DONE)
    return out
