"""GET /openapi.json: the HTTP API as an OpenAPI 3.1 document, built from the code's models.

The request body's schema is ``ChatRequestModel``'s own JSON schema, the model that
validates every chat request, so the document cannot drift from what the server checks.
The answers are described by the models of ``server.api.answers``, which the handlers build
their answers from (the ``Task`` model is derived from the task record's one definition),
and the contract run in CI (``make contract``: schemathesis against a running server) checks
every answer it gets against them.

Validation stays where it is (``schemas.parse_chat_request``): no library turns this
document into checks of its own, so every refusal keeps the API's error shape.

Not in the document: ``/ws`` (a WebSocket; API.md describes it) and ``/static/{path}`` (the
chat page's files), which are not part of the JSON API.
"""

from __future__ import annotations

import importlib.metadata
from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema
from quart import Blueprint, Response

from server.api.answers import (
    BackgroundAccepted,
    ChatCompletion,
    ErrorBody,
    Health,
    InputItemList,
    ModelList,
    ModelObject,
    Ready,
    ResponseDeleted,
    ResponseObject,
    StepSkipped,
    Task,
    TaskList,
    ToolList,
)
from server.api.common import json_response
from server.api.responses.request import ResponseCreate
from server.api.ws_commands import ws_command_schema
from server.schemas import ChatRequestModel

blueprint = Blueprint("openapi", __name__)

PATH = "/openapi.json"


_MODELS: list[tuple[type[BaseModel], JsonSchemaMode]] = [
    (ChatRequestModel, "validation"),
    *(
        (model, "serialization")
        for model in (
            ErrorBody,
            Task,
            TaskList,
            BackgroundAccepted,
            ChatCompletion,
            ModelObject,
            ModelList,
            ToolList,
            Health,
            Ready,
            ResponseObject,
            ResponseDeleted,
            InputItemList,
            StepSkipped,
        )
    ),
    (ResponseCreate, "validation"),
]

# What each error status means on this API (API.md, Errors).
_ERRORS = {
    400: "Bad JSON, a schema violation or an unknown tool id (`invalid_request`).",
    401: "The key is missing or wrong (`unauthorized`).",
    404: "An unknown task or model, or another user's task or session.",
    413: "The body is larger than `TETHER_MAX_BODY_BYTES` (`payload_too_large`).",
    409: "A step that has ended already (`step_ended`).",
    429: "Past the admission limits (`too_many_tasks`); see `Retry-After`.",
    500: "A bug in the server (`internal_error`); the details are only in its log.",
    502: "The model failed, or its answer went past the task's bounds.",
    503: "Shutting down, or the shared task store failed; see `Retry-After`.",
}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(name: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": _ref(name)}}}


def _errors(*statuses: int, described: dict[int, str] | None = None) -> dict[str, Any]:
    """Error answers, each described as on every route unless ``described`` says what the
    status means on this one."""
    told = described or {}
    return {
        str(status): _json("ErrorBody", told.get(status, _ERRORS[status])) for status in statuses
    }


def _text(media_type: str, description: str) -> dict[str, Any]:
    return {"description": description, "content": {media_type: {"schema": {"type": "string"}}}}


def _sse(description: str, data: str, *, with_id: bool = False) -> dict[str, Any]:
    """An SSE answer. In OpenAPI 3.1 the schema of an event stream describes one event
    (the fields a reader parses from it; comments are not events), as 3.2's ``itemSchema``
    does."""
    event: dict[str, Any] = {
        "type": "object",
        "properties": {"data": {"type": "string", "description": data}},
        "required": ["data"],
    }
    if with_id:
        event["properties"]["id"] = {
            "type": "string",
            "pattern": "^[0-9]+$",
            "description": "The event's `seq`.",
        }
        event["required"].append("id")
    return {"description": description, "content": {_SSE: {"schema": event}}}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string", "minLength": 1},
    }


_SSE = "text/event-stream"
_TASK_ID = _path_param("task_id", "The task's id (`X-Task-Id`).")
_MODEL_ID = _path_param(
    "model_id",
    "A model id from the list. Ids may hold slashes (`org/name`); they are sent as they are.",
)
# Open routes (health, readiness, metrics, the page and this document) need no key; the
# others take `Authorization: Bearer <key>` when keys are configured, and none otherwise.
_KEYED: list[dict[str, list[str]]] = [{"bearerAuth": []}, {}]


def _operation(
    summary: str, responses: dict[str, Any], *, keyed: bool = True, **extra: Any
) -> dict[str, Any]:
    op: dict[str, Any] = {
        "summary": summary,
        **extra,
        "responses": {**responses, **(_errors(401) if keyed else {})},
    }
    op["security"] = _KEYED if keyed else []
    return op


def _chat(operation_id: str, flavour: str) -> dict[str, Any]:
    answer = {
        "description": "Sync mode: one `chat.completion`. Stream mode (`stream: true`): "
        "`chat.completion.chunk` objects as SSE, then `data: [DONE]`.",
        "headers": {"X-Task-Id": {"schema": {"type": "string"}}},
        "content": {
            "application/json": {"schema": _ref("ChatCompletion")},
            **_sse(
                "",
                "A `chat.completion.chunk` as JSON, an error object (a "
                "failed task) or `[DONE]`, the last.",
            )["content"],
        },
    }
    return _operation(
        f"Run a chat completion as a task ({flavour})",
        {
            "200": answer,
            "202": _json(
                "BackgroundAccepted",
                "Background mode (`background: true` or a `session_id`): admitted.",
            ),
            **_errors(400, 404, 413, 429, 500, 502, 503),
        },
        operationId=operation_id,
        requestBody={
            "required": True,
            "content": {"application/json": {"schema": _ref("ChatRequestModel")}},
        },
    )


def _paths() -> dict[str, Any]:
    task = _json("Task", "The task.")
    ended = _json("Task", "The task, once it has ended (stopping an ended task answers it).")
    models = _json("ModelList", "OpenAI's list shape.")
    model = _json("ModelObject", "One model, OpenAI's `Model` object.")
    return {
        "/api/chat/completions": {"post": _chat("createChatCompletion", "Tether's route")},
        "/v1/chat/completions": {"post": _chat("createChatCompletionV1", "OpenAI's path")},
        "/api/tasks": {
            "get": _operation(
                "The caller's running and queued tasks, oldest first",
                {"200": _json("TaskList", "The tasks.")},
                operationId="listTasks",
                parameters=[
                    {
                        "name": "chat_id",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "Only the tasks of this chat.",
                    },
                    {
                        "name": "include_finished",
                        "in": "query",
                        "schema": {"type": "boolean"},
                        "description": "Also the ended tasks still retained.",
                    },
                ],
            )
        },
        "/api/tasks/{task_id}": {
            "get": _operation(
                "One of the caller's tasks",
                {"200": task, **_errors(404)},
                operationId="getTask",
                parameters=[_TASK_ID],
            )
        },
        "/api/tasks/{task_id}/stop": {
            "post": _operation(
                "Stop a task and answer it once ended",
                {"200": ended, **_errors(404)},
                operationId="stopTask",
                parameters=[_TASK_ID],
            )
        },
        "/api/tasks/stop/{task_id}": {
            "post": _operation(
                "Stop a task (alias)",
                {"200": ended, **_errors(404)},
                operationId="stopTaskAlias",
                parameters=[_TASK_ID],
            )
        },
        "/api/tasks/{task_id}/skip": {
            "post": _operation(
                "Skip one step of a task (`web_search`, `page:<url>` or a tool call's id); "
                "the task goes on without it",
                {
                    "200": _json(
                        "StepSkipped",
                        "The step, skipped; for a task run by the replica that answers, once "
                        "the step has ended (its connections closed), or after 1 s at most.",
                    ),
                    **_errors(
                        400,
                        404,
                        409,
                        described={
                            400: "`step` is missing.",
                            404: "No such task, or the task has no such step.",
                            409: "The step has ended already (its state is in `step`).",
                        },
                    ),
                },
                operationId="skipStep",
                parameters=[_TASK_ID],
                requestBody={
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": {
                                "type": "object",
                                "properties": {"step": {"type": "string", "minLength": 1}},
                                "required": ["step"],
                            }
                        }
                    },
                },
            )
        },
        "/api/chats/{chat_id}/stop": {
            "post": _operation(
                "Stop every task of the caller in a chat",
                {"200": _json("TaskList", "The chat's tasks, once ended.")},
                operationId="stopChat",
                parameters=[_path_param("chat_id", "The caller's chat id.")],
            )
        },
        "/api/tasks/{task_id}/events": {
            "get": _operation(
                "The task's events as SSE, replayed past `after` then live",
                {
                    "200": _sse(
                        "The events; the stream ends after the terminal event.",
                        "The event as JSON (API.md, Events).",
                        with_id=True,
                    ),
                    **_errors(
                        400,
                        404,
                        described={
                            400: "`after` (or `Last-Event-ID`) is not a non-negative integer."
                        },
                    ),
                },
                operationId="taskEvents",
                parameters=[
                    _TASK_ID,
                    {
                        "name": "after",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 0},
                        "description": "Replay the events past this seq (default 0).",
                    },
                    {
                        "name": "Last-Event-ID",
                        "in": "header",
                        "schema": {"type": "string", "pattern": "^[0-9]+$"},
                        "description": "The SSE resume header; used when `after` is absent.",
                    },
                ],
            )
        },
        "/api/models": {"get": _operation("The models", {"200": models}, operationId="listModels")},
        "/v1/models": {
            "get": _operation(
                "The models (OpenAI's path)", {"200": models}, operationId="listModelsV1"
            )
        },
        "/api/models/{model_id}": {
            "get": _operation(
                "One model",
                {"200": model, **_errors(404)},
                operationId="getModel",
                parameters=[_MODEL_ID],
            )
        },
        "/v1/models/{model_id}": {
            "get": _operation(
                "One model (OpenAI's path)",
                {"200": model, **_errors(404)},
                operationId="getModelV1",
                parameters=[_MODEL_ID],
            )
        },
        **_responses_paths(),
        "/api/tools": {
            "get": _operation(
                "The server tools `tool_ids` accepts",
                {"200": _json("ToolList", "The tools.")},
                operationId="listTools",
            )
        },
        "/api/local-docs/{path}": {
            "get": _operation(
                "A document of the `local` search folder (the target of its sources' `url`)",
                {
                    "200": {
                        "description": "The document's text: Markdown as `text/markdown`, "
                        "`.txt` as `text/plain`.",
                        "content": {
                            "text/markdown": {"schema": {"type": "string"}},
                            "text/plain": {"schema": {"type": "string"}},
                        },
                    },
                    **_errors(
                        404,
                        described={
                            404: "No indexed document has this path (or the search provider is not "
                            "`local`)."
                        },
                    ),
                },
                operationId="getLocalDocument",
                parameters=[
                    {
                        **_path_param(
                            "path",
                            "The document's path relative to the folder, "
                            "as in the source's `url`; it may hold "
                            "slashes.",
                        ),
                        "example": "web-search.md",
                    }
                ],
            )
        },
        "/healthz": {
            "get": _operation(
                "Liveness", {"200": _json("Health", "Alive.")}, keyed=False, operationId="healthz"
            )
        },
        "/health": {
            "get": _operation(
                "Liveness (alias)",
                {"200": _json("Health", "Alive.")},
                keyed=False,
                operationId="health",
            )
        },
        "/readyz": {
            "get": _operation(
                "Readiness",
                {"200": _json("Ready", "Admitting tasks."), **_errors(503)},
                keyed=False,
                operationId="readyz",
            )
        },
        "/metrics": {
            "get": _operation(
                "Prometheus metrics",
                {"200": _text("text/plain", "Prometheus text format.")},
                keyed=False,
                operationId="metrics",
            )
        },
        "/": {
            "get": _operation(
                "The chat page",
                {"200": _text("text/html", "The page.")},
                keyed=False,
                operationId="chatPage",
            )
        },
        PATH: {
            "get": _operation(
                "This document",
                {
                    "200": {
                        "description": "OpenAPI 3.1.",
                        "content": {"application/json": {"schema": {"type": "object"}}},
                    }
                },
                keyed=False,
                operationId="openapi",
            )
        },
    }


_RESPONSE_ID = _path_param("response_id", "The response's id (`resp_...`), a task id too.")


def _responses_paths() -> dict[str, Any]:
    response = _json("ResponseObject", "OpenAI's `Response`.")
    stream = _sse(
        "The Responses stream events (`event:` is the type).",
        "A Responses stream event as JSON, with its `sequence_number`.",
    )
    return {
        "/v1/responses": {
            "post": _operation(
                "Create a response as a task (OpenAI's Responses API)",
                {
                    "200": {
                        "description": "The Response (background: at once, `queued`; sync: "
                        "ended); with `stream: true`, its stream events.",
                        "content": {
                            "application/json": {"schema": _ref("ResponseObject")},
                            **stream["content"],
                        },
                    },
                    **_errors(400, 404, 413, 429, 500, 503),
                },
                operationId="createResponse",
                requestBody={
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ResponseCreate")}},
                },
            )
        },
        "/v1/responses/{response_id}": {
            "get": _operation(
                "A response as it stands; with `stream=true`, its stream events past "
                "`starting_after`",
                {
                    "200": {
                        "description": "The Response, or its stream events.",
                        "content": {
                            "application/json": {"schema": _ref("ResponseObject")},
                            **stream["content"],
                        },
                    },
                    **_errors(400, 404),
                },
                operationId="getResponse",
                parameters=[
                    _RESPONSE_ID,
                    {
                        "name": "stream",
                        "in": "query",
                        "schema": {"type": "boolean"},
                        "description": "Answer with the stream events.",
                    },
                    {
                        "name": "starting_after",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": -1},
                        "description": "Only the events past this `sequence_number`.",
                    },
                ],
            ),
            "delete": _operation(
                "Forget a response (stopped first if it runs)",
                {"200": _json("ResponseDeleted", "Deleted."), **_errors(404)},
                operationId="deleteResponse",
                parameters=[_RESPONSE_ID],
            ),
        },
        "/v1/responses/{response_id}/cancel": {
            "post": _operation(
                "Cancel a background response (a task stop) and answer it once ended",
                {"200": response, **_errors(400, 404)},
                operationId="cancelResponse",
                parameters=[_RESPONSE_ID],
            )
        },
        "/v1/responses/{response_id}/input_items": {
            "get": _operation(
                "The input items of a response",
                {"200": _json("InputItemList", "A page of input items."), **_errors(400, 404)},
                operationId="listResponseInputItems",
                parameters=[
                    _RESPONSE_ID,
                    {
                        "name": "after",
                        "in": "query",
                        "schema": {"type": "string"},
                        "description": "List the items after this item id.",
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {"type": "integer", "minimum": 1, "maximum": 100},
                        "description": "Items per page (default 20).",
                    },
                    {
                        "name": "order",
                        "in": "query",
                        "schema": {"enum": ["asc", "desc"]},
                        "description": "asc or desc (default).",
                    },
                ],
            )
        },
    }


@cache
def document() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once: it depends on no setting)."""
    _, top = models_json_schema(_MODELS, ref_template="#/components/schemas/{model}")
    # The WebSocket's client messages, for clients to validate against (no path: /ws is
    # not HTTP; API.md describes the protocol). Its commands join the other schemas.
    ws_messages = ws_command_schema("#/components/schemas/{model}")
    top.setdefault("$defs", {}).update(ws_messages.pop("$defs", {}), WsClientMessage=ws_messages)
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Tether",
            "version": importlib.metadata.version("tether"),
            "description": "A chat-completion server where every request is a cancellable "
            "task. API.md, in the repository, is the full reference; the "
            "WebSocket `/ws` is described there, not here.",
        },
        "paths": _paths(),
        "components": {
            "schemas": top.get("$defs", {}),
            "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}},
        },
    }


@blueprint.get(PATH)
async def openapi() -> Response:
    return json_response(document())
