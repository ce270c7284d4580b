"""The models of the JSON API's answers: the handlers build their answers from them and
``/openapi.json`` publishes them, so the document and the answers cannot drift apart.

Every one allows fields it does not name: API.md promises that new fields may appear, and
clients must ignore what they do not know.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict

from server.record import CancelReason, Status, TaskRecord, Usage


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow")


class ErrorDetail(_Open):
    message: str
    type: str
    param: str | None
    code: str


class ErrorBody(_Open):
    """Every answer outside 2xx (OpenAI's error shape)."""

    error: ErrorDetail


def _task_fields() -> dict[str, Any]:
    """The public fields of ``TaskRecord`` and their types, as answers carry them."""
    hints = get_type_hints(TaskRecord)
    out: dict[str, Any] = {}
    for f in fields(TaskRecord):
        if f.metadata.get("internal"):
            continue
        out[f.name] = hints[f.name] | None if f.metadata.get("null_if_empty") else hints[f.name]
    return out


class Task(_Open):
    """A task, as ``GET /api/tasks/{task_id}`` and the terminal events show it: the
    public fields of ``server.record.TaskRecord``, derived from it."""

    __annotations__ = _task_fields()


class TaskList(_Open):
    tasks: list[Task]


class BackgroundAccepted(_Open):
    """The 202 of a background request: the task was admitted and runs on its own."""

    task_id: str
    chat_id: str | None
    message_id: str | None
    status: Literal["queued"]


class TaskSummary(_Open):
    id: str
    status: Status
    cancel_reason: CancelReason | None


class AssistantMessage(_Open):
    role: Literal["assistant"]
    content: str | None
    refusal: None
    tool_calls: list[dict[str, Any]] | None = None
    reasoning_content: str | None = None


class ChoiceLogprobs(_Open):
    """A choice's tokens with their log probabilities (OpenAI's token objects: ``token``,
    ``logprob``, ``bytes``, ``top_logprobs``), as the model gave them."""

    content: list[dict[str, Any]] | None


class Choice(_Open):
    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: ChoiceLogprobs | None


class ChatCompletion(_Open):
    """A sync answer: OpenAI's ``chat.completion``, plus the task and its web sources."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage
    sources: list[dict[str, Any]]
    task_id: str
    task: TaskSummary


class ModelObject(_Open):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str


class ModelList(_Open):
    object: Literal["list"]
    data: list[ModelObject]


class Tool(_Open):
    id: str
    name: str
    description: str
    parameters: dict[str, Any]
    server: str | None = None


class ToolList(_Open):
    tools: list[Tool]


class Health(_Open):
    status: Literal["ok"]


class Ready(_Open):
    status: Literal["ready"]
    active_tasks: int
    replica: str
    mcp: dict[str, dict[str, Any]] | None = None


class ResponseObject(_Open):
    """OpenAI's ``Response``, as the Responses API answers it (``/v1/responses``)."""

    id: str
    object: Literal["response"]
    created_at: float
    status: Literal["completed", "failed", "in_progress", "cancelled", "queued", "incomplete"]
    model: str
    output: list[dict[str, Any]]
    background: bool | None = None
    error: dict[str, Any] | None = None
    usage: dict[str, Any] | None = None


class ResponseDeleted(_Open):
    id: str
    object: Literal["response"]
    deleted: bool


class InputItemList(_Open):
    object: Literal["list"]
    data: list[dict[str, Any]]
    first_id: str | None
    last_id: str | None
    has_more: bool


class StepSkipped(_Open):
    """A skip's answer: the step and its state after it."""

    task_id: str
    step: str
    state: Literal["skipped"]
