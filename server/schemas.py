"""Request, task and event models. Validation of incoming requests lives here.

The chat request is an OpenAI chat-completions body plus Tether's fields. Only the fields
Tether acts on are checked; everything else passes through to the model untouched.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server import fastjson

Mode = Literal["background", "stream", "sync"]
Status = Literal["queued", "running", "completed", "cancelled", "failed"]
Phase = Literal["queued", "web_search", "tools", "generating", "done"]
CancelReason = Literal["stop", "disconnect", "shutdown", "timeout"]

TERMINAL_EVENTS = frozenset({"task:completed", "task:cancelled", "task:failed"})
ACTIVE_STATUSES = frozenset({"queued", "running"})


class RequestError(Exception):
    """A request that cannot be served, with the status and OpenAI-shaped error it gets."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        param: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.error_type = error_type or _default_type(status)
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }


def _default_type(status: int) -> str:
    if status == 401:
        return "authentication_error"
    if status == 404:
        return "not_found_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


class TaskFailure(Exception):
    """A failure the pipeline reports as the task's ``error`` (``type`` and ``message``)."""

    def __init__(self, type_: str, message: str) -> None:
        super().__init__(message)
        self.type = type_
        self.message = message


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class Features(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    web_search: bool = False


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class FunctionTool(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    name: str


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["function"]
    function: NamedFunction


class ResponseFormat(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = None


class ChatRequestModel(BaseModel):
    """OpenAI's chat-completions request, checked by its published types and ranges, plus
    Tether's fields. Fields not named here pass through to the model unchecked."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    features: Features = Field(default_factory=Features)
    tool_ids: list[str] = Field(default_factory=list)
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    stream_options: dict[str, Any] | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    n: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    seed: int | None = None
    stop: str | list[str] | None = None
    logit_bias: dict[str, int] | None = None
    response_format: ResponseFormat | None = None
    user: str | None = None
    chat_id: str | None = None
    message_id: str | None = None
    session_id: str | None = None
    background: bool = False


# Tether's own fields: they never reach the model.
TETHER_FIELDS = frozenset(
    {"features", "tool_ids", "chat_id", "message_id", "session_id", "background", "stream",
     "stream_options"}
)


@dataclass
class ChatRequest:
    """A validated chat request."""

    model: str
    messages: list[dict[str, Any]]
    stream: bool
    web_search: bool
    tool_ids: list[str]
    chat_id: str | None
    message_id: str | None
    session_id: str | None
    background: bool
    # Everything the model should see besides model and messages (temperature, tools, ...).
    passthrough: dict[str, Any]
    stream_options: dict[str, Any] | None = None

    @property
    def mode(self) -> Mode:
        if self.session_id is not None or self.background:
            return "background"
        return "stream" if self.stream else "sync"

    def last_user_text(self) -> str:
        for message in reversed(self.messages):
            if message.get("role") == "user":
                return message_text(message)
        return ""


def message_text(message: dict[str, Any]) -> str:
    """The text of a message whose content is a string or a list of OpenAI content parts."""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return " ".join(p for p in parts if isinstance(p, str))
    return ""


_FIELD_NAME = re.compile(r"[a-z_][a-z0-9_]*")
_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def parse_chat_request(raw: Any, *, default_model: str) -> ChatRequest:
    """Validate a decoded JSON body; raises ``RequestError`` (400) naming the bad field."""
    if not isinstance(raw, dict):
        raise RequestError(400, "invalid_request", "The request body must be a JSON object.")
    try:
        parsed = ChatRequestModel.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        # A union's member shows in the location ("literal[...]", "NamedToolChoice"): the
        # field's path is the rest.
        param = ".".join(str(part) for part in first["loc"]
                         if isinstance(part, int) or (_FIELD_NAME.fullmatch(part)
                                                      and part not in _TYPE_NAMES)) or None
        if first["type"] == "missing":
            message = f"Missing required field '{param}'."
        else:
            message = f"Invalid value for '{param}': {first['msg']}."
        raise RequestError(400, "invalid_request", message, param=param) from None
    # Answered with one choice and no log probabilities: refused rather than dropped.
    if parsed.n is not None and parsed.n != 1:
        raise RequestError(400, "invalid_request", "Only n=1 is supported.", param="n")
    if parsed.logprobs:
        raise RequestError(400, "invalid_request", "logprobs are not supported.",
                           param="logprobs")
    if isinstance(parsed.stop, list) and len(parsed.stop) > 4:
        raise RequestError(400, "invalid_request", "At most 4 stop sequences.", param="stop")
    passthrough = {
        key: value
        for key, value in raw.items()
        if key not in TETHER_FIELDS and key not in ("model", "messages")
    }
    return ChatRequest(
        model=parsed.model or default_model,
        messages=[dict(m) for m in raw["messages"]],
        stream=parsed.stream,
        web_search=parsed.features.web_search,
        tool_ids=list(parsed.tool_ids),
        chat_id=parsed.chat_id,
        message_id=parsed.message_id,
        session_id=parsed.session_id,
        background=parsed.background,
        passthrough=passthrough,
        stream_options=parsed.stream_options,
    )


@dataclass(frozen=True, slots=True)
class Event:
    task_id: str
    chat_id: str | None
    message_id: str | None
    seq: int
    type: str
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_EVENTS

    def to_dict(self) -> dict[str, Any]:
        return {
            "task_id": self.task_id,
            "chat_id": self.chat_id,
            "message_id": self.message_id,
            "seq": self.seq,
            "type": self.type,
            "data": self.data,
        }

    @property
    def json(self) -> str:
        """The event as JSON. Encoded per send rather than kept: a log holds every event
        of a task for its whole retention, and the text would double what each costs;
        orjson encodes one in about a microsecond."""
        return fastjson.dumps(self.to_dict())


@dataclass
class TaskRecord:
    """A task's state: what ``GET /api/tasks/{id}`` shows."""

    id: str
    user: str
    model: str
    mode: Mode
    chat_id: str | None = None
    message_id: str | None = None
    session_id: str | None = None
    status: Status = "queued"
    phase: Phase = "queued"
    created_at: float = field(default_factory=time.time)
    started_at: float | None = None
    ended_at: float | None = None
    content: str = ""
    reasoning: str = ""
    sources: list[dict[str, Any]] = field(default_factory=list)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    cancel_reason: CancelReason | None = None
    last_seq: int = 0
    finish_reason: str | None = None
    # Bound to its WebSocket session's lifetime (a session_id without background: true).
    session_bound: bool = False

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "chat_id": self.chat_id,
            "message_id": self.message_id,
            "session_id": self.session_id,
            "model": self.model,
            "mode": self.mode,
            "status": self.status,
            "phase": self.phase,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "content": self.content,
            "reasoning": self.reasoning or None,
            "sources": list(self.sources),
            "tool_calls": list(self.tool_calls),
            "usage": self.usage,
            "error": self.error,
            "cancel_reason": self.cancel_reason,
            "finish_reason": self.finish_reason,
            "last_seq": self.last_seq,
        }

    def copy(self) -> TaskRecord:
        """A copy that shares nothing mutable with this record."""
        return replace(self, sources=list(self.sources), tool_calls=list(self.tool_calls))

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, session_bound: bool = False) -> TaskRecord:
        """The record that ``to_dict`` gave (a terminal event's data, a stored copy)."""
        return cls(
            id=data["id"],
            user=data["user"],
            model=data["model"],
            mode=data["mode"],
            chat_id=data.get("chat_id"),
            message_id=data.get("message_id"),
            session_id=data.get("session_id"),
            status=data.get("status", "queued"),
            phase=data.get("phase", "queued"),
            created_at=data["created_at"],
            started_at=data.get("started_at"),
            ended_at=data.get("ended_at"),
            content=data.get("content") or "",
            reasoning=data.get("reasoning") or "",
            sources=list(data.get("sources") or ()),
            tool_calls=list(data.get("tool_calls") or ()),
            usage=data.get("usage"),
            error=data.get("error"),
            cancel_reason=data.get("cancel_reason"),
            last_seq=data.get("last_seq", 0),
            finish_reason=data.get("finish_reason"),
            session_bound=session_bound,
        )
