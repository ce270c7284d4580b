"""The messages a ``/ws`` client sends: one discriminated union on ``type``.

Each command is a model; ``parse_command`` turns a message's text into one, or raises the
``RequestError`` that the connection answers with (``invalid_json``, ``invalid_request``
naming the field in ``param``, ``unknown_type``). ``ws_command_schema`` publishes the
union's JSON Schema, which the OpenAPI document carries as ``WsClientMessage``.

To add a command: a model with ``type: Literal[...]`` and its fields, added to
``WsCommand``, and a ``case`` for it in ``WsConnection._handle``. A field whose refusal
should say more than "Missing field" or pydantic's words carries a ``Refusal``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from pydantic_core import ErrorDetails

from server.schemas import RequestError


@dataclass(frozen=True)
class Refusal:
    """The message of the ``invalid_request`` error for a field that fails validation
    (``Annotated`` metadata: pydantic leaves it alone)."""

    message: str


TaskId = Annotated[
    str,
    Field(strict=True, min_length=1, description="A task id."),
    Refusal("Missing field 'task_id'."),
]


class _Command(BaseModel):
    # Fields a command does not name are ignored, as they always were: clients send one
    # shape of message for several commands (``after`` on a ``stop``).
    model_config = ConfigDict(extra="ignore", frozen=True)


class ChatCommand(_Command):
    """Start a background task bound to the session; answered ``task``."""

    type: Literal["chat"]
    request: Annotated[
        dict[str, Any],
        Field(description="A chat-completions request, as the body of POST /api/chat/completions."),
        Refusal("Missing field 'request' (an object)."),
    ]


class SubscribeCommand(_Command):
    """Replay the task's events with ``seq`` past ``after``, then follow it live."""

    type: Literal["subscribe"]
    task_id: TaskId
    after: Annotated[
        int,
        Field(strict=True, ge=0, description="The last seq seen."),
        Refusal("'after' must be a non-negative integer."),
    ] = 0


class UnsubscribeCommand(_Command):
    """Stop following the task."""

    type: Literal["unsubscribe"]
    task_id: TaskId


class StopCommand(_Command):
    """Stop the task; its ``task:cancelled`` event follows on the event stream."""

    type: Literal["stop"]
    task_id: TaskId


class SkipCommand(_Command):
    """Skip one step of the task (``web_search``, ``page:<url>`` or a tool call's id);
    answered ``skip`` with the step's state."""

    type: Literal["skip"]
    task_id: TaskId
    step: Annotated[
        str,
        Field(strict=True, min_length=1, description="The step to skip."),
        Refusal("Missing field 'step'."),
    ]


class PingCommand(_Command):
    """Answered ``pong``."""

    type: Literal["ping"]


WsCommand = Annotated[
    ChatCommand | SubscribeCommand | UnsubscribeCommand | StopCommand | SkipCommand | PingCommand,
    Field(discriminator="type"),
]

_COMMANDS: TypeAdapter[WsCommand] = TypeAdapter(WsCommand)
_MODELS: dict[str, type[_Command]] = {
    get_args(model.model_fields["type"].annotation)[0]: model
    for model in (
        ChatCommand,
        SubscribeCommand,
        UnsubscribeCommand,
        StopCommand,
        SkipCommand,
        PingCommand,
    )
}


def message_object(raw: str | bytes) -> dict[str, Any]:
    """The message as a JSON object; ``invalid_json`` or ``invalid_request`` otherwise."""
    try:
        message = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        raise RequestError(400, "invalid_json", "The message is not valid JSON.") from None
    if not isinstance(message, dict):
        raise RequestError(400, "invalid_request", "A message must be a JSON object.")
    return message


def parse_command(message: dict[str, Any]) -> WsCommand:
    """The command a message (a JSON object) is, or the ``RequestError`` refusing it: the
    first fault found, the ``type`` before the fields, the fields in their order."""
    try:
        return _COMMANDS.validate_python(message)
    except ValidationError as exc:
        raise _refusal(message, exc.errors()[0]) from None


def _refusal(message: dict[str, Any], error: ErrorDetails) -> RequestError:
    kind = message.get("type")
    if kind is None:
        return RequestError(400, "invalid_request", "Missing field 'type'.", param="type")
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        return RequestError(400, "unknown_type", f"Unknown message type {kind!r}.", param="type")
    # The location is (the tag, the field, ...): the command's own field is at fault.
    name = str(error["loc"][1]) if len(error["loc"]) > 1 else "type"
    field = _MODELS[kind].model_fields.get(name)
    refusal = next((m for m in field.metadata if isinstance(m, Refusal)), None) if field else None
    if refusal is not None:
        text = refusal.message
    elif error["type"] == "missing":
        text = f"Missing field {name!r}."
    else:
        text = f"Field {name!r}: {error['msg']}."
    return RequestError(400, "invalid_request", text, param=name)


def ws_command_schema(ref_template: str = "#/$defs/{model}") -> dict[str, Any]:
    """The JSON Schema of the messages a client sends on ``/ws`` (the commands' shared
    definitions under ``$defs``, referred to through ``ref_template``)."""
    schema = _COMMANDS.json_schema(ref_template=ref_template)
    schema["title"] = "WsClientMessage"
    schema["description"] = "A message from a client on the WebSocket /ws (API.md)."
    return schema
