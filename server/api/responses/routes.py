"""The Responses API on ``/v1/responses``: a response is a task.

``POST`` admits the task as a chat completion does (the same admission, cancel scope, event
log, retention and owner check) and answers in its mode: ``background`` with the Response at
once, before any search, tool or model I/O (or, with ``stream`` too, with its event stream);
``stream`` with the event stream, bound to the connection; neither with the Response when it
ends, bound to the connection. ``GET`` reads the Response from the task's log (or its event
stream, resumed after ``starting_after``), ``cancel`` is a task stop, ``DELETE`` forgets it.
The translation of the log is ``translate.ResponseTranslator``'s.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Callable
from contextlib import nullcontext
from functools import partial
from typing import Any

from quart import Blueprint, Response, request

from server import fastjson
from server.api import sse
from server.api.binding import on_connection_close
from server.api.common import current_user, json_response, read_json_body, runtime, sse_headers
from server.api.responses.request import build_chat, chat_messages, conversation, parse_create
from server.api.responses.translate import SPAN, ResponseTranslator, response_status
from server.pipeline.usage import estimate_prompt_tokens
from server.record import TaskRecord
from server.runtime import Runtime
from server.schemas import RequestError
from server.tasks.backend import next_events
from server.tasks.errors import BackendUnavailable

log = logging.getLogger("tether.api")

blueprint = Blueprint("responses", __name__)

_ERROR_CODES = {"upstream_error": "server_error", "task_too_large": "server_error"}


def response_object(
    record: TaskRecord, status: str, output: list[dict[str, Any]], streamed: int = 0
) -> dict[str, Any]:
    """The Response of a task, with ``status`` and ``output`` as its log leaves them;
    ``streamed`` text deltas so far give a running response its usage so far."""
    meta = record.response or {}
    error = None
    if status == "failed" and record.error is not None:
        error = {
            "code": _ERROR_CODES.get(record.error["type"], "server_error"),
            "message": record.error["message"],
        }
    incomplete = None
    if status == "incomplete":
        incomplete = {"reason": "max_output_tokens"}
    body: dict[str, Any] = {
        "id": record.id,
        "object": "response",
        "created_at": record.created_at,
        "status": status,
        "background": meta.get("background", False),
        "model": record.model,
        "output": output,
        "instructions": meta.get("instructions"),
        "metadata": meta.get("metadata") or {},
        "parallel_tool_calls": meta.get("parallel_tool_calls", True),
        "temperature": meta.get("temperature"),
        "top_p": meta.get("top_p"),
        "tool_choice": meta.get("tool_choice") or "auto",
        "tools": meta.get("tools") or [],
        "max_output_tokens": meta.get("max_output_tokens"),
        "previous_response_id": meta.get("previous_response_id"),
        "store": meta.get("store", True),
        "text": meta.get("text") or {"format": {"type": "text"}},
        "truncation": meta.get("truncation") or "disabled",
        "safety_identifier": meta.get("safety_identifier"),
        "error": error,
        "incomplete_details": incomplete,
        "completed_at": record.ended_at if status == "completed" else None,
    }
    if status not in ("queued", "in_progress"):
        # An object or absent in the spec's Response, never null.
        body["usage"] = _usage(record)
    elif streamed:
        body["usage"] = _usage_so_far(meta, streamed)
    if meta.get("user") is not None:
        # A string or absent in the spec's Response, never null.
        body["user"] = meta["user"]
    return body


def _usage(record: TaskRecord) -> dict[str, Any]:
    usage: dict[str, Any] = dict(record.usage or {})
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return _usage_figures(prompt, completion, int(usage.get("total_tokens") or prompt + completion))


def _usage_figures(prompt: int, completion: int, total: int) -> dict[str, Any]:
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"cached_tokens": 0, "cache_write_tokens": 0},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": total,
    }


def _usage_so_far(meta: dict[str, Any], streamed: int) -> dict[str, Any]:
    """A running response's usage, counted as Tether counts an answer the model has not
    reported on (``pipeline.usage``): its prompt's characters / 4, a token per chunk."""
    messages = chat_messages([*meta.get("history", ()), *meta.get("input", ())])
    if meta.get("instructions"):
        messages.insert(0, {"role": "system", "content": meta["instructions"]})
    prompt = estimate_prompt_tokens(messages)
    return _usage_figures(prompt, streamed, prompt + streamed)


def translator(record: TaskRecord) -> ResponseTranslator:
    meta = record.response or {}
    return ResponseTranslator(record, response_object, mcp_lists=list(meta.get("mcp_lists", ())))


async def _own_response(rt: Runtime, user: str, response_id: str) -> TaskRecord:
    """The caller's response; another user's, a task that is not a response, or one stored
    with ``store: false`` is unknown."""
    record = await rt.manager.get(user, response_id)
    if record is None or record.response is None or record.response.get("store") is False:
        raise RequestError(404, "not_found", f"No response {response_id!r}.", param="response_id")
    return record


async def current_response(rt: Runtime, record: TaskRecord) -> dict[str, Any]:
    """The Response as the task's log has it now."""
    translation = translator(record)
    cursor = 0
    while events := await rt.manager.store.read(record.id, cursor, 1000):
        for event in events:
            translation.feed(event)
        cursor = events[-1].seq
    if not translation.ended and not record.active:
        # The log was trimmed or lost: the record's own end is what is left.
        translation.record, translation.status = record, response_status(record)
    return translation.response()


@blueprint.post("/v1/responses")
async def create() -> Response:
    """Admit the response as a task and answer in its mode. Cancelled (the client went
    away): a stream or sync response is stopped with reason ``disconnect``; a background
    one goes on."""
    arrived = time.perf_counter()
    rt = runtime()
    user = current_user()
    body = parse_create(await read_json_body())
    history: list[dict[str, Any]] = []
    if body.previous_response_id is not None:
        previous = await rt.manager.get(user, body.previous_response_id)
        if previous is None or previous.response is None:
            raise RequestError(
                404,
                "not_found",
                f"No response {body.previous_response_id!r}.",
                param="previous_response_id",
            )
        if previous.active:
            raise RequestError(
                400,
                "invalid_request",
                "The previous response has not ended yet.",
                param="previous_response_id",
            )
        output = (await current_response(rt, previous))["output"]
        history = conversation(previous, output)
    if body.background and body.store is False:
        raise RequestError(
            400,
            "invalid_request",
            "A background response is stored: store cannot be false.",
            param="store",
        )
    chat = build_chat(rt, body, history, previous_response_id=body.previous_response_id)
    record = await rt.manager.spawn(user, chat, trace_parent=request.headers.get("traceparent"))
    unbind = None
    if not body.background:
        unbind = on_connection_close(partial(rt.manager.cancel, record.id, "disconnect"))
    rt.metrics.time_to_task_id.labels("http").observe(time.perf_counter() - arrived)
    headers = {"X-Task-Id": record.id}
    if body.stream:
        return _sse(_stream(rt, record, 0, unbind=unbind), record.id)
    if body.background:
        return json_response(response_object(record, "queued", []), 200, headers)
    ended = await rt.manager.wait_ended(record.id)
    stored = await rt.manager.store.get(record.id) if ended is not None else None
    if stored is None:
        raise RequestError(500, "internal_error", "The response is no longer kept.")
    return json_response(await current_response(rt, stored), 200, headers)


def _sse(stream: AsyncIterator[str], task_id: str) -> Response:
    response = Response(stream, headers=sse_headers(task_id))
    response.timeout = None  # Quart's RESPONSE_TIMEOUT would cut a long stream
    return response


async def _stream(
    rt: Runtime,
    record: TaskRecord,
    starting_after: int | None,
    *,
    resume: bool = False,
    unbind: Callable[[], None] | None = None,
) -> AsyncIterator[str]:
    """The response's stream events past ``starting_after``: the log replayed through the
    translator from its start (the events up to the cursor are translated, not sent),
    then followed live until the terminal event. Closing the connection ends this reader;
    a stream bound to its response (not background) also stops the response. ``resume``:
    a reader coming back (``GET``), traced as one (``TaskManager.resume_span``). ``unbind``
    takes the binding back when the stream ends because the task store let it go."""
    store = rt.manager.store
    translation = translator(record)
    after = -1 if starting_after is None else starting_after
    cursor = 0
    resumed = rt.manager.resume_span(record, "responses", after) if resume else nullcontext()
    with resumed, store.reading(record.id):
        try:
            while (
                events := await next_events(
                    store, record.id, cursor, wait_s=rt.settings.sse_keepalive_s
                )
            ) is not None:
                if not events:
                    yield sse.KEEPALIVE
                    continue
                parts: list[str] = []
                for event in events:
                    cursor = event.seq
                    for out in translation.feed(event):
                        if out["sequence_number"] > after:
                            parts.append(f"event: {out['type']}\n" + sse.event(fastjson.dumps(out)))
                if parts:
                    yield "".join(parts)
                if translation.ended:
                    return
        except BackendUnavailable as exc:
            # Cut off from the task store: the stream ends where it is, and the client
            # resumes (``starting_after``) from another replica.
            log.warning("task=%s: its response stream ended early: %s", record.id, exc)
            if unbind is not None:
                unbind()  # the client did not leave: the response goes on by itself


@blueprint.get("/v1/responses/<response_id>")
async def retrieve(response_id: str) -> Response:
    rt = runtime()
    record = await _own_response(rt, current_user(), response_id)
    headers = {"X-Task-Id": record.id}
    if request.args.get("stream", "false").lower() in ("1", "true"):
        raw = request.args.get("starting_after")
        starting_after = None
        if raw is not None:
            try:
                starting_after = int(raw)
            except ValueError:
                raise RequestError(
                    400,
                    "invalid_request",
                    "'starting_after' must be an integer.",
                    param="starting_after",
                ) from None
            if starting_after < -1:
                raise RequestError(
                    400,
                    "invalid_request",
                    "'starting_after' must be >= -1.",
                    param="starting_after",
                )
        return _sse(_stream(rt, record, starting_after, resume=True), record.id)
    return json_response(await current_response(rt, record), 200, headers)


@blueprint.post("/v1/responses/<response_id>/cancel")
async def cancel(response_id: str) -> Response:
    """Stop the response as a task stop does, and answer it once ended (idempotent).
    Cancelling the request only stops the wait: the stop has been given."""
    rt = runtime()
    record = await _own_response(rt, current_user(), response_id)
    if not (record.response or {}).get("background"):
        raise RequestError(
            400,
            "invalid_request",
            "Only responses created with background=true can be cancelled.",
            param="response_id",
        )
    await rt.manager.stop(record.id, "stop")
    await rt.manager.wait_ended(record.id)
    ended = await rt.manager.store.get(record.id) or record
    return json_response(await current_response(rt, ended), 200, {"X-Task-Id": record.id})


@blueprint.delete("/v1/responses/<response_id>")
async def delete(response_id: str) -> Response:
    """Forget the response (a running one is stopped first)."""
    rt = runtime()
    record = await _own_response(rt, current_user(), response_id)
    if record.active:
        await rt.manager.stop(record.id, "stop")
        record = await rt.manager.wait_ended(record.id) or record
    await rt.manager.store.delete(record)
    return json_response({"id": record.id, "object": "response", "deleted": True})


@blueprint.get("/v1/responses/<response_id>/input_items")
async def input_items(response_id: str) -> Response:
    rt = runtime()
    record = await _own_response(rt, current_user(), response_id)
    items: list[dict[str, Any]] = list((record.response or {}).get("input", ()))
    order = request.args.get("order", "desc")
    if order not in ("asc", "desc"):
        raise RequestError(400, "invalid_request", "'order' must be asc or desc.", param="order")
    raw_limit = request.args.get("limit", "20")
    try:
        limit = int(raw_limit)
    except ValueError:
        limit = 0
    if not 1 <= limit <= 100:
        raise RequestError(
            400, "invalid_request", "'limit' must be between 1 and 100.", param="limit"
        )
    if order == "desc":
        items.reverse()
    after = request.args.get("after")
    if after is not None:
        ids = [i["id"] for i in items]
        if after not in ids:
            raise RequestError(404, "not_found", f"No input item {after!r}.", param="after")
        items = items[ids.index(after) + 1 :]
    page = items[:limit]
    return json_response(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": len(items) > limit,
        }
    )


__all__ = ["SPAN", "blueprint", "current_response", "response_object"]
