"""The event vocabulary: every event type a task's log holds, and the payload of each.

A task reports through eight event types. Each has a name (``EventType``, a ``Literal``:
a misspelt type is a type error, in a comparison as in a call) and a payload type: a
``TypedDict``, so that a payload is checked field by field where it is built and is still
the plain dict that goes on the wire (no conversion on the hot path, one token per delta).
The terminal types and the rule of which events change the task's record live here and
nowhere else; the page's JavaScript mirrors the terminal set, and a test holds it to this.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Literal, NotRequired, get_args

from typing_extensions import TypedDict

from server import fastjson

TerminalType = Literal["task:completed", "task:cancelled", "task:failed"]
EventType = Literal[
    "task:queued",
    "task:started",
    "status",
    "source",
    "delta",
    "task:completed",
    "task:cancelled",
    "task:failed",
]

EVENT_TYPES: Final[frozenset[EventType]] = frozenset(get_args(EventType))
TERMINAL_TYPES: Final[frozenset[EventType]] = frozenset(get_args(TerminalType))

# What a ``status`` event reports on: the web search's steps and the tool calls.
StatusAction = Literal["queries", "search", "fetch", "tool_call"]


class StatusData(TypedDict):
    """A step of the payload phase began, progressed or ended. ``error`` marks a step
    that failed while the task went on without it."""

    phase: Literal["web_search", "tools"]
    action: StatusAction
    description: str
    done: bool
    error: NotRequired[bool]
    # The step the status is about (``web_search``, ``page:<url>``, a tool call's id: what
    # a skip names), and, when it ended early, why: a skip (``skipped``, and ``by`` whom)
    # or its deadline.
    step: NotRequired[str]
    skipped: NotRequired[bool]
    by: NotRequired[str]
    deadline: NotRequired[bool]
    # The web search's steps.
    queries: NotRequired[list[str]]
    query: NotRequired[str]
    count: NotRequired[int]
    urls: NotRequired[list[str]]
    url: NotRequired[str]
    # Tool calls: the name the model called, the call's id, and for an MCP tool its
    # server and its name there.
    tool: NotRequired[str]
    tool_call_id: NotRequired[str]
    arguments: NotRequired[str]
    tool_id: NotRequired[str]
    mcp_server: NotRequired[str]
    mcp_tool: NotRequired[str]
    progress: NotRequired[float]
    total: NotRequired[float]
    result: NotRequired[str]
    duration_s: NotRequired[float]


class SourceData(TypedDict):
    """One cited web source; ``index`` is the number the answer cites it by."""

    index: int
    url: str
    title: str
    snippet: str


class DeltaData(TypedDict):
    """A piece of the answer. ``tool_calls`` carries the calls the model made of the
    caller's own functions (OpenAI's shape), with empty ``content``. With ``n`` > 1,
    ``index`` says which choice the piece belongs to (absent for choice 0, so that the
    common delta stays ``{"content"}``); ``logprobs`` are the piece's tokens with their
    log probabilities, in OpenAI's ``choices[i].logprobs.content`` shape, when asked for."""

    content: str
    reasoning: NotRequired[str]
    tool_calls: NotRequired[list[dict[str, Any]]]
    index: NotRequired[int]
    logprobs: NotRequired[list[dict[str, Any]]]


class EmptyData(TypedDict):
    """``task:queued`` and ``task:started`` carry nothing."""


def is_terminal(type_: str) -> bool:
    return type_ in TERMINAL_TYPES


def terminal_type(status: str) -> TerminalType:
    """The terminal event type of a task that ended with ``status``."""
    if status == "completed":
        return "task:completed"
    if status == "cancelled":
        return "task:cancelled"
    if status == "failed":
        return "task:failed"
    raise ValueError(f"a task in status {status!r} has not ended")


def record_changes(
    type_: EventType, data: dict[str, Any]
) -> tuple[str, str, dict[str, Any] | None]:
    """What an event adds to its task's logged fields: text to the answer, text to the
    reasoning, and a source. The one rule of which events change the record: the memory
    log, the record kept beside it and the Redis append script all follow it.

    The answer is choice 0: a delta of another choice adds nothing here (its text is not
    the task's ``content``); it and every choice's logprobs go to the record's own fields
    by ``choice_changes``."""
    if type_ == "delta":
        if data.get("index"):
            return "", "", None
        return data.get("content", ""), data.get("reasoning", ""), None
    if type_ == "source":
        return "", "", data
    return "", "", None


def choice_changes(
    type_: EventType, data: dict[str, Any]
) -> tuple[int, str, list[dict[str, Any]]] | None:
    """What a delta adds to the record's ``other_choices`` and ``logprobs``: the choice's
    index, its text (none for choice 0, whose text is ``content``) and its token logprobs.
    None for every other event and for the common delta (choice 0, no logprobs). These
    fields are the record's own, not logged: the task's emitter keeps them and each save
    of the record (and its terminal write) carries them, on every backend."""
    if type_ != "delta":
        return None
    index = data.get("index", 0)
    logprobs = data.get("logprobs")
    if not index and logprobs is None:
        return None
    return index, data.get("content", "") if index else "", logprobs or []


@dataclass(frozen=True, slots=True)
class Event:
    """One entry of a task's log, as every reader gets it (API.md, Events)."""

    task_id: str
    chat_id: str | None
    message_id: str | None
    seq: int
    type: EventType
    data: dict[str, Any]

    @property
    def terminal(self) -> bool:
        return self.type in TERMINAL_TYPES

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
