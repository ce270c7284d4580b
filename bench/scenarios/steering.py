"""Scenario 9: steering a running task (issue 18): a skip, or a phase deadline, ends one step
and closes that step's upstream connections while the task goes on.

Three kinds of step, each held by a fake that does not answer: the search phase
(``web_search``: the search engine hangs), one page read (``page:<url>``: of the three
result pages, ``/page/1`` hangs and the two others answer at once) and one tool call (its
``tool_call_id``: the model asks for ``fetch_url`` of the pages fake's ``/hang`` once, then
answers with text). For each kind, interleaved in random order, round after round:

- *skip*: a background chat, followed on the WebSocket; once the fake has the step's
  request, ``POST /api/tasks/{id}/skip {"step"}``; from sending the skip to its answer and to
  the fake recording that request's connection closed (CLOCK_MONOTONIC, the bench's clock
  too). The task must then complete, with the step's closing ``status`` marked ``skipped``.
- *stop* (the floor): the same task stopped instead, by ``POST /api/tasks/{id}/stop``, with
  stop_latency's own sample (``stop_one``); from the stop to the same connection closed.
  Skip / stop is the ratio reported.
- *deadline* (search and tool call): a streaming chat with ``deadlines.web_search_s`` or
  ``deadlines.tools_s`` small; how late after the deadline the step's connection closes:
  its close time minus (the request's send time + the deadline). The deadline runs from the
  step's start, which is after the request (the task is created, the step begins; for a
  tool call, after the model's first round too), so this overstates the lateness by that
  much; the lateness from the step's request reaching the fake (+ the deadline), which
  comes after the step began and so understates it, is beside it. The task must complete
  (``finish_reason`` ``stop``) with the step ``out of time``. Against the stop of the same
  kind.
- *first token after a search deadline*: on the same search-deadline streams, from the
  deadline (request + ``web_search_s``) to the answer's first content chunk; the floor is a
  streaming chat without web search, from sending it to its first content chunk, on the
  same connection (so the ratio is how much a search cut short by its deadline adds to the
  path to the first token beyond an ordinary chat's).
"""

from __future__ import annotations

import json
import random
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import trio

from bench.context import DEFAULT_REPLY, Bench
from bench.httpclient import HttpConnection, sse_events
from bench.scenarios.stop_latency import (
    PhaseSetup,
    Sample,
    configure_phase,
    hanging_fetch_reply,
    stop_one,
)
from bench.stats import ratio
from bench.wsclient import WsClient, ws_client

SCENARIO = "steering"
KINDS = ("web_search", "page", "tool")
# stop_latency's phase names for the same kinds of step
STOP_PHASE = {"web_search": "web_search", "page": "page_fetch", "tool": "tool_call"}
# the deadline that cuts each kind short (the page reads run inside the search phase)
DEADLINE_KEY = {"web_search": "web_search_s", "tool": "tools_s"}
SLOW_PAGE = "/page/1"  # the one result page that hangs in the page kind
SLOW_PAGE_HTML = "<html><head><title>Slow</title></head><body><p>slow</p></body></html>"
WAIT_S = 10.0  # generous bound on anything a sample waits for


async def _configure(b: Bench, kind: str) -> PhaseSetup:
    """Reset the fakes and hold a task in one step of ``kind``; what to wait for."""
    if kind == "web_search":
        return await configure_phase(b, "web_search", {})
    if kind == "page":
        await b.reset_fakes()
        await b.fake("pages").configure(pages={SLOW_PAGE: {"html": SLOW_PAGE_HTML, "delay": 3600}})
        return PhaseSetup(web_search=True, upstream="pages", path_prefix=SLOW_PAGE)
    setup = await configure_phase(b, "tool_call", {})
    # One tool call per task (``_before_sample``), then the model's ordinary answer: a
    # skipped or timed-out call lets the task go on to a second round.
    await b.fake("model").configure(default_reply=DEFAULT_REPLY)
    return setup


async def _before_sample(b: Bench, kind: str) -> None:
    if kind == "tool":
        await b.fake("model").configure(script=[hanging_fetch_reply(b)])


async def _step_requests(b: Bench, setup: PhaseSetup, seen_before: int) -> tuple[list[int], float]:
    """Wait until the fake has the step's request; the connections it came on, and when the
    first of them arrived (monotonic)."""
    fake = b.fake(str(setup.upstream))
    if await fake.wait_request(setup.path_prefix, seen_before + setup.count, WAIT_S) is None:
        raise RuntimeError(f"the {fake.name} fake saw no request under {setup.path_prefix}")
    mine = (await fake.requests(setup.path_prefix))[seen_before:]
    return sorted({int(r["conn_id"]) for r in mine}), min(float(r["received_at"]) for r in mine)


async def _closed_at(b: Bench, setup: PhaseSetup, conn_ids: list[int]) -> float | None:
    """When the last of ``conn_ids`` was recorded closed by the fake, or None."""
    fake = b.fake(str(setup.upstream))
    closed = [await fake.wait_closed(conn_id, WAIT_S) for conn_id in conn_ids]
    at = [float(c["closed_at"]) for c in closed if c and c.get("closed_at") is not None]
    return max(at) if conn_ids and len(at) == len(conn_ids) else None


# -- skip ----------------------------------------------------------------------------------


@dataclass
class SkipSample:
    answer: float | None = None
    upstream: float | None = None
    problem: str = ""


def _status_events(sub: WsClient, task_id: str) -> list[dict[str, Any]]:
    return [a.data for a in sub.events.get(task_id, ()) if a.type == "status"]


async def _step_id(sub: WsClient, task_id: str, kind: str) -> str:
    """The id of the step a skip of ``kind`` names, from the task's ``status`` events."""
    if kind == "web_search":
        return "web_search"

    def find() -> str | None:
        for data in _status_events(sub, task_id):
            if kind == "page" and data.get("action") == "fetch":
                for url in data.get("urls") or ():
                    if urllib.parse.urlsplit(str(url)).path == SLOW_PAGE:
                        return "page:" + str(url)
            if kind == "tool" and data.get("action") == "tool_call" and data.get("tool_call_id"):
                return str(data["tool_call_id"])
        return None

    await sub.wait_until(lambda: find() is not None, WAIT_S)
    step = find()
    if step is None:
        raise RuntimeError(f"{kind}: no status event named the step to skip")
    return step


async def skip_one(
    b: Bench, kind: str, setup: PhaseSetup, sub: WsClient, http: HttpConnection, chat_id: str
) -> SkipSample:
    """One background task held in a step of ``kind``, then ``POST .../skip`` of that step."""
    sample = SkipSample()
    seen_before = len(await b.fake(str(setup.upstream)).requests(setup.path_prefix))
    body = b.chat_body(
        b.marker("skip"),
        chat_id=chat_id,
        web_search=setup.web_search,
        tool_ids=setup.tool_ids,
        background=True,
    )
    created = await http.request("POST", "/api/chat/completions", body)
    if created.status != 202:
        sample.problem = f"the chat answered {created.status}"
        return sample
    task_id = str(created.json()["task_id"])
    await sub.send({"type": "subscribe", "task_id": task_id, "after": 0})
    conn_ids, _ = await _step_requests(b, setup, seen_before)
    step = await _step_id(sub, task_id, kind)
    skip = await http.request("POST", f"/api/tasks/{task_id}/skip", {"step": step})
    sample.answer = skip.elapsed
    state = skip.json().get("state") if skip.status == 200 else skip.status
    closed_at = await _closed_at(b, setup, conn_ids)
    if closed_at is not None:
        sample.upstream = closed_at - skip.sent_at
    terminal = await sub.wait_terminal(task_id, WAIT_S)
    problems = []
    if state != "skipped":
        problems.append(f"the skip answered {state}")
    if closed_at is None:
        problems.append(f"{setup.upstream} connections {conn_ids} not all closed")
    if terminal is None or terminal.type != "task:completed":
        problems.append(f"the task ended {terminal.type if terminal else 'never'}")
    if not any(d.get("step") == step and d.get("skipped") for d in _status_events(sub, task_id)):
        problems.append(f"no status event marked {step!r} skipped")
    await sub.send({"type": "unsubscribe", "task_id": task_id})
    sample.problem = "; ".join(problems)
    return sample


# -- deadlines and the first token ---------------------------------------------------------


@dataclass
class ChatStream:
    """What a client reading a streaming chat saw: its first content chunk, its status
    comments, how it ended."""

    first_token_at: float | None = None
    comments: list[str] = field(default_factory=list)
    status: str = ""
    finish_reason: str = ""

    async def read(self, conn: HttpConnection) -> None:
        async for at, data in sse_events(conn):
            if data.startswith(":"):
                self.comments.append(data)
                continue
            if data == "[DONE]":
                continue
            chunk = json.loads(data)
            for choice in chunk.get("choices") or ():
                if choice.get("delta", {}).get("content") and self.first_token_at is None:
                    self.first_token_at = at
                if choice.get("finish_reason"):
                    self.finish_reason = str(choice["finish_reason"])
            if isinstance(chunk.get("task"), dict):
                self.status = str(chunk["task"].get("status", ""))


@dataclass
class DeadlineSample:
    late: float | None = None  # closed - (request sent + deadline)
    late_from_step: float | None = None  # closed - (step's request at the fake + deadline)
    first_token: float | None = None  # first content chunk - (request sent + deadline)
    first_token_from_step: float | None = None
    problem: str = ""


async def deadline_one(
    b: Bench, kind: str, setup: PhaseSetup, conn: HttpConnection, chat_id: str
) -> DeadlineSample:
    """One streaming chat whose step of ``kind`` hangs until its deadline cuts it short."""
    sample = DeadlineSample()
    deadline = b.cfg.steering_deadline_s
    seen_before = len(await b.fake(str(setup.upstream)).requests(setup.path_prefix))
    body = b.chat_body(
        b.marker("deadline"),
        chat_id=chat_id,
        web_search=setup.web_search,
        tool_ids=setup.tool_ids,
        stream=True,
        deadlines={DEADLINE_KEY[kind]: deadline},
    )
    stream = ChatStream()
    status, _ = await conn.open_stream("POST", "/api/chat/completions", body)
    sent_at = conn.last_sent_at
    async with trio.open_nursery() as nursery:
        nursery.start_soon(stream.read, conn)
        if status != 200:
            sample.problem = f"the chat answered {status}"
            return sample
        conn_ids, step_at = await _step_requests(b, setup, seen_before)
        closed_at = await _closed_at(b, setup, conn_ids)
    if closed_at is not None:
        sample.late = closed_at - (sent_at + deadline)
        sample.late_from_step = closed_at - (step_at + deadline)
    if stream.first_token_at is not None:
        sample.first_token = stream.first_token_at - (sent_at + deadline)
        sample.first_token_from_step = stream.first_token_at - (step_at + deadline)
    problems = []
    if closed_at is None:
        problems.append(f"{setup.upstream} connections {conn_ids} not all closed")
    if (stream.status, stream.finish_reason) != ("completed", "stop"):
        problems.append(f"the task ended {stream.status} ({stream.finish_reason})")
    if stream.first_token_at is None:
        problems.append("no content chunk")
    if not any("out of time" in c for c in stream.comments):
        problems.append("no status said the step was out of time")
    sample.problem = "; ".join(problems)
    return sample


async def first_token_floor(
    b: Bench, conn: HttpConnection, chat_id: str
) -> tuple[float | None, str]:
    """A streaming chat without web search: from sending it to its first content chunk."""
    body = b.chat_body(b.marker("floor"), chat_id=chat_id, stream=True)
    stream = ChatStream()
    status, _ = await conn.open_stream("POST", "/api/chat/completions", body)
    sent_at = conn.last_sent_at
    await stream.read(conn)
    if status != 200 or stream.first_token_at is None or stream.status != "completed":
        return None, f"answered {status}, ended {stream.status or 'without a task'}"
    return stream.first_token_at - sent_at, ""


# -- the run -------------------------------------------------------------------------------


@dataclass
class KindSamples:
    skip: list[SkipSample] = field(default_factory=list)
    stop: list[Sample] = field(default_factory=list)
    deadline: list[DeadlineSample] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)


async def _kind(
    b: Bench,
    kind: str,
    sub: WsClient,
    http: HttpConnection,
    streams: HttpConnection,
    chat_id: str,
    problems: list[str],
) -> KindSamples:
    """Every arm of one kind of step, interleaved in random order, round after round."""
    setup = await _configure(b, kind)
    got = KindSamples()
    arms = ["skip", "stop"]
    if kind in DEADLINE_KEY:
        arms.append("deadline")
    if kind == "web_search":
        arms.append("floor")
    rng = random.Random(f"steering-{kind}")
    for _ in range(b.cfg.steering_samples):
        rng.shuffle(arms)
        for arm in arms:
            await _before_sample(b, kind)
            with trio.fail_after(4 * WAIT_S):
                if arm == "skip":
                    skip = await skip_one(b, kind, setup, sub, http, chat_id)
                    got.skip.append(skip)
                    problem = skip.problem
                elif arm == "stop":
                    stop = await stop_one(b, STOP_PHASE[kind], "http", setup, sub, http, chat_id)
                    got.stop.append(stop)
                    problem = ""
                    if (stop.status, stop.reason) != ("cancelled", "stop"):
                        problem = f"ended {stop.status} ({stop.reason})"
                    elif stop.upstream is None:
                        problem = f"the {setup.upstream} connection was not closed"
                elif arm == "deadline":
                    late = await deadline_one(b, kind, setup, streams, chat_id)
                    got.deadline.append(late)
                    problem = late.problem
                else:
                    value, problem = await first_token_floor(b, streams, chat_id)
                    if value is not None:
                        got.floor.append(value)
            if problem:
                problems.append(f"{kind}/{arm}: {problem}")
            sub.replies.clear()  # subscribe / unsubscribe answers: none is waited for
    return got


def _summary(b: Bench, key: str, values: list[float | None]) -> dict[str, Any]:
    return b.results.add_set(SCENARIO, key, [v for v in values if v is not None])


def _rows(b: Bench, kind: str, got: KindSamples) -> tuple[dict[str, Any], dict[str, Any] | None]:
    skip_answer = _summary(b, f"{kind}/skip/answer", [s.answer for s in got.skip])
    skip_closed = _summary(b, f"{kind}/skip/upstream", [s.upstream for s in got.skip])
    stop_answer = _summary(b, f"{kind}/stop/answer", [s.answer for s in got.stop])
    stop_closed = _summary(b, f"{kind}/stop/upstream", [s.upstream for s in got.stop])
    stop_ms = [s.stop_ms / 1000 for s in got.stop if s.stop_ms is not None]
    server_stop = _summary(b, f"{kind}/stop/server_stop_ms", list(stop_ms))
    skip_row = {
        "kind": kind,
        "n": skip_closed["n"],
        "skip_answer_p50": skip_answer["p50"],
        "skip_answer_p99": skip_answer["p99"],
        "skip_closed_p50": skip_closed["p50"],
        "skip_closed_p99": skip_closed["p99"],
        "stop_n": stop_closed["n"],
        "stop_answer_p50": stop_answer["p50"],
        "stop_answer_p99": stop_answer["p99"],
        "stop_closed_p50": stop_closed["p50"],
        "stop_closed_p99": stop_closed["p99"],
        "server_stop_ms_p50": server_stop["p50"],
        "server_stop_ms_p99": server_stop["p99"],
        "ratio_p50": ratio(skip_closed["p50"], stop_closed["p50"]),
        "ratio_p99": ratio(skip_closed["p99"], stop_closed["p99"]),
    }
    if kind not in DEADLINE_KEY:
        return skip_row, None
    late = _summary(b, f"{kind}/deadline/late", [s.late for s in got.deadline])
    from_step = _summary(
        b, f"{kind}/deadline/late_from_step", [s.late_from_step for s in got.deadline]
    )
    deadline_row = {
        "kind": kind,
        "deadline": DEADLINE_KEY[kind],
        "n": late["n"],
        "late_p50": late["p50"],
        "late_p99": late["p99"],
        "late_from_step_p50": from_step["p50"],
        "late_from_step_p99": from_step["p99"],
        "stop_closed_p50": stop_closed["p50"],
        "stop_closed_p99": stop_closed["p99"],
        "ratio_p50": ratio(late["p50"], stop_closed["p50"]),
        "ratio_p99": ratio(late["p99"], stop_closed["p99"]),
    }
    return skip_row, deadline_row


def _first_token_row(b: Bench, got: KindSamples) -> dict[str, Any]:
    after = _summary(b, "first_token/after_deadline", [s.first_token for s in got.deadline])
    from_step = _summary(
        b, "first_token/after_deadline_from_step", [s.first_token_from_step for s in got.deadline]
    )
    floor = _summary(b, "first_token/floor", list(got.floor))
    return {
        "n": after["n"],
        "after_deadline_p50": after["p50"],
        "after_deadline_p99": after["p99"],
        "from_step_p50": from_step["p50"],
        "from_step_p99": from_step["p99"],
        "floor_n": floor["n"],
        "floor_p50": floor["p50"],
        "floor_p99": floor["p99"],
        "ratio_p50": ratio(after["p50"], floor["p50"]),
        "ratio_p99": ratio(after["p99"], floor["p99"]),
    }


async def run(b: Bench) -> None:
    res = b.results
    if not b.ws_available:
        res.notes.append("steering skipped: no WebSocket /ws to follow the tasks with")
        return
    problems: list[str] = []
    skips: list[dict[str, Any]] = []
    deadlines: list[dict[str, Any]] = []
    first_token: dict[str, Any] = {}
    chat_id = "bench-steer-" + b.marker("c")
    http, streams = b.conn(), b.conn()
    try:
        async with ws_client(b.ws_url) as sub:
            for kind in KINDS:
                got = await _kind(b, kind, sub, http, streams, chat_id, problems)
                skip_row, deadline_row = _rows(b, kind, got)
                skips.append(skip_row)
                line = (
                    f"{kind:<10}: skip -> closed p50 {skip_row['skip_closed_p50']} ms, "
                    f"stop -> closed p50 {skip_row['stop_closed_p50']} ms"
                )
                if deadline_row is not None:
                    deadlines.append(deadline_row)
                    line += f"; closed {deadline_row['late_p50']} ms after the deadline"
                if kind == "web_search":
                    first_token = _first_token_row(b, got)
                    line += (
                        f"; first token {first_token['after_deadline_p50']} ms after it "
                        f"(no search: {first_token['floor_p50']} ms)"
                    )
                b.progress.step(line)
    finally:
        await http.aclose()
        await streams.aclose()
    await b.stop_chat(chat_id)
    await b.reset_fakes()
    if await b.wait_no_tasks(30) is None:
        problems.append("tasks still running 30 s after the scenario")
    res.figures[SCENARIO] = {
        "deadline_s": b.cfg.steering_deadline_s,
        "skip": skips,
        "deadline": deadlines,
        "first_token": first_token,
    }
    res.check(
        "steering: every skip answered skipped, closed its step's connection, and its task "
        "completed with the step marked skipped; every stop ended its task cancelled and "
        "closed the connection; every phase deadline closed its step's connection and its "
        "task completed (finish_reason stop) with the step out of time",
        not problems,
        "all samples" if not problems else f"{len(problems)} problems, e.g. {problems[0]}",
    )
