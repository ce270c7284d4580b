"""Scenario 3: a client walks away; how long until the upstream connection is closed.

SSE (``stream: true``) and sync (``stream: false``) clients send a request, wait until the
task is mid-search (the search fake hangs) or mid-generation (a long slow token stream; the
SSE client waits for its first content chunk), then close their socket. Measured: from the
moment just before the bench closed its socket to the fake's ``closed_at`` for the upstream
connection (both CLOCK_MONOTONIC). The task must then end ``cancelled`` with reason
``disconnect``.
"""

from __future__ import annotations

import json
from typing import Any

import trio

from bench.context import Bench
from bench.httpclient import HttpConnection, HttpError, sse_events

SCENARIO = "disconnect"
# 100 s of tokens: longer than any sample (the fake builds the token list up front, so
# it is kept small).
LONG_STREAM: dict[str, Any] = {"kind": "text", "tokens": 2000, "rate": 20}
CLIENTS = ("sse", "sync")
PHASES = ("web_search", "generating")


async def _configure(b: Bench, phase: str) -> tuple[str, str]:
    await b.reset_fakes()
    if phase == "web_search":
        await b.fake("search").configure(mode="hang")
        return "search", "/search"
    await b.fake("model").configure(default_reply=LONG_STREAM)
    return "model", "/v1/chat/completions"


async def _client(conn: HttpConnection, body: dict[str, Any], first_content: trio.Event) -> None:
    """Send the request and read the answer until the bench closes the socket."""
    try:
        status, _ = await conn.open_stream("POST", "/api/chat/completions", body)
        if status != 200:
            return
        if body.get("stream"):
            async for _, data in sse_events(conn):
                if data.startswith("{") and json.loads(data)["choices"][0]["delta"].get("content"):
                    first_content.set()
        else:
            async for _ in conn.body_chunks():
                pass
    except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, HttpError):
        pass  # the bench closed the socket under us: that is the point


async def _one(
    b: Bench, client: str, phase: str, fake_name: str, prefix: str
) -> tuple[float | None, str]:
    fake = b.fake(fake_name)
    seen_before = len(await fake.requests(prefix))
    chat_id = "bench-disc-" + b.marker("c")
    body = b.chat_body(
        b.marker("disc"), chat_id=chat_id, web_search=phase == "web_search", stream=client == "sse"
    )
    conn = b.conn()
    first_content = trio.Event()
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_client, conn, body, first_content)
        if await fake.wait_request(prefix, seen_before + 1, timeout=10) is None:
            raise RuntimeError(f"{client}/{phase}: the {fake_name} fake saw no request")
        if phase == "generating":
            if client == "sse":
                with trio.fail_after(10):
                    await first_content.wait()
            else:
                await trio.sleep(0.2)  # a few tokens into the answer
        mine = (await fake.requests(prefix))[seen_before:]
        closed_at_client = conn.abort()
    upstream: float | None = None
    record = await fake.wait_closed(int(mine[0]["conn_id"]), timeout=10)
    if record is not None and record.get("closed_at") is not None:
        upstream = float(record["closed_at"]) - closed_at_client
    status = await _task_end(b, chat_id)
    return upstream, status


async def _task_end(b: Bench, chat_id: str) -> str:
    """``status/cancel_reason`` of the chat's (single) task once it has ended."""
    conn = b.conn()
    try:
        with trio.move_on_after(10):
            while True:
                answer = await conn.request(
                    "GET", f"/api/tasks?include_finished=true&chat_id={chat_id}"
                )
                tasks = answer.json().get("tasks", [])
                if tasks and tasks[0].get("ended_at"):
                    return f"{tasks[0]['status']}/{tasks[0].get('cancel_reason')}"
                await trio.sleep(0.01)
    finally:
        await conn.aclose()
    return "not ended after 10 s"


async def run(b: Bench) -> None:
    res = b.results
    rows: list[dict[str, Any]] = []
    problems: list[str] = []
    for phase in PHASES:
        fake_name, prefix = await _configure(b, phase)
        for client in CLIENTS:
            values: list[float] = []
            statuses: dict[str, int] = {}
            for _ in range(b.cfg.disconnect_samples):
                with trio.fail_after(40):
                    upstream, status = await _one(b, client, phase, fake_name, prefix)
                statuses[status] = statuses.get(status, 0) + 1
                if upstream is None:
                    problems.append(
                        f"{client}/{phase}: upstream connection still open "
                        "10 s after the client left"
                    )
                else:
                    values.append(upstream)
                if status != "cancelled/disconnect":
                    problems.append(f"{client}/{phase}: task ended {status}")
            summary = res.add_set(SCENARIO, f"{client}/{phase}", values)
            rows.append(
                {
                    "client": "SSE" if client == "sse" else "sync",
                    "phase": phase,
                    **summary,
                    "status": ", ".join(f"{k} ×{v}" for k, v in sorted(statuses.items())),
                }
            )
            b.progress.step(
                f"{client:<4} mid-{phase:<10}: upstream closed p50 "
                f"{summary['p50']} ms, max {summary['max']} ms"
            )
    res.figures[SCENARIO] = rows
    res.check(
        "disconnect: every task ended cancelled/disconnect and its upstream connection closed",
        not problems,
        "all samples" if not problems else f"{len(problems)} problems, e.g. {problems[0]}",
    )
