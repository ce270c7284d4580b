"""A task's log, read as the Responses API's stream events and output items. No I/O.

A response is a task, and its log is the only record of what happened; this translator reads
the log in order and says what a Responses client sees of each event:

- ``task:queued`` is ``response.created`` and ``response.queued``; ``task:started`` is
  ``response.in_progress`` (then the MCP servers' tool lists, as ``mcp_list_tools`` items);
- the web search's ``status`` events are one ``web_search_call`` item: added with its first
  step, ``searching`` with the queries, done when the search phase ends (its sources, or
  the first event of another phase);
- an MCP tool call's ``status`` events are an ``mcp_call`` item, done with its result;
- the answer's ``delta`` events are one ``message`` item with one ``output_text`` part,
  whose ``url_citation`` annotations point at the sources its ``[n]`` cites; the caller's
  own functions called by the model are ``function_call`` items;
- the terminal event closes what is open and ends the stream: ``response.completed``,
  ``response.incomplete`` (the answer was cut at ``max_output_tokens``, or the response was
  cancelled: then the Response's status is ``cancelled``; the spec has no stream event of
  its own for that) or ``response.failed``.

Sequence numbers come from the log: the events made of the task event ``seq`` are numbered
``seq * SPAN``, ``seq * SPAN + 1``, ... So ``starting_after=N`` is a cursor into the log:
replay the log, drop the events numbered up to N. The translation is deterministic (item
ids are made of the task id and the seq that opened them), so a replay gives the same
events, and a resumed stream has no gap and no duplicate.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from server.events import Event
from server.record import TaskRecord

# Stream events one task event may become, at most (a terminal event closing every open
# item, a delta carrying many function calls): the numbering's room per seq.
SPAN = 1000

_CITATION = re.compile(r"\[(\d+)\]")


@dataclass
class _Item:
    """An output item under construction: its index in ``output`` and its current form."""

    index: int
    body: dict[str, Any]
    open: bool = True


@dataclass
class ResponseTranslator:
    """Feed it a task's events in seq order (from seq 1); it returns each one's stream
    events and keeps the Response's output as it stands. ``base`` makes the Response
    object around a status and output (see ``routes``)."""

    record: TaskRecord
    # Makes the Response around a status, the output and the text deltas streamed so far.
    base: Callable[[TaskRecord, str, list[dict[str, Any]], int], dict[str, Any]]
    mcp_lists: list[dict[str, Any]] = field(default_factory=list)
    output: list[_Item] = field(default_factory=list)
    status: str = "queued"
    _seq: int = 0
    _next: int = 0
    _search: _Item | None = None
    _message: _Item | None = None
    _text: str = ""
    _calls: dict[str, _Item] = field(default_factory=dict)
    _sources: list[dict[str, Any]] = field(default_factory=list)
    ended: bool = False
    streamed: int = 0

    # -- the stream ------------------------------------------------------------------------

    def feed(self, event: Event) -> list[dict[str, Any]]:
        """The stream events of one task event, numbered."""
        self._seq, self._next = event.seq, 0
        out: list[dict[str, Any]] = []
        emit = self._emitter(out)
        kind, data = event.type, event.data
        if kind == "task:queued":
            emit("response.created", response=self.response())
            emit("response.queued", response=self.response())
        elif kind == "task:started":
            self.status = "in_progress"
            emit("response.in_progress", response=self.response())
            for listed in self.mcp_lists:
                item = self._open(listed | {"id": self._id("mcpl", len(self.output))})
                emit("response.output_item.added", output_index=item.index, item=item.body)
                emit("response.mcp_list_tools.in_progress", **self._where(item))
                emit("response.mcp_list_tools.completed", **self._where(item))
                self._close(item, emit)
        elif kind == "status":
            self._status(data, emit)
        elif kind == "source":
            self._end_search(emit, "completed")
            self._sources.append(data)
        elif kind == "delta":
            self._end_search(emit, "completed")
            self._delta(data, emit)
        elif event.terminal:
            self._end(event, emit)
        return out

    def _emitter(self, out: list[dict[str, Any]]) -> Callable[..., None]:
        def emit(type_: str, **fields: Any) -> None:
            if self._next >= SPAN:
                raise ValueError(f"more than {SPAN} stream events for seq {self._seq}")
            out.append({"type": type_, "sequence_number": self._seq * SPAN + self._next, **fields})
            self._next += 1

        return emit

    def _id(self, prefix: str, salt: int) -> str:
        # Made of the task id and where the item opened: a replay makes the same ids.
        return f"{prefix}_{self.record.id.removeprefix('resp_')}_{self._seq}_{salt}"

    def _open(self, body: dict[str, Any]) -> _Item:
        item = _Item(len(self.output), body)
        self.output.append(item)
        return item

    @staticmethod
    def _where(item: _Item) -> dict[str, Any]:
        return {"item_id": item.body["id"], "output_index": item.index}

    def _close(self, item: _Item, emit: Callable[..., None]) -> None:
        item.open = False
        emit("response.output_item.done", output_index=item.index, item=item.body)

    # -- the payload phase -----------------------------------------------------------------

    def _status(self, data: dict[str, Any], emit: Callable[..., None]) -> None:
        if data.get("phase") == "web_search":
            self._search_step(data, emit)
            return
        self._end_search(emit, "completed")
        if data.get("action") != "tool_call" or not data.get("mcp_server"):
            return  # Tether's own server tools have no item of the spec's
        call_id = str(data.get("tool_call_id", ""))
        item = self._calls.get(call_id)
        if item is None:
            if data.get("done") and "result" not in data:
                return
            item = self._open(
                {
                    "id": self._id("mcp", len(self.output)),
                    "type": "mcp_call",
                    "server_label": data["mcp_server"],
                    "name": data.get("mcp_tool") or "",
                    "arguments": data.get("arguments") or "",
                    "output": None,
                    "error": None,
                    "status": "in_progress",
                }
            )
            self._calls[call_id] = item
            emit("response.output_item.added", output_index=item.index, item=item.body)
            emit("response.mcp_call.in_progress", **self._where(item))
            emit(
                "response.mcp_call_arguments.done",
                **self._where(item),
                arguments=item.body["arguments"],
            )
        if not data.get("done"):
            return
        if data.get("skipped") or data.get("deadline"):
            item.body.update(status="incomplete", output=str(data.get("result") or ""))
            item.body["skipped" if data.get("skipped") else "deadline"] = True
        elif data.get("error"):
            item.body.update(status="failed", error=str(data.get("result") or ""))
            emit("response.mcp_call.failed", **self._where(item))
        else:
            item.body.update(status="completed", output=str(data.get("result") or ""))
            emit("response.mcp_call.completed", **self._where(item))
        self._close(item, emit)

    def _search_step(self, data: dict[str, Any], emit: Callable[..., None]) -> None:
        if data.get("step") == "web_search" and (data.get("skipped") or data.get("deadline")):
            # Skipped, or out of time: the search ended and the answer goes on with what it
            # found, so the call is "completed"; the spec has no status for a skip, and
            # Tether's own field on the item says which.
            if self._search is not None and self._search.open:
                self._search.body["skipped" if data.get("skipped") else "deadline"] = True
            self._end_search(emit, "completed")
            return
        item = self._search
        if item is None:
            item = self._search = self._open(
                {
                    "id": self._id("ws", len(self.output)),
                    "type": "web_search_call",
                    "status": "in_progress",
                    "action": {"type": "search", "query": ""},
                }
            )
            emit("response.output_item.added", output_index=item.index, item=item.body)
            emit("response.web_search_call.in_progress", **self._where(item))
        if data.get("action") == "search" and not data.get("done"):
            queries = [str(q) for q in data.get("queries") or ()]
            item.body.update(
                status="searching",
                action={"type": "search", "query": "; ".join(queries), "queries": queries},
            )
            emit("response.web_search_call.searching", **self._where(item))
        elif data.get("action") == "search" and data.get("done") and "urls" in data:
            item.body["action"]["sources"] = [{"type": "url", "url": str(u)} for u in data["urls"]]

    def _end_search(self, emit: Callable[..., None], status: str) -> None:
        item = self._search
        if item is None or not item.open:
            return
        item.body["status"] = status
        if status == "completed":
            emit("response.web_search_call.completed", **self._where(item))
        self._close(item, emit)

    # -- the answer --------------------------------------------------------------------------

    def _delta(self, data: dict[str, Any], emit: Callable[..., None]) -> None:
        if data.get("index"):
            return  # another choice of a chat request with n > 1: a response has one
        text = str(data.get("content") or "")
        if text:
            item = self._message
            if item is None:
                item = self._message = self._open(
                    {
                        "id": self._id("msg", len(self.output)),
                        "type": "message",
                        "role": "assistant",
                        "status": "in_progress",
                        "content": [],
                    }
                )
                emit("response.output_item.added", output_index=item.index, item=item.body)
                part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
                emit("response.content_part.added", **self._where(item), content_index=0, part=part)
            self._text += text
            self.streamed += 1
            emit(
                "response.output_text.delta",
                **self._where(item),
                content_index=0,
                delta=text,
                logprobs=[],
            )
        for call in data.get("tool_calls") or ():
            function = call.get("function") or {}
            item = self._open(
                {
                    "id": self._id("fc", len(self.output)),
                    "type": "function_call",
                    "call_id": str(call.get("id") or ""),
                    "name": str(function.get("name") or ""),
                    "arguments": str(function.get("arguments") or ""),
                    "status": "in_progress",
                }
            )
            emit("response.output_item.added", output_index=item.index, item=item.body)
            emit(
                "response.function_call_arguments.delta",
                **self._where(item),
                delta=item.body["arguments"],
            )
            emit(
                "response.function_call_arguments.done",
                **self._where(item),
                arguments=item.body["arguments"],
                name=item.body["name"],
            )
            item.body["status"] = "completed"
            self._close(item, emit)

    def _text_part(self) -> dict[str, Any]:
        return {
            "type": "output_text",
            "text": self._text,
            "annotations": citations(self._text, self._sources),
            "logprobs": [],
        }

    def _end(self, event: Event, emit: Callable[..., None]) -> None:
        ended = TaskRecord.from_dict(event.data, session_bound=self.record.session_bound)
        ended.response = self.record.response
        self.record = ended
        self.status = response_status(ended)
        cut = self.status != "completed"
        # The spec's web_search_call has no "incomplete": a search cut short "failed".
        self._end_search(emit, "failed" if cut else "completed")
        for item in self._calls.values():
            if item.open:
                item.body["status"] = "incomplete"
                self._close(item, emit)
        message = self._message
        if message is not None and message.open:
            item = message
            part = self._text_part()
            emit(
                "response.output_text.done",
                **self._where(item),
                content_index=0,
                text=self._text,
                logprobs=[],
            )
            emit("response.content_part.done", **self._where(item), content_index=0, part=part)
            item.body.update(status="incomplete" if cut else "completed", content=[part])
            self._close(item, emit)
        self.ended = True
        kind = {"completed": "response.completed", "failed": "response.failed"}.get(
            self.status, "response.incomplete"
        )
        emit(kind, response=self.response())

    # -- the Response ------------------------------------------------------------------------

    def response(self) -> dict[str, Any]:
        """The Response as the events so far leave it."""
        output = []
        for item in self.output:
            body = item.body
            if item is self._message and item.open:
                body = {**body, "content": [self._text_part()]}
            output.append(body)
        return self.base(self.record, self.status, output, self.streamed)


def response_status(record: TaskRecord) -> str:
    """The Response's status of a task: ``incomplete`` for an answer cut at its token
    limit; a task's own status otherwise (``running`` is ``in_progress``)."""
    if record.status == "running":
        return "in_progress"
    if record.status == "completed" and record.finish_reason == "length":
        return "incomplete"
    return record.status


def citations(text: str, sources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``url_citation`` annotations for each ``[n]`` in the text that names a source."""
    by_index = {int(s.get("index", i + 1)): s for i, s in enumerate(sources)}
    out = []
    for match in _CITATION.finditer(text):
        source = by_index.get(int(match.group(1)))
        if source is not None:
            out.append(
                {
                    "type": "url_citation",
                    "start_index": match.start(),
                    "end_index": match.end(),
                    "url": str(source.get("url", "")),
                    "title": str(source.get("title", "")),
                }
            )
    return out


def created_at(record: TaskRecord) -> float:
    return record.created_at or time.time()
