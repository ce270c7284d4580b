"""The task record: what ``GET /api/tasks/{id}`` shows, defined once.

Every other form of the record is derived from the dataclass below, so that a new field
cannot reach one and miss another: its public object (``to_dict``, also the data of a
terminal event), its reading back (``from_dict``), the fields a shared store keeps beside
the log (``STORED_FIELDS``) and the OpenAPI ``Task`` schema (``server.api.answers``). A
field's metadata says what is special about it:

- ``LOGGED``: the task's events carry it (``content``, ``reasoning``, ``sources``); a store
  keeps it in step with the log, and ``save`` never writes it;
- ``INTERNAL``: the server's own (``session_bound``), never in the public object;
- ``NULL_IF_EMPTY``: published as null while empty (``reasoning``, ``logprobs``).

A request with ``n`` > 1 has several answers: choice 0 is ``content`` (so that everything
that reads the answer reads it), the others are ``other_choices``. Those and ``logprobs``
are the record's own fields, kept by the task's emitter (``events.choice_changes``), not
logged fields: a shared store keeps them as it keeps ``usage``, current as of the last
save, and whole with the terminal event.
"""

from __future__ import annotations

import time
from dataclasses import MISSING, dataclass, field, fields, replace
from typing import Any, Final, Literal, NotRequired

from pydantic import ConfigDict, with_config
from typing_extensions import TypedDict

Mode = Literal["background", "stream", "sync"]
Status = Literal["queued", "running", "completed", "cancelled", "failed"]
EndStatus = Literal["completed", "cancelled", "failed"]
Phase = Literal["queued", "web_search", "tools", "generating", "done"]
CancelReason = Literal["stop", "disconnect", "shutdown", "timeout"]

ACTIVE_STATUSES: Final = frozenset({"queued", "running"})

LOGGED: Final = {"logged": True}
INTERNAL: Final = {"internal": True}
NULL_IF_EMPTY: Final = {"null_if_empty": True}


class TaskError(TypedDict):
    """Why a task failed: the phase it was in, a type clients can act on, and a message
    without a traceback."""

    phase: str | None
    type: str
    message: str


@with_config(ConfigDict(extra="allow"))
class Usage(TypedDict):
    """Token usage: the model's report, or Tether's count where the model gave none
    (``estimated``). An upstream's further figures (``*_details``) pass through."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: NotRequired[bool]


class OtherChoice(TypedDict):
    """An answer besides the first (``n`` > 1): its text, why it ended, and its tokens'
    log probabilities when the request asked for them (OpenAI's token objects)."""

    index: int
    content: str
    finish_reason: str | None
    logprobs: list[dict[str, Any]]


@dataclass
class TaskRecord:
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
    content: str = field(default="", metadata=LOGGED)
    reasoning: str = field(default="", metadata={**LOGGED, **NULL_IF_EMPTY})
    sources: list[dict[str, Any]] = field(default_factory=list, metadata=LOGGED)
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    usage: Usage | None = None
    error: TaskError | None = None
    cancel_reason: CancelReason | None = None
    finish_reason: str | None = None
    # The answer's tokens with their log probabilities (``logprobs: true``).
    logprobs: list[dict[str, Any]] = field(default_factory=list, metadata=NULL_IF_EMPTY)
    # With n > 1, the choices after the first, by index.
    other_choices: list[OtherChoice] = field(default_factory=list)
    # Ended by its task deadline (``deadlines.task_s``): "task"; the task is ``completed``
    # with the text it has and ``finish_reason: "length"``.
    deadline: str | None = None
    # Where a stop landed: the step running then (``{"step", "kind"}``, with the tool or the
    # page), and how long the stop took inside the server, stop received to every
    # connection closed.
    cancel_step: dict[str, Any] | None = None
    stop_ms: float | None = None
    last_seq: int = 0
    # Bound to its WebSocket session's lifetime (a session_id without background: true).
    session_bound: bool = field(default=False, metadata=INTERNAL)
    # Started as a Response (``POST /v1/responses``): its input and the fields a Response
    # echoes; None for a chat completion.
    response: dict[str, Any] | None = field(default=None, metadata=INTERNAL)
    # With tracing on, the ``traceparent`` of the task's root span: a stop or a resume
    # handled by another replica links its own span to the task's trace.
    trace: str | None = field(default=None, metadata=INTERNAL)

    @property
    def active(self) -> bool:
        return self.status in ACTIVE_STATUSES

    def to_dict(self) -> dict[str, Any]:
        """The public object (API.md's Task): every field but the internal ones."""
        out: dict[str, Any] = {}
        for name, null_if_empty in _PUBLIC:
            value = getattr(self, name)
            if type(value) is list:
                value = list(value)
            out[name] = (value or None) if null_if_empty else value
        return out

    def copy(self) -> TaskRecord:
        """A copy that shares nothing mutable with this record."""
        return replace(
            self,
            sources=list(self.sources),
            tool_calls=list(self.tool_calls),
            logprobs=list(self.logprobs),
            other_choices=[
                {**choice, "logprobs": list(choice["logprobs"])} for choice in self.other_choices
            ],
        )

    def other_choice(self, index: int) -> OtherChoice:
        """Choice ``index`` (> 0), added empty at its first mention."""
        for choice in self.other_choices:
            if choice["index"] == index:
                return choice
        choice = OtherChoice(index=index, content="", finish_reason=None, logprobs=[])
        self.other_choices.append(choice)
        self.other_choices.sort(key=lambda c: c["index"])
        return choice

    def add_to_choice(self, index: int, content: str, logprobs: list[dict[str, Any]]) -> None:
        """Apply ``events.choice_changes``: text of a choice after the first, and the
        token logprobs of any choice."""
        if index == 0:
            self.logprobs.extend(logprobs)
            return
        choice = self.other_choice(index)
        choice["content"] += content
        choice["logprobs"].extend(logprobs)

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, session_bound: bool = False) -> TaskRecord:
        """The record that ``to_dict`` gave (a terminal event's data, a stored copy): a
        field it lacks, or gives as null where the record has no null (``reasoning``),
        takes its default."""
        values: dict[str, Any] = {"session_bound": session_bound}
        for name in _NAMES:
            value = data.get(name)
            if value is None:
                if name not in _NON_NULL:
                    values[name] = None
                continue
            values[name] = list(value) if type(value) is list else value
        return cls(**values)


# Derived from the one definition above.
_PUBLIC: Final = tuple(
    (f.name, bool(f.metadata.get("null_if_empty")))
    for f in fields(TaskRecord)
    if not f.metadata.get("internal")
)
PUBLIC_FIELDS: Final = tuple(name for name, _ in _PUBLIC)
# The record's own fields, which a shared store keeps as values (the logged ones live
# beside the log).
STORED_FIELDS: Final = tuple(f.name for f in fields(TaskRecord) if not f.metadata.get("logged"))
_NAMES: Final = tuple(f.name for f in fields(TaskRecord))
# Fields that are never null: given as null or not at all, they keep their default.
_NON_NULL: Final = frozenset(
    f.name for f in fields(TaskRecord) if f.default is not None or f.default_factory is not MISSING
)
