"""Scenario 4: N concurrent background tasks streaming to N subscribed WebSocket clients.

Per level N: N WebSocket clients connect (one session each); each starts one background task
bound to its session (``POST`` with ``session_id``), and the fake model streams it
``scale_tokens`` tokens at ``scale_rate`` tokens/s. While they stream, a probe client sends
background POSTs (short answers) interleaved with the ``/healthz`` floor: that is the time to
task id under this load. Measured per level: probe and floor p50/p99, event lag (arrival at
the client minus the fake's send schedule for that token: request received + i / rate, so it
includes any lag of the fake itself), events lost or out of order (gaps or disorder in
``seq``, missing tokens, missing terminal event: must all be 0), server CPU (% of one core
over the level) and peak RSS (psutil on the server pid), and memory per active task: the
peak RSS above the server's RSS right after start-up, divided by N (each task with its own
WebSocket connection and session). Python keeps freed memory for reuse, so this is only
meaningful when scale runs first (it does in a full or quick run).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from bench.context import Bench
from bench.httpclient import HttpConnection
from bench.stats import ratio
from bench.wsclient import WsClient, ws_client

SCENARIO = "scale"
TOKEN = re.compile(r"tok(\d+) ")
TTID_LIMIT_MS = 50.0
STALL_S = 15.0  # no event at any client for this long after the streams' end: stop waiting


@dataclass
class Level:
    n: int
    clients: list[WsClient | None] = field(default_factory=list)
    task_ids: list[str] = field(default_factory=list)
    markers: list[str] = field(default_factory=list)
    spawn: list[float] = field(default_factory=list)
    probe: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    peak_rss_mb: float = 0.0


async def _connect_clients(b: Bench, level: Level, ready: trio.Event, done: trio.Event,
                           nursery: trio.Nursery) -> None:
    limiter = trio.CapacityLimiter(50)
    connected = 0

    async def one(i: int) -> None:
        nonlocal connected
        await limiter.acquire()  # limits connects in flight, not connections held
        held = True
        try:
            async with ws_client(b.ws_url, connect_timeout=30) as client:
                limiter.release()
                held = False
                level.clients[i] = client
                connected += 1
                if connected == level.n:
                    ready.set()
                await done.wait()
        finally:
            if held:
                limiter.release()

    level.clients = [None] * level.n
    for i in range(level.n):
        nursery.start_soon(one, i)


async def _spawn(b: Bench, level: Level, chat_id: str) -> None:
    limiter = trio.CapacityLimiter(b.cfg.scale_spawn_concurrency)
    level.task_ids = [""] * level.n
    level.markers = [b.marker("scale") for _ in range(level.n)]
    conns: list[HttpConnection] = []

    async def one(i: int) -> None:
        async with limiter:
            conn = conns.pop() if conns else b.conn()
            client = level.clients[i]
            assert client is not None
            body = b.chat_body(level.markers[i], chat_id=chat_id,
                               session_id=client.session_id)
            answer = await conn.request("POST", "/api/chat/completions", body)
            conns.append(conn)
            if answer.status == 202:
                level.task_ids[i] = str(answer.json()["task_id"])
                level.spawn.append(answer.elapsed)
            else:
                level.failures.append(f"spawn {answer.status}: {answer.body[:100]!r}")

    async with trio.open_nursery() as nursery:
        for i in range(level.n):
            nursery.start_soon(one, i)
    for conn in conns:
        await conn.aclose()


async def _probe(b: Bench, level: Level, stop: trio.Event, chat_id: str) -> None:
    conn = b.conn()
    try:
        while not stop.is_set():
            floor = await conn.request("GET", "/healthz")
            level.floor.append(floor.elapsed)
            body = b.chat_body("probe " + b.marker("p"), chat_id=chat_id, background=True)
            answer = await conn.request("POST", "/api/chat/completions", body)
            if answer.status == 202:
                level.probe.append(answer.elapsed)
            else:
                level.failures.append(f"probe {answer.status}")
            await trio.sleep(b.cfg.scale_probe_interval_s)
    finally:
        await conn.aclose()


async def _watch_rss(b: Bench, level: Level, stop: trio.Event) -> None:
    while not stop.is_set():
        level.peak_rss_mb = max(level.peak_rss_mb, b.server_rss_mb())
        with trio.move_on_after(0.1):
            await stop.wait()


def _analyze(level: Level, sent_schedule: dict[str, float], tokens: int, rate: float,
             server: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Per task, compare what its client got with what the server says it wrote.

    ``lost``: events missing below the highest ``seq`` the client got, plus tokens missing
    from a completed stream; ``undelivered``: the server wrote more events than reached a
    client whose connection is still open (late, not lost, when the wait ended);
    ``closed``: clients whose connection the server closed before the terminal event;
    ``not_completed``: tasks that did not end ``completed`` at the server; ``expired``:
    tasks the server had already forgotten (ended, then expired from retention) while their
    client, still connected, had not got their end (each counts as at least one lost event).
    """
    lost = out_of_order = undelivered = closed = not_completed = expired = 0
    close_reasons: dict[str, int] = {}
    lags: list[float] = []
    samples: list[str] = []
    for i, task_id in enumerate(level.task_ids):
        client = level.clients[i]
        if not task_id or client is None:
            not_completed += 1
            continue
        arrivals = client.events.get(task_id, [])
        seqs = [a.seq for a in arrivals]
        out_of_order += sum(1 for a, b_ in zip(seqs, seqs[1:], strict=False) if b_ <= a)
        highest = max(seqs, default=0)
        lost += highest - len(set(seqs))
        terminal = client.terminal(task_id)
        record = server.get(task_id, {})
        if terminal is None and not record and not client.closed:
            # The server no longer knows the task (it ended and expired from retention)
            # and the client never got its end: whatever was left is lost.
            expired += 1
            lost += 1
        elif record.get("status", "completed" if terminal else "") != "completed":
            not_completed += 1
            if len(samples) < 5:
                samples.append(f"{task_id}: {record.get('status')}/{record.get('phase')}, "
                               f"last_seq {record.get('last_seq')}, client got {highest}, "
                               f"{len(str(record.get('content', '')))} chars")
        if terminal is None:
            if client.closed:
                closed += 1
                close_reasons[client.close_reason] = close_reasons.get(
                    client.close_reason, 0) + 1
            else:
                undelivered += max(0, int(record.get("last_seq", highest)) - highest)
        start = sent_schedule.get(level.markers[i])
        seen_tokens: set[int] = set()
        for a in arrivals:
            if a.type != "delta":
                continue
            for match in TOKEN.finditer(str(a.data.get("content", ""))):
                index = int(match.group(1))
                seen_tokens.add(index)
                if start is not None:
                    lags.append(a.at - (start + index / rate))
        if terminal is not None and terminal.type == "task:completed":
            lost += tokens - len(seen_tokens & set(range(tokens)))
    return {"lost": lost, "out_of_order": out_of_order, "undelivered": undelivered,
            "closed": closed, "close_reasons": close_reasons,
            "not_completed": not_completed, "not_completed_sample": samples,
            "expired_before_delivery": expired, "lags": lags}


async def _wait_delivered(level: Level, stream_s: float) -> bool:
    """Wait for every task's terminal event; give up when no event has arrived at any
    client for ``STALL_S`` after the streams should have ended, or after a hard limit."""
    started = time.monotonic()
    hard_limit = stream_s + 120 + level.n / 10

    def pending() -> bool:
        for i, task_id in enumerate(level.task_ids):
            client = level.clients[i]
            if task_id and client is not None and not client.closed \
                    and client.terminal(task_id) is None:
                return True
        return False

    while pending():
        now = time.monotonic()
        last = max((c.last_event_at for c in level.clients if c is not None), default=0.0)
        if now - started > stream_s and now - max(last, started) > STALL_S:
            return False
        if now - started > hard_limit:
            return False
        await trio.sleep(0.25)
    return True


async def _server_records(b: Bench, level: Level) -> dict[str, dict[str, Any]]:
    """The server's record of every task whose client did not get its terminal event."""
    out: dict[str, dict[str, Any]] = {}
    conn = b.conn()
    try:
        for i, task_id in enumerate(level.task_ids):
            client = level.clients[i]
            if task_id and client is not None and client.terminal(task_id) is None:
                answer = await conn.request("GET", f"/api/tasks/{task_id}")
                if answer.status == 200:
                    out[task_id] = answer.json()
    finally:
        await conn.aclose()
    return out


async def _model_schedule(b: Bench) -> dict[str, float]:
    """When the fake model received each task's request (its token i is due i/rate later),
    keyed by the task's marker (the user message)."""
    out: dict[str, float] = {}
    for request in await b.fake("model").requests("/v1/chat/completions"):
        body = request.get("json_body") or {}
        for message in body.get("messages", []):
            content = message.get("content")
            if message.get("role") == "user" and isinstance(content, str):
                out[content] = float(request["received_at"])
    return out


async def _level(b: Bench, n: int) -> dict[str, Any]:
    res = b.results
    tokens, rate = b.cfg.scale_tokens, b.cfg.scale_rate
    await b.reset_fakes()
    await b.fake("model").configure(
        default_reply={"kind": "text", "tokens": tokens, "rate": rate},
        rules=[["probe", {"kind": "text", "chunks": ["ok"]}]])
    chat_id = f"bench-scale-{n}-" + b.marker("c")
    level = Level(n)
    ready, done, stop = trio.Event(), trio.Event(), trio.Event()
    async with trio.open_nursery() as clients_nursery:
        await _connect_clients(b, level, ready, done, clients_nursery)
        with trio.fail_after(120):
            await ready.wait()
        rss_before = b.server_rss_mb()
        level.peak_rss_mb = rss_before
        cpu0, t0 = b.cpu_by_process(), time.monotonic()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_watch_rss, b, level, stop)
            await _spawn(b, level, chat_id)
            nursery.start_soon(_probe, b, level, stop, chat_id)
            complete = await _wait_delivered(level, tokens / rate)
            stop.set()
        cpu1, wall = b.cpu_by_process(), time.monotonic() - t0
        cpu = {name: round(100 * (cpu1[name] - cpu0[name]) / wall, 1)
               for name in cpu1 if name in cpu0 and wall > 0}
        schedule = await _model_schedule(b)
        found = _analyze(level, schedule, tokens, rate, await _server_records(b, level))
        done.set()
    await b.stop_chat(chat_id)
    await b.wait_no_tasks(30)
    key = f"tasks={n}"
    probe = res.add_set(SCENARIO, f"{key}/time_to_task_id", level.probe)
    floor = res.add_set(SCENARIO, f"{key}/floor", level.floor)
    spawn = res.add_set(SCENARIO, f"{key}/spawn_time_to_task_id", level.spawn)
    lag = res.add_set(SCENARIO, f"{key}/event_lag", found["lags"])
    clean = (found["lost"] == 0 and found["out_of_order"] == 0 and found["undelivered"] == 0
             and found["closed"] == 0 and found["not_completed"] == 0)
    holds = (probe["p99"] is not None and probe["p99"] < TTID_LIMIT_MS and clean
             and not level.failures)
    for failure in level.failures[:5]:
        res.errors.append(f"scale {key}: {failure}")
    row = {
        "tasks": n, "ttid_p50": probe["p50"], "ttid_p99": probe["p99"],
        "floor_p50": floor["p50"], "floor_p99": floor["p99"],
        "ttid_ratio_p50": ratio(probe["p50"], floor["p50"]),
        "ttid_ratio_p99": ratio(probe["p99"], floor["p99"]),
        "spawn_p50": spawn["p50"], "spawn_p99": spawn["p99"],
        "lag_p50": lag["p50"], "lag_p99": lag["p99"], "lag_max": lag["max"],
        "lost": found["lost"], "out_of_order": found["out_of_order"],
        "undelivered": found["undelivered"], "closed_connections": found["closed"],
        "close_reasons": found["close_reasons"], "not_completed": found["not_completed"],
        "not_completed_sample": found["not_completed_sample"], "all_delivered": complete,
        "expired_before_delivery": found["expired_before_delivery"],
        "cpu_percent": cpu.get("tether", 0.0), "cpu_percent_by_process": cpu,
        "peak_rss_mb": round(level.peak_rss_mb, 1), "rss_before_mb": round(rss_before, 1),
        "kb_per_task": round((level.peak_rss_mb - b.rss_at_start_mb) * 1024 / n, 1),
        "duration_s": round(wall, 2), "holds": holds,
    }
    res.check(f"scale {n} tasks: no event lost or out of order, every event delivered, "
              "every task completed", clean,
              f"lost {found['lost']}, out of order {found['out_of_order']}, undelivered "
              f"{found['undelivered']}, connections closed by the server {found['closed']} "
              f"{found['close_reasons'] or ''}, tasks not completed {found['not_completed']}, "
              f"tasks expired before their end reached the client "
              f"{found['expired_before_delivery']}")
    return row


async def run(b: Bench) -> None:
    res = b.results
    if not b.ws_available:
        res.notes.append("scale skipped: no WebSocket /ws")
        return
    rows: list[dict[str, Any]] = []
    for n in b.cfg.scale_levels:
        row = await _level(b, n)
        rows.append(row)
        b.progress.step(
            f"{n:>5} tasks: task id p50/p99 {row['ttid_p50']}/{row['ttid_p99']} ms "
            f"(floor {row['floor_p50']}/{row['floor_p99']}), lag p99 {row['lag_p99']} ms, "
            f"lost {row['lost']}, RSS {row['peak_rss_mb']:.0f} MB, CPU % "
            f"{_cpu_text(row['cpu_percent_by_process'])}"
            f"{'' if row['holds'] else '  (does not hold)'}")
    held = [r["tasks"] for r in rows if r["holds"]]
    res.figures[SCENARIO] = {
        "tokens": b.cfg.scale_tokens, "rate": b.cfg.scale_rate, "levels": rows,
        "ttid_limit_ms": TTID_LIMIT_MS, "highest_level_held": max(held) if held else None,
    }




def _cpu_text(cpu: dict[str, float]) -> str:
    names = ("tether", "model", "bench")
    return " / ".join(f"{name} {cpu.get(name, 0):.0f}" for name in names)
