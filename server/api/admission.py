"""What both transports do with a chat request before it becomes a task, and how a failed
task maps to HTTP: one copy, so that HTTP and WebSocket refuse the same things with the same
codes and fields."""

from __future__ import annotations

from typing import Any

from server.runtime import Runtime
from server.schemas import ChatRequest, RequestError, parse_chat_request
from server.tasks.errors import (
    BackendUnavailable,
    ShuttingDown,
    TaskRefused,
    TooManyTasks,
    UnknownSession,
)


async def check_chat(rt: Runtime, user: str, raw: Any) -> ChatRequest:
    """Validate a decoded chat request and what it names (tools, model, session). Raises
    ``RequestError`` (400, or 404 for an unknown model) or ``UnknownSession`` (another
    user's session), with ``param`` naming the field. Only the session's owner may need a
    look at the shared task store."""
    chat = parse_chat_request(raw, default_model=rt.settings.default_model)
    unknown = [t for t in chat.tool_ids if t not in rt.tools]
    if unknown:
        raise RequestError(
            400, "invalid_request", f"Unknown tool_ids: {', '.join(unknown)}.", param="tool_ids"
        )
    model = rt.models.resolve(chat.model)
    if model is None:
        raise RequestError(
            404, "model_not_found", f"The model {chat.model!r} does not exist.", param="model"
        )
    if model is rt.models.local:
        # An upstream gets n and logprobs as they are; the built-in model has neither.
        refused = chat.unsupported_by_local_model()
        if refused is not None:
            raise refused
    if chat.session_id is not None:
        await rt.sessions.check_owner(user, chat.session_id)
    return chat


def failure_status(error_type: str) -> int:
    """The HTTP status of a task that failed with ``error.type``: the upstream's failure
    (or an answer past the task's bounds) is 502, a model the upstream does not know is
    404, anything else is ours (500)."""
    if error_type == "upstream_error":
        return 502
    if error_type == "model_not_found":
        return 404
    if error_type == "task_too_large":
        return 502  # the upstream's answer went past the task's bounds
    return 500


def refusal(exc: TaskRefused) -> RequestError:
    """The HTTP answer to what the task layer refused."""
    if isinstance(exc, TooManyTasks):
        return RequestError(429, "too_many_tasks", exc.message, headers={"Retry-After": "1"})
    if isinstance(exc, ShuttingDown):
        return RequestError(503, "shutting_down", exc.message)
    if isinstance(exc, BackendUnavailable):
        return RequestError(503, "backend_unavailable", exc.message, headers={"Retry-After": "1"})
    if isinstance(exc, UnknownSession):
        return RequestError(404, "not_found", exc.message, param="session_id")
    return RequestError(500, "internal_error", exc.message)
