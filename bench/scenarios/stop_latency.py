"""Scenario 2: how long a stop takes, in each phase of a task, by HTTP and by WebSocket.

Each sample puts one task in a phase and holds it there with a fake that does not answer
(search: ``mode=hang``; page fetch: the pages fake's ``delay``; tool call: the model asks for
``fetch_url`` on ``/hang``; generating: a long slow token stream; MCP call: the model asks for
the MCP tool ``mcp:<server>:slow`` for an hour, on the stdio server or the streamable-HTTP
one, and the stop goes once the MCP server has the call), then sends the stop and measures
from that moment to (a) the HTTP answer of ``POST /api/tasks/{id}/stop``, (b) the
``task:cancelled`` event at a subscribed WebSocket client, (c) the fake upstream recording its
connection closed (``closed_at`` on CLOCK_MONOTONIC, the clock the bench reads too); for an
MCP call, the MCP server seeing the cancel: the first of its records of
``notifications/cancelled`` and (over HTTP) of the call's response stream ending (closed by
Tether, or, rarely, ended by the server first), each stamped with CLOCK_MONOTONIC too (see
``bench/mcp_fake.py``); both are kept apart as well. An MCP stop must end the task in
phase ``tools``.
"queued" sends the stop right after the task id, before the task can do any I/O (with web
search on against a hanging search engine, so the phase it ended in is reported).
Baseline: a WebSocket ``ping`` round trip, interleaved with the samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import trio

from bench.context import MCP_HTTP, MCP_STDIO, Bench
from bench.fakes import FakeControl
from bench.httpclient import HttpConnection, get_json
from bench.stats import ratio, summarize
from bench.wsclient import WsClient, ws_client

SCENARIO = "stop_latency"
PHASES = ("queued", "web_search", "page_fetch", "tool_call", "generating")
# A stop during an MCP call, per transport of the MCP server: phase -> server name.
MCP_PHASES = {"mcp_stdio": MCP_STDIO, "mcp_http": MCP_HTTP}
# The MCP tool's call: an hour, longer than any sample (the task's tool timeout, 30 s by
# default, is longer than a sample too).
MCP_SLOW_ARGS = '{"seconds": 3600, "steps": 1}'
# 100 s of tokens: longer than any sample (the fake builds the token list up front, so
# it is kept small).
LONG_STREAM: dict[str, Any] = {"kind": "text", "tokens": 2000, "rate": 20}


@dataclass
class PhaseSetup:
    web_search: bool = False
    tool_ids: list[str] = field(default_factory=list)
    upstream: str | None = None  # which fake's connection the stop must close
    path_prefix: str = "/"
    count: int = 1  # requests to wait for before stopping
    mcp_server: str | None = None  # an MCP call on this server (its records' label)


def hanging_fetch_reply(b: Bench) -> dict[str, Any]:
    """The model's reply that calls the server tool ``fetch_url`` on the pages fake's
    ``/hang`` (headers, then nothing until Tether leaves)."""
    url = f"{b.fake('pages').base_url}/hang"
    return {"kind": "tool_calls", "calls": [["fetch_url", f'{{"url": "{url}"}}']]}


async def configure_phase(b: Bench, phase: str, mcp_names: dict[str, str]) -> PhaseSetup:
    """Reset the fakes and set them up to hold a task in ``phase``; what to wait for."""
    await b.reset_fakes()
    search, pages, model = b.fake("search"), b.fake("pages"), b.fake("model")
    if phase == "queued":
        await search.configure(mode="hang")
        return PhaseSetup(web_search=True)
    if phase == "web_search":
        await search.configure(mode="hang")
        return PhaseSetup(web_search=True, upstream="search", path_prefix="/search")
    if phase == "page_fetch":
        await pages.configure(delay=3600)
        return PhaseSetup(web_search=True, upstream="pages", path_prefix="/page/", count=3)
    if phase == "tool_call":
        await model.configure(default_reply=hanging_fetch_reply(b))
        return PhaseSetup(tool_ids=["fetch_url"], upstream="pages", path_prefix="/hang")
    if phase == "generating":
        await model.configure(default_reply=LONG_STREAM)
        return PhaseSetup(upstream="model", path_prefix="/v1/chat/completions")
    if phase in MCP_PHASES:
        server = MCP_PHASES[phase]
        tool_id = f"mcp:{server}:slow"
        await model.configure(
            default_reply={"kind": "tool_calls", "calls": [[mcp_names[tool_id], MCP_SLOW_ARGS]]}
        )
        return PhaseSetup(tool_ids=[tool_id], mcp_server=server)
    raise ValueError(phase)


async def _mcp_tool_names(b: Bench, timeout: float = 30.0) -> dict[str, str]:
    """The function names the model is to call the MCP ``slow`` tools by, per tool id, from
    ``GET /api/tools`` (a server's tools are listed once its session is open)."""
    wanted = {f"mcp:{server}:slow" for server in MCP_PHASES.values()}
    names: dict[str, str] = {}
    with trio.move_on_after(timeout):
        while True:
            listing = await get_json("127.0.0.1", b.tether.port, "/api/tools")
            names = {
                str(t["id"]): str(t["name"])
                for t in listing.get("tools", [])
                if t.get("id") in wanted
            }
            if len(names) == len(wanted):
                break
            await trio.sleep(0.1)
    return names


@dataclass
class Sample:
    answer: float | None = None
    cancelled: float | None = None
    upstream: float | None = None
    ended_in: str = ""
    status: str = ""
    reason: str = ""
    stop_ms: float | None = None  # the server's own figure, from its task:cancelled
    # an MCP call: the server's records of notifications/cancelled and (HTTP) of the call's
    # response stream closed, after the stop; the tool's own cancel; what went wrong
    notified: float | None = None
    stream_closed: float | None = None
    stream_closed_by: str = ""
    tool_cancelled: float | None = None
    mcp_problem: str = ""


async def stop_one(
    b: Bench,
    phase: str,
    transport: str,
    setup: PhaseSetup,
    sub: WsClient,
    http: HttpConnection,
    chat_id: str,
) -> Sample:
    """One task held in ``phase`` as ``setup`` says (see ``configure_phase``), stopped by
    ``transport`` (``http``: ``POST /api/tasks/{id}/stop`` on ``http``; ``ws``: a ``stop`` on
    ``sub``); ``sub`` follows the task either way."""
    body = b.chat_body(
        b.marker("stop"), chat_id=chat_id, web_search=setup.web_search, tool_ids=setup.tool_ids
    )
    seen_before = 0
    if setup.upstream is not None:
        seen_before = len(await b.fake(setup.upstream).requests(setup.path_prefix))
    mcp_mark = b.mcp.mark() if b.mcp is not None else 0
    if transport == "http":
        answer = await http.request("POST", "/api/chat/completions", {**body, "background": True})
        task_id = str(answer.json()["task_id"])
        await sub.send({"type": "subscribe", "task_id": task_id, "after": 0})
    else:
        _, reply = await sub.request({"type": "chat", "request": body})
        task_id = str(reply["task_id"])
    conn_ids: list[int] = []
    fake: FakeControl | None = None
    if setup.upstream is not None:
        fake = b.fake(setup.upstream)
        wanted = seen_before + setup.count
        last = await fake.wait_request(setup.path_prefix, wanted, timeout=10)
        if last is None:
            raise RuntimeError(f"{phase}: the {setup.upstream} fake saw no request")
        mine = (await fake.requests(setup.path_prefix))[seen_before:]
        conn_ids = sorted({int(r["conn_id"]) for r in mine})
        if phase == "generating":
            await sub.wait_event(task_id, "delta", timeout=10)
    call: dict[str, Any] | None = None
    if setup.mcp_server is not None:
        assert b.mcp is not None
        call = await b.mcp.wait_for(
            "call", after=mcp_mark, timeout=10, server=setup.mcp_server, tool="slow"
        )
        if call is None:
            raise RuntimeError(f"{phase}: the MCP server {setup.mcp_server} saw no call")
    sample = Sample()
    if transport == "http":
        stop = await http.request("POST", f"/api/tasks/{task_id}/stop", {})
        t_stop = stop.sent_at
        sample.answer = stop.elapsed
    else:
        t_stop = await sub.send({"type": "stop", "task_id": task_id})
    terminal = await sub.wait_terminal(task_id, timeout=15)
    if terminal is not None:
        sample.cancelled = terminal.at - t_stop
        sample.status = terminal.type.removeprefix("task:")
        sample.ended_in = str(terminal.data.get("phase", ""))
        sample.reason = str(terminal.data.get("cancel_reason", ""))
        stop_ms = terminal.data.get("stop_ms")
        sample.stop_ms = float(stop_ms) if isinstance(stop_ms, int | float) else None
    if fake is not None:
        closed: list[float] = []
        for conn_id in conn_ids:
            record = await fake.wait_closed(conn_id, timeout=10)
            if record is not None and record.get("closed_at") is not None:
                closed.append(float(record["closed_at"]))
        if len(closed) == len(conn_ids):
            sample.upstream = max(closed) - t_stop
    if call is not None:
        await _mcp_cancel(b, setup, call, mcp_mark, t_stop, sample)
    await sub.send({"type": "unsubscribe", "task_id": task_id})
    return sample


async def _mcp_cancel(
    b: Bench, setup: PhaseSetup, call: dict[str, Any], mark: int, t_stop: float, sample: Sample
) -> None:
    """What the MCP server recorded of the stopped call: ``notifications/cancelled`` and,
    over HTTP, the call's response stream closed; ``upstream`` is the first of them."""
    assert b.mcp is not None and setup.mcp_server is not None
    match = {"server": setup.mcp_server, "request_id": call["request_id"]}
    notified = await b.mcp.wait_for("notification_cancelled", after=mark, timeout=10, **match)
    if notified is not None:
        sample.notified = float(notified["at"]) - t_stop
    seen = [sample.notified] if sample.notified is not None else []
    if setup.mcp_server == MCP_HTTP:
        closed = await b.mcp.wait_for("stream_closed", after=mark, timeout=10, **match)
        if closed is not None:
            sample.stream_closed = float(closed["at"]) - t_stop
            sample.stream_closed_by = str(closed.get("by", ""))
            seen.append(sample.stream_closed)
    cancelled = await b.mcp.wait_for("cancelled", after=mark, timeout=10, **match)
    if cancelled is not None:
        sample.tool_cancelled = float(cancelled["at"]) - t_stop
    if seen:
        sample.upstream = min(seen)
    problems = []
    if notified is None:
        problems.append("no notifications/cancelled within 10 s")
    if setup.mcp_server == MCP_HTTP and sample.stream_closed is None:
        problems.append("its response stream not closed within 10 s")
    if cancelled is None:
        problems.append("the tool not cancelled within 10 s")
    if [
        r
        for r in b.mcp.records[mark:]
        if r.get("event") == "finished" and all(r.get(k) == v for k, v in match.items())
    ]:
        problems.append("the tool finished")
    sample.mcp_problem = "; ".join(problems)


async def run(b: Bench) -> None:
    res = b.results
    if not b.ws_available:
        res.notes.append("stop_latency skipped: no WebSocket /ws to subscribe with")
        return
    rows: list[dict[str, Any]] = []
    pings: list[float] = []
    problems: list[str] = []
    chat_id = "bench-stop-" + b.marker("c")
    phases: list[str] = list(PHASES)
    mcp_names: dict[str, str] = {}
    if b.mcp is None:
        res.notes.append("stop_latency: no MCP rows (the bench started no MCP servers)")
    else:
        mcp_names = await _mcp_tool_names(b)
        for phase, server in MCP_PHASES.items():
            if f"mcp:{server}:slow" in mcp_names:
                phases.append(phase)
            else:
                problems.append(
                    f"{phase}: the server never listed mcp:{server}:slow "
                    f"(GET /readyz: {await _mcp_status(b)})"
                )
    http = b.conn()
    async with ws_client(b.ws_url) as sub:
        for phase in phases:
            setup = await configure_phase(b, phase, mcp_names)
            for transport in ("http", "ws"):
                samples: list[Sample] = []
                for _ in range(b.cfg.stop_samples):
                    pings.append(await sub.ping())
                    with trio.fail_after(40):
                        sample = await stop_one(b, phase, transport, setup, sub, http, chat_id)
                    samples.append(sample)
                    if sample.status != "cancelled" or sample.reason != "stop":
                        problems.append(
                            f"{phase}/{transport}: ended {sample.status} ({sample.reason})"
                        )
                    if setup.upstream and sample.upstream is None:
                        problems.append(
                            f"{phase}/{transport}: the {setup.upstream} "
                            "connection was not closed within 10 s"
                        )
                    if setup.mcp_server is not None:
                        if sample.ended_in != "tools":
                            problems.append(
                                f"{phase}/{transport}: ended in phase "
                                f"{sample.ended_in!r}, not tools"
                            )
                        if sample.mcp_problem:
                            problems.append(
                                f"{phase}/{transport}: MCP server "
                                f"{setup.mcp_server}: {sample.mcp_problem}"
                            )
                    # Keep the sub connection's replies clean: a stray reply would confuse
                    # the next chat.
                    sub.replies.clear()
                rows.append(_row(res, phase, transport, samples))
                b.progress.step(
                    f"{phase:<10} by {transport:<4}: cancelled p50 "
                    f"{rows[-1]['cancelled_p50']} ms, upstream closed p50 "
                    f"{rows[-1]['upstream_p50']} ms"
                )
    await http.aclose()
    await b.stop_chat(chat_id)
    ping = res.add_set(SCENARIO, "ws_ping", pings)
    for row in rows:
        row["cancelled_ratio_p50"] = ratio(row["cancelled_p50"], ping["p50"])
        row["upstream_ratio_p50"] = ratio(row["upstream_p50"], ping["p50"])
    res.figures[SCENARIO] = rows
    res.figures[SCENARIO + "_ping"] = ping
    res.check(
        "stop: every stopped task ended cancelled (reason stop), every upstream "
        "connection closed; every stopped MCP call ended in phase tools and was "
        "cancelled on its MCP server",
        not problems,
        "all samples" if not problems else f"{len(problems)} problems, e.g. {problems[0]}",
    )


def _row(res: Any, phase: str, transport: str, samples: list[Sample]) -> dict[str, Any]:
    key = f"{phase}/{transport}"
    row: dict[str, Any] = {
        "phase": phase,
        "transport": "HTTP" if transport == "http" else "WebSocket",
        "n": len(samples),
    }
    metrics = ["answer", "cancelled", "upstream"]
    if phase in MCP_PHASES:
        metrics += ["notified", "tool_cancelled"]
        if MCP_PHASES[phase] == MCP_HTTP:
            metrics.append("stream_closed")
            row["stream_closed_by"] = ", ".join(
                sorted({s.stream_closed_by for s in samples if s.stream_closed_by})
            )
    for metric in metrics:
        values = [getattr(s, metric) for s in samples if getattr(s, metric) is not None]
        if values:
            summary = res.add_set(SCENARIO, f"{key}/{metric}", values)
        else:
            summary = summarize([])
        row[f"{metric}_p50"] = summary["p50"]
        row[f"{metric}_p99"] = summary["p99"]
        row[f"{metric}_max"] = summary["max"]
    ended = sorted({s.ended_in for s in samples if s.ended_in})
    row["ended_in"] = ", ".join(ended)
    return row


async def _mcp_status(b: Bench) -> Any:
    try:
        return (await get_json("127.0.0.1", b.tether.port, "/readyz")).get("mcp")
    except Exception as exc:  # only for the message
        return f"{type(exc).__name__}: {exc}"
