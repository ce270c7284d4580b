"""Request models and the API's errors. Validation of incoming requests lives here.

The chat request is an OpenAI chat-completions body plus Tether's fields. Only the fields
Tether acts on are checked; everything else passes through to the model untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from server.record import Mode


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


class Deadlines(BaseModel):
    """Tether's per-request deadlines, in seconds. A phase's deadline that passes ends the
    phase as a skip does (the answer comes from what it found); the task's ends the task
    ``completed`` with the text it has. Unset ones come from the server's settings."""

    model_config = ConfigDict(extra="forbid", strict=True)

    web_search_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    tools_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    task_s: float | None = Field(default=None, gt=0, allow_inf_nan=False)


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
    deadlines: Deadlines | None = None


# Tether's own fields: they never reach the model.
TETHER_FIELDS = frozenset(
    {
        "features",
        "tool_ids",
        "chat_id",
        "message_id",
        "session_id",
        "background",
        "stream",
        "stream_options",
        "deadlines",
    }
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
    # Deadlines this request set (``web_search_s``, ``tools_s``, ``task_s``); the server's
    # settings give the others.
    deadlines: dict[str, float] = field(default_factory=dict)
    # A task started through the Responses API: what its Response echoes (see
    # ``api/responses/request.py``); None for a chat completion.
    response: dict[str, Any] | None = None
    # Answers asked for (``n``) and token log probabilities: they reach the model in
    # ``passthrough``; these say what the answer must hold.
    n: int = 1
    logprobs: bool = False
    top_logprobs: int | None = None

    def unsupported_by_local_model(self) -> RequestError | None:
        """The 400 for what Tether's built-in model cannot give (it has one answer and
        no probabilities), naming the field; None if it can serve the request."""
        for param, asked in (
            ("n", self.n > 1),
            ("top_logprobs", self.top_logprobs is not None),
            ("logprobs", self.logprobs),
        ):
            if asked:
                return RequestError(
                    400,
                    "invalid_request",
                    f"The model {self.model!r} does not support '{param}'.",
                    param=param,
                )
        return None

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
        param = (
            ".".join(
                str(part)
                for part in first["loc"]
                if isinstance(part, int)
                or (_FIELD_NAME.fullmatch(part) and part not in _TYPE_NAMES)
            )
            or None
        )
        if first["type"] == "missing":
            message = f"Missing required field '{param}'."
        else:
            message = f"Invalid value for '{param}': {first['msg']}."
        raise RequestError(400, "invalid_request", message, param=param) from None
    if parsed.top_logprobs is not None and not parsed.logprobs:
        # As OpenAI: the alternatives of each token come with its own log probability.
        raise RequestError(
            400,
            "invalid_request",
            "top_logprobs requires logprobs to be true.",
            param="top_logprobs",
        )
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
        n=parsed.n or 1,
        logprobs=bool(parsed.logprobs),
        top_logprobs=parsed.top_logprobs,
        deadlines=parsed.deadlines.model_dump(exclude_none=True) if parsed.deadlines else {},
    )
