"""Scenario 8: the Responses API (``/v1/responses``), each figure against a baseline of the
same run.

(a) Time to the background Response: ``POST /v1/responses`` with ``background: true``, from
sending it to its 200 (status ``queued``), interleaved in random order with ``GET /healthz``
on the same connection: one client, then many at once (as time_to_task_id measures the chat
route). Two bodies: plain (the model answers at once, so the sequential client leaves
time_to_task_id's 10 ms after each request for that work) and with the ``web_search`` tool
against a search engine that does not answer (the Response must come before any search);
those are cancelled afterwards, all at once, and must all end ``cancelled``. The chat
route's background POST with the same work (web search off and on) is interleaved too: a
response is a task, so the difference is what the Responses adapter costs.

(b) Cancel: a background response held in a phase as stop_latency holds a task (its
``configure_phase``: the search hangs, the pages hang, a slow token stream), then
``POST /v1/responses/{id}/cancel``, or, interleaved, the task route's
``POST /api/tasks/{id}/stop`` on the same response (a response is a task: its cancel should
cost what a task stop costs). From sending it to: its answer; the stream's terminal event
(``response.incomplete``, status ``cancelled``) at a client following the response's stream;
every upstream connection of the response recorded closed by its fake (CLOCK_MONOTONIC,
the bench's clock too).

(c) Resume: a completed response of N tokens; ``GET /v1/responses/{id}?stream=true`` with
``starting_after`` ten events before its end, from sending it to the first event, against
a fresh stream's first event (no ``starting_after``) and ``/healthz``, interleaved on one
connection. A resumed stream replays the task's log through the translator from its start
and sends what is past the cursor, so its first event waits for the translation of the whole
log before it; two log lengths show how that grows. Every stream is read to its end and
checked against the full replay: the resumed one must be its tail, with no gap and no
duplicate.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any

import trio

from bench.context import Bench
from bench.httpclient import HttpConnection, sse_events
from bench.scenarios.stop_latency import PhaseSetup, configure_phase
from bench.scenarios.time_to_task_id import (
    SEQUENTIAL_GAP_S,
    Op,
    Samples,
    interleaved_rounds,
    timed_chat_post,
    timed_get,
)
from bench.stats import ratio

SCENARIO = "responses"
CANCEL_PHASES = ("web_search", "page_fetch", "generating")
TERMINAL_TYPES = ("response.completed", "response.incomplete", "response.failed")
RESUME_BACK = 10  # resume this many events before the end of the log
WAIT_S = 10.0  # generous bound on anything a sample waits for


def _body(b: Bench, *, web_search: bool) -> dict[str, Any]:
    body: dict[str, Any] = {"model": b.model_id, "input": b.marker("r"), "background": True}
    if web_search:
        body["tools"] = [{"type": "web_search"}]
    return body


async def _create(conn: HttpConnection, body: dict[str, Any]) -> tuple[str | None, Any]:
    """Create a background response: its id (None unless a 200 with status ``queued``)
    and the answer."""
    answer = await conn.request("POST", "/v1/responses", body)
    data = answer.json() if answer.status == 200 else {}
    if data.get("status") == "queued" and data.get("id"):
        return str(data["id"]), answer
    return None, answer


# -- (a) time to the background Response --------------------------------------------------


async def _time_to_response(b: Bench, problems: list[str]) -> list[dict[str, Any]]:
    res = b.results
    await b.reset_fakes()
    await b.fake("search").configure(mode="hang")
    samples = Samples()
    chat_id = "bench-responses-" + b.marker("c")  # the chat route's tasks, for comparison
    held: list[str] = []  # the web-search responses, waiting on the search until cancelled

    def ops(conn: HttpConnection, mode: str) -> list[Op]:
        async def create(web_search: bool) -> None:
            key = f"{'web_search' if web_search else 'plain'}/{mode}"
            response_id, answer = await _create(conn, _body(b, web_search=web_search))
            if response_id is None:
                samples.fail(key, f"{answer.status}: {answer.body[:120]!r}")
                return
            samples.add(key, answer.elapsed)
            if web_search:
                held.append(response_id)

        def chat(web_search: bool) -> dict[str, object]:
            return b.chat_body(
                b.marker("c"), chat_id=chat_id, web_search=web_search, background=True
            )

        return [
            lambda: timed_get(conn, "/healthz", samples, f"floor/{mode}"),
            lambda: create(False),
            lambda: create(True),
            lambda: timed_chat_post(conn, chat(False), samples, f"chat_plain/{mode}"),
            lambda: timed_chat_post(conn, chat(True), samples, f"chat_web_search/{mode}"),
        ]

    conn = b.conn()
    try:
        sequential = ops(conn, "sequential")
        await interleaved_rounds(sequential, 5, random.Random(11), SEQUENTIAL_GAP_S)
        samples.values.clear()  # the warm-up
        await interleaved_rounds(
            sequential, b.cfg.responses_sequential, random.Random(12), SEQUENTIAL_GAP_S
        )
    finally:
        await conn.aclose()
    conns = [b.conn() for _ in range(b.cfg.responses_concurrent_clients)]
    try:
        async with trio.open_nursery() as nursery:
            for c in conns:
                nursery.start_soon(c.connect)
        async with trio.open_nursery() as nursery:
            for i, c in enumerate(conns):
                nursery.start_soon(
                    interleaved_rounds,
                    ops(c, "concurrent"),
                    b.cfg.responses_concurrent_rounds,
                    random.Random(200 + i),
                )
    finally:
        for c in conns:
            await c.aclose()
    cancelled = await _cancel_all(b, held)
    await b.stop_chat(chat_id)
    if cancelled != len(held):
        problems.append(
            f"time to Response: {len(held) - cancelled} of {len(held)} web-search "
            "responses did not end cancelled when cancelled"
        )
    drained = await b.wait_no_tasks(30)
    if drained is None:
        problems.append("time to Response: tasks still running 30 s after the cancels")
    for key, fails in samples.failures.items():
        problems.append(f"time to Response {key}: {len(fails)} failed, e.g. {fails[0]}")
    rows = []
    for mode in ("sequential", "concurrent"):
        floor = res.add_set(
            SCENARIO, f"create/floor/{mode}", samples.values.get(f"floor/{mode}", [])
        )
        for body in ("plain", "web_search"):
            create = res.add_set(
                SCENARIO, f"create/{body}/{mode}", samples.values.get(f"{body}/{mode}", [])
            )
            chat = res.add_set(
                SCENARIO,
                f"create/chat_{body}/{mode}",
                samples.values.get(f"chat_{body}/{mode}", []),
            )
            rows.append(
                {
                    "body": body,
                    "clients": 1 if mode == "sequential" else len(conns),
                    "n": create["n"],
                    "floor_p50": floor["p50"],
                    "floor_p99": floor["p99"],
                    "response_p50": create["p50"],
                    "response_p99": create["p99"],
                    "ratio_p50": ratio(create["p50"], floor["p50"]),
                    "ratio_p99": ratio(create["p99"], floor["p99"]),
                    "chat_p50": chat["p50"],
                    "chat_p99": chat["p99"],
                    "chat_ratio_p50": ratio(chat["p50"], floor["p50"]),
                    "chat_ratio_p99": ratio(chat["p99"], floor["p99"]),
                    "response_chat_ratio_p50": ratio(create["p50"], chat["p50"]),
                    "response_chat_ratio_p99": ratio(create["p99"], chat["p99"]),
                }
            )
    res.figures[SCENARIO + "_held_cancel"] = {"responses": len(held), "cancelled": cancelled}
    return rows


async def _cancel_all(b: Bench, ids: list[str]) -> int:
    """Cancel every response of ``ids`` at once (20 connections); how many answered
    ``cancelled``."""
    ended: list[str] = []
    queue = list(ids)

    async def worker() -> None:
        conn = b.conn()
        try:
            while queue:
                response_id = queue.pop()
                answer = await conn.request("POST", f"/v1/responses/{response_id}/cancel", {})
                if answer.status == 200:
                    ended.append(str(answer.json().get("status")))
        finally:
            await conn.aclose()

    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            for _ in range(min(20, len(ids))):
                nursery.start_soon(worker)
    return ended.count("cancelled")


# -- (b) cancel to every upstream connection closed ----------------------------------------


class StreamFollower:
    """A client reading a response's stream: when its first text delta and its terminal
    event arrived."""

    def __init__(self) -> None:
        self.first_delta = trio.Event()
        self.ended = trio.Event()
        self.terminal: dict[str, Any] = {}
        self.terminal_at = 0.0

    async def follow(self, reader: HttpConnection) -> None:
        async for at, data in sse_events(reader):
            if data.startswith(":"):
                continue
            event = json.loads(data)
            if event["type"] == "response.output_text.delta":
                self.first_delta.set()
            if event["type"] in TERMINAL_TYPES:
                self.terminal, self.terminal_at = event, at
                self.ended.set()
                return


@dataclass
class CancelSample:
    answer: float | None = None
    terminal: float | None = None
    upstream: float | None = None
    problem: str = ""


async def _cancel_one(
    b: Bench, phase: str, setup: PhaseSetup, arm: str, ctl: HttpConnection
) -> CancelSample:
    """One response held in ``phase``, then cancelled (``arm``: ``cancel`` by the Responses
    route, ``task_stop`` by the task route)."""
    fake = b.fake(str(setup.upstream))
    seen_before = len(await fake.requests(setup.path_prefix))
    sample = CancelSample()
    response_id, answer = await _create(ctl, _body(b, web_search=setup.web_search))
    if response_id is None:
        sample.problem = f"create answered {answer.status}"
        return sample
    reader, stream = b.conn(), StreamFollower()
    try:
        status, _ = await reader.open_stream("GET", f"/v1/responses/{response_id}?stream=true")
        if status != 200:
            sample.problem = f"its stream answered {status}"
            return sample
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stream.follow, reader)
            with trio.fail_after(WAIT_S):
                await fake.wait_request(setup.path_prefix, seen_before + setup.count, WAIT_S)
                if phase == "generating":
                    await stream.first_delta.wait()
            mine = (await fake.requests(setup.path_prefix))[seen_before:]
            conn_ids = sorted({int(r["conn_id"]) for r in mine})
            path = (
                f"/v1/responses/{response_id}/cancel"
                if arm == "cancel"
                else f"/api/tasks/{response_id}/stop"
            )
            stop = await ctl.request("POST", path, {})
            sample.answer = stop.elapsed
            ended = stop.json().get("status") if stop.status == 200 else stop.status
            closed = [await fake.wait_closed(conn_id, WAIT_S) for conn_id in conn_ids]
            at = [float(c["closed_at"]) for c in closed if c and c.get("closed_at") is not None]
            if conn_ids and len(at) == len(conn_ids):
                sample.upstream = max(at) - stop.sent_at
            with trio.move_on_after(WAIT_S):
                await stream.ended.wait()
            nursery.cancel_scope.cancel()
    finally:
        await reader.aclose()
    problems = []
    if ended != "cancelled":
        problems.append(f"the {arm} answered {ended}")
    if sample.upstream is None:
        problems.append(f"{setup.upstream} connections {conn_ids} not all closed")
    if stream.ended.is_set():
        sample.terminal = stream.terminal_at - stop.sent_at
        kind, status = stream.terminal["type"], stream.terminal["response"]["status"]
        if (kind, status) != ("response.incomplete", "cancelled"):
            problems.append(f"its stream ended {kind} ({status})")
    else:
        problems.append("no terminal event on its stream")
    sample.problem = "; ".join(problems)
    return sample


async def _cancels(b: Bench, problems: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    res = b.results
    rows: list[dict[str, Any]] = []
    floor: list[float] = []
    ctl = b.conn()
    try:
        for phase in CANCEL_PHASES:
            setup = await configure_phase(b, phase, {})
            by_arm: dict[str, list[CancelSample]] = {"cancel": [], "task_stop": []}
            rng = random.Random(f"cancel-{phase}")
            for _ in range(b.cfg.responses_cancel_samples):
                arms = list(by_arm)
                rng.shuffle(arms)
                for arm in arms:
                    floor.append((await ctl.request("GET", "/healthz")).elapsed)
                    with trio.fail_after(4 * WAIT_S):
                        sample = await _cancel_one(b, phase, setup, arm, ctl)
                    by_arm[arm].append(sample)
                    if sample.problem:
                        problems.append(f"cancel {phase}/{arm}: {sample.problem}")
            for arm, samples in by_arm.items():
                row: dict[str, Any] = {"phase": phase, "by": arm, "n": len(samples)}
                for metric in ("answer", "terminal", "upstream"):
                    values = [getattr(s, metric) for s in samples if getattr(s, metric) is not None]
                    summary = res.add_set(SCENARIO, f"cancel/{phase}/{arm}/{metric}", values)
                    row[f"{metric}_p50"], row[f"{metric}_p99"] = summary["p50"], summary["p99"]
                rows.append(row)
            cancel, stop = rows[-2], rows[-1]
            b.progress.step(
                f"cancel during {phase:<10}: upstream closed p50 {cancel['upstream_p50']} ms "
                f"(task stop {stop['upstream_p50']} ms)"
            )
    finally:
        await ctl.aclose()
    ping = res.add_set(SCENARIO, "cancel/floor", floor)
    for row in rows:
        base = next(r for r in rows if r["phase"] == row["phase"] and r["by"] == "task_stop")
        row["upstream_ratio_p50"] = ratio(row["upstream_p50"], base["upstream_p50"])
        row["upstream_ratio_p99"] = ratio(row["upstream_p99"], base["upstream_p99"])
        row["answer_floor_ratio_p50"] = ratio(row["answer_p50"], ping["p50"])
    return rows, ping


# -- (c) resume after a sequence number ----------------------------------------------------


async def _read_stream(conn: HttpConnection, path: str) -> tuple[float | None, list[int]]:
    """Open a response's stream and read it to its end: the time from sending to its
    first event, and every event's sequence number."""
    status, _ = await conn.open_stream("GET", path)
    if status != 200:
        raise RuntimeError(f"GET {path} answered {status}")
    first: float | None = None
    numbers: list[int] = []
    async for at, data in sse_events(conn):
        if data.startswith(":"):
            continue
        if first is None:
            first = at - conn.last_sent_at
        numbers.append(int(json.loads(data)["sequence_number"]))
    return first, numbers


async def _resume_in_log(
    b: Bench, conn: HttpConnection, tokens: int, problems: list[str]
) -> dict[str, Any] | None:
    """The resume figures on one completed response of ``tokens`` tokens."""
    res = b.results
    await b.reset_fakes()
    # Paced over a second: tokens that reach Tether in one read become one event, and the
    # log is to hold about one event per token.
    await b.fake("model").configure(
        default_reply={"kind": "text", "tokens": tokens, "rate": float(tokens)}
    )
    response_id, answer = await _create(conn, _body(b, web_search=False))
    if response_id is None:
        problems.append(f"resume: create answered {answer.status}")
        return None
    stream_path = f"/v1/responses/{response_id}?stream=true"
    with trio.fail_after(30):
        _, full = await _read_stream(conn, stream_path)  # waits for the end
    if len(full) <= RESUME_BACK:
        problems.append(f"resume: a response of {tokens} tokens streamed {len(full)} events")
        return None
    after = full[-RESUME_BACK - 1]
    samples = Samples()

    async def stream(key: str, starting_after: int | None) -> None:
        path, expected = stream_path, full
        if starting_after is not None:
            path += f"&starting_after={starting_after}"
            expected = [n for n in full if n > starting_after]
        first, numbers = await _read_stream(conn, path)
        if first is None or numbers != expected:
            samples.fail(key, f"{len(numbers)} events, not the {len(expected)} of the replay")
        else:
            samples.add(key, first)

    ops: list[Op] = [
        lambda: timed_get(conn, "/healthz", samples, "floor"),
        lambda: stream("fresh", None),
        lambda: stream("resumed", after),
    ]
    await interleaved_rounds(ops, 3, random.Random(20))
    samples.values.clear()  # the warm-up
    await interleaved_rounds(ops, b.cfg.responses_resume_samples, random.Random(21))
    for key, fails in samples.failures.items():
        problems.append(f"resume {tokens} tokens {key}: {len(fails)} failed: {fails[0]}")
    floor, fresh, resumed = (
        res.add_set(SCENARIO, f"resume/{tokens}/{key}", samples.values.get(key, []))
        for key in ("floor", "fresh", "resumed")
    )
    b.progress.step(
        f"resume in a log of {len(full)} events: first event p50 {resumed['p50']} ms "
        f"(fresh stream {fresh['p50']} ms, /healthz {floor['p50']} ms)"
    )
    return {
        "tokens": tokens,
        "events": len(full),
        "starting_after": after,
        "n": resumed["n"],
        "floor_p50": floor["p50"],
        "floor_p99": floor["p99"],
        "fresh_p50": fresh["p50"],
        "fresh_p99": fresh["p99"],
        "resumed_p50": resumed["p50"],
        "resumed_p99": resumed["p99"],
        "resumed_fresh_ratio_p50": ratio(resumed["p50"], fresh["p50"]),
        "resumed_fresh_ratio_p99": ratio(resumed["p99"], fresh["p99"]),
        "resumed_floor_ratio_p50": ratio(resumed["p50"], floor["p50"]),
        "resumed_floor_ratio_p99": ratio(resumed["p99"], floor["p99"]),
    }


async def _resume(b: Bench, problems: list[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    conn = b.conn()
    try:
        for tokens in b.cfg.responses_resume_tokens:
            row = await _resume_in_log(b, conn, tokens, problems)
            if row is not None:
                rows.append(row)
    finally:
        await conn.aclose()
    return rows


async def run(b: Bench) -> None:
    res = b.results
    problems: list[str] = []
    b.progress.step(
        f"time to the background Response: sequential x{b.cfg.responses_sequential}, "
        f"{b.cfg.responses_concurrent_clients} clients x{b.cfg.responses_concurrent_rounds}"
    )
    created = await _time_to_response(b, problems)
    cancels, ping = await _cancels(b, problems)
    resumes = await _resume(b, problems)
    await b.reset_fakes()
    res.figures[SCENARIO] = {
        "time_to_response": created,
        "cancel": cancels,
        "cancel_floor": ping,
        "resume": resumes,
        "resume_back": RESUME_BACK,
    }
    res.check(
        "responses: every background create answered 200 queued; every cancel and task "
        "stop ended its response cancelled, closed its upstream connections and ended its "
        "stream with response.incomplete (cancelled); every resumed stream was the full "
        "replay's tail (no gap, no duplicate)",
        not problems,
        "all samples" if not problems else f"{len(problems)} problems, e.g. {problems[0]}",
    )
