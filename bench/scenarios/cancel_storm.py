"""Scenario 5: many tasks cancelled at random points; afterwards nothing may be left behind.

Each task is cancelled after a random delay (0 to ``storm_max_delay_s``; 5% at once) in one of
four ways: HTTP stop of a background task, WebSocket stop of a task started with ``chat``,
an SSE client closing its socket, a sync client closing its socket. Most tasks search the web
(the search and page fakes answer after 0.3 s each), some call ``fetch_url`` on a page that
never answers, the rest go straight to generation; the model streams for 30 s, so every
task is still running when its cancel comes. Afterwards: ``GET /api/tasks`` must be empty;
once the server's pool has let its idle keep-alive connections expire (5 s, closed at its
next use, which one probe task provides), no connection opened before that probe may still
be open at any fake; and the server's RSS, once the ended tasks have expired from
retention, must be within 10% of where it started.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import psutil  # type: ignore[import-untyped]
import trio

from bench.context import Bench
from bench.httpclient import HttpConnection, HttpError
from bench.stats import ratio
from bench.wsclient import WsClient, ws_client

SCENARIO = "cancel_storm"
KINDS = (
    ("http_stop", 0.55),
    ("ws_stop", 0.20),
    ("sse_disconnect", 0.15),
    ("sync_disconnect", 0.10),
)
FEATURES = (("web_search", 0.70), ("tool", 0.15), ("plain", 0.15))
# 30 s of tokens: far longer than any cancel delay (the fake builds its token list up front,
# so a huge count would slow the fake itself down).
FOREVER: dict[str, Any] = {"kind": "text", "tokens": 600, "rate": 20}
KEEPALIVE_EXPIRY_S = 5.0  # httpx2's default: idle pool connections older than this are closed
WS_CLIENTS = 10
# Each of the WS_CLIENTS connections follows many streaming tasks at once: when the server
# falls behind, a task's end reaches its client after the backlog of its earlier events.
WS_TERMINAL_WAIT_S = 120.0


def _pick(rng: random.Random, table: tuple[tuple[str, float], ...]) -> str:
    x, acc = rng.random(), 0.0
    for name, weight in table:
        acc += weight
        if x < acc:
            return name
    return table[-1][0]


@dataclass
class Job:
    kind: str
    feature: str
    delay: float


@dataclass
class Tally:
    outcomes: Counter[str] = field(default_factory=Counter)
    phases: Counter[str] = field(default_factory=Counter)
    by_feature: Counter[str] = field(default_factory=Counter)
    ws_closed: Counter[str] = field(default_factory=Counter)
    stop_times: list[float] = field(default_factory=list)
    floor_times: list[float] = field(default_factory=list)
    ws_cancelled_times: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    peak_rss_mb: float = 0.0


def _jobs(b: Bench, count: int, seed: int) -> list[Job]:
    rng = random.Random(seed)
    jobs = []
    for _ in range(count):
        delay = 0.0 if rng.random() < 0.05 else rng.uniform(0, b.cfg.storm_max_delay_s)
        jobs.append(Job(_pick(rng, KINDS), _pick(rng, FEATURES), delay))
    return jobs


def _body(b: Bench, job: Job, chat_id: str) -> dict[str, Any]:
    text = ("stormtool " if job.feature == "tool" else "storm ") + b.marker("s")
    return b.chat_body(
        text,
        chat_id=chat_id,
        web_search=job.feature == "web_search",
        tool_ids=["fetch_url"] if job.feature == "tool" else None,
        stream=job.kind == "sse_disconnect",
    )


async def _http_stop(b: Bench, job: Job, conn: HttpConnection, chat_id: str, t: Tally) -> None:
    answer = await conn.request(
        "POST", "/api/chat/completions", {**_body(b, job, chat_id), "background": True}
    )
    if answer.status != 202:
        t.errors.append(f"spawn {answer.status}")
        return
    task_id = answer.json()["task_id"]
    await trio.sleep(job.delay)
    stop = await conn.request("POST", f"/api/tasks/{task_id}/stop", {})
    if stop.status != 200:
        t.errors.append(f"stop {stop.status}")
        return
    t.stop_times.append(stop.elapsed)
    task = stop.json()
    t.outcomes[f"{task['status']}/{task.get('cancel_reason')}"] += 1
    t.phases[str(task.get("phase"))] += 1
    t.by_feature[f"{job.feature}: {task.get('phase')}"] += 1


async def _ws_stop(b: Bench, job: Job, ws: WsClient, chat_id: str, t: Tally) -> None:
    _, reply = await ws.chat(_body(b, job, chat_id))
    if reply.get("type") != "task":
        t.errors.append(f"ws chat: {reply}")
        return
    task_id = str(reply["task_id"])
    await trio.sleep(job.delay)
    sent_at = await ws.send({"type": "stop", "task_id": task_id})
    terminal = await ws.wait_terminal(task_id, timeout=WS_TERMINAL_WAIT_S)
    if terminal is None:
        t.errors.append(
            "ws: no terminal event after the stop"
            + (
                f" (the server closed the connection: {ws.close_reason})"
                if ws.closed
                else f" in {WS_TERMINAL_WAIT_S:g} s, connection open"
            )
        )
        return
    t.ws_cancelled_times.append(terminal.at - sent_at)
    t.outcomes[f"{terminal.type.removeprefix('task:')}/{terminal.data.get('cancel_reason')}"] += 1
    t.phases[str(terminal.data.get("phase"))] += 1
    t.by_feature[f"{job.feature}: {terminal.data.get('phase')}"] += 1
    ws.events.pop(task_id, None)


async def _disconnect(b: Bench, job: Job, chat_id: str, t: Tally) -> None:
    conn = b.conn()

    async def client() -> None:
        try:
            await conn.open_stream("POST", "/api/chat/completions", _body(b, job, chat_id))
            async for _ in conn.body_chunks():
                pass
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError, HttpError):
            pass

    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        await trio.sleep(job.delay)
        conn.abort()
        nursery.cancel_scope.cancel()
    t.outcomes["disconnected (not read back)"] += 1


async def _storm(b: Bench, jobs: list[Job], chat_id: str, t: Tally) -> None:
    next_job = 0
    done = 0
    started = time.monotonic()

    async def worker(ws_clients: list[WsClient]) -> None:
        nonlocal next_job, done
        conn = b.conn()
        try:
            while next_job < len(jobs):
                job = jobs[next_job]
                open_ws = [c for c in ws_clients if not c.closed]
                ws = open_ws[next_job % len(open_ws)] if open_ws else None
                next_job += 1
                try:
                    with trio.fail_after(WS_TERMINAL_WAIT_S + 30):
                        if job.kind == "http_stop" or (job.kind == "ws_stop" and ws is None):
                            await _http_stop(b, job, conn, chat_id, t)
                        elif job.kind == "ws_stop" and ws is not None:
                            await _ws_stop(b, job, ws, chat_id, t)
                        else:
                            await _disconnect(b, job, chat_id, t)
                except Exception as exc:  # one odd failure is recorded, not fatal
                    t.errors.append(f"{job.kind}: {type(exc).__name__}: {exc!r}"[:300])
                    conn.abort()
                done += 1
                if done % max(1, len(jobs) // 5) == 0:
                    b.progress.step(
                        f"  {done}/{len(jobs)} tasks cancelled ({time.monotonic() - started:.0f} s)"
                    )
        finally:
            await conn.aclose()

    async def watch_rss(stop: trio.Event) -> None:
        while not stop.is_set():
            t.peak_rss_mb = max(t.peak_rss_mb, b.server_rss_mb())
            with trio.move_on_after(0.2):
                await stop.wait()

    async def floor_probe(stop: trio.Event) -> None:
        """``GET /healthz`` every 20 ms: the server's floor under the storm's load."""
        conn = b.conn()
        try:
            while not stop.is_set():
                t.floor_times.append((await conn.request("GET", "/healthz")).elapsed)
                with trio.move_on_after(0.02):
                    await stop.wait()
        finally:
            await conn.aclose()

    async def with_ws(clients: list[WsClient], count: int) -> None:
        if count > 0 and b.ws_available:
            async with ws_client(b.ws_url) as client:
                await with_ws([*clients, client], count - 1)
            return
        ws_all.extend(clients)
        stop = trio.Event()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_rss, stop)
            nursery.start_soon(floor_probe, stop)
            async with trio.open_nursery() as workers:
                for _ in range(b.cfg.storm_concurrency):
                    workers.start_soon(worker, clients)
            stop.set()

    ws_all: list[WsClient] = []
    await with_ws([], WS_CLIENTS)
    for client in ws_all:
        if client.closed:
            t.ws_closed[client.close_reason or "?"] += 1


async def run(b: Bench) -> None:
    res = b.results
    await b.reset_fakes()
    await b.fake("search").configure(delay=0.3)
    await b.fake("pages").configure(delay=0.3)
    hang = b.fake("pages").base_url + "/hang"
    await b.fake("model").configure(
        default_reply=FOREVER,
        rules=[
            ["stormtool", {"kind": "tool_calls", "calls": [["fetch_url", f'{{"url": "{hang}"}}']]}],
            ["probe", {"kind": "text", "chunks": ["ok"]}],
        ],
    )
    chat_id = "bench-storm-" + b.marker("c")
    retention = float(b.cfg.server_env.get("TETHER_TASK_RETENTION_S", "5"))
    settle_s = max(retention, KEEPALIVE_EXPIRY_S) + 3
    # A first storm only raises the allocator's high-water mark (a second one of any size
    # does not move it): warm up with a small storm of the same shape, so that the memory
    # check looks for what stays per task, not for the first use of the heap.
    rss_cold = b.server_rss_mb()
    warm = _jobs(b, max(2 * b.cfg.storm_concurrency, b.cfg.storm_tasks // 10), seed=5)
    b.progress.step(f"warm-up: {len(warm)} tasks; server RSS {rss_cold:.0f} MB")
    await _storm(b, warm, chat_id, Tally())
    await b.wait_no_tasks(60)
    await trio.sleep(settle_s)
    jobs = _jobs(b, b.cfg.storm_tasks, seed=4)
    rss_start = b.server_rss_mb()
    t = Tally(peak_rss_mb=rss_start)
    cpu0 = b.cpu_by_process()
    started = time.monotonic()
    b.progress.step(
        f"{len(jobs)} tasks, {b.cfg.storm_concurrency} at a time; server RSS {rss_start:.0f} MB"
    )
    await _storm(b, jobs, chat_id, t)
    storm_s = time.monotonic() - started
    cpu1 = b.cpu_by_process()
    cpu = {k: round(100 * (cpu1[k] - cpu0[k]) / storm_s, 1) for k in cpu1 if k in cpu0}
    drained = await b.wait_no_tasks(60)
    leftovers = [] if drained is not None else await b.running_tasks()
    if leftovers:
        # Clean up so that later runs are not disturbed, but report it.
        await b.stop_chat(chat_id)
    # Ended tasks stay readable for TETHER_TASK_RETENTION_S; wait for them to expire.
    b.progress.step(
        f"  storm done in {storm_s:.1f} s; registry empty after "
        f"{drained if drained is None else round(drained, 2)} s; waiting "
        f"{settle_s:g} s for retention and keep-alive expiry"
    )
    await trio.sleep(settle_s)
    conns = await _leftover_connections(b)
    rss_end = b.server_rss_mb()
    stop_summary = res.add_set(SCENARIO, "http_stop_answer", t.stop_times)
    floor_summary = res.add_set(SCENARIO, "floor_during_storm", t.floor_times)
    ws_summary = res.add_set(SCENARIO, "ws_stop_to_task_cancelled", t.ws_cancelled_times)
    res.figures[SCENARIO] = {
        "tasks": len(jobs),
        "concurrency": b.cfg.storm_concurrency,
        "duration_s": round(storm_s, 2),
        "kinds": dict(Counter(j.kind for j in jobs)),
        "features": dict(Counter(j.feature for j in jobs)),
        "outcomes": dict(t.outcomes),
        "phases": dict(t.phases),
        "phases_by_feature": dict(t.by_feature),
        "stop_p50": stop_summary["p50"],
        "stop_p99": stop_summary["p99"],
        "floor_p50": floor_summary["p50"],
        "floor_p99": floor_summary["p99"],
        "ws_cancelled_p50": ws_summary["p50"],
        "ws_cancelled_p99": ws_summary["p99"],
        "ws_cancelled_max": ws_summary["max"],
        "stop_ratio_p50": ratio(stop_summary["p50"], floor_summary["p50"]),
        "stop_ratio_p99": ratio(stop_summary["p99"], floor_summary["p99"]),
        "drained_s": None if drained is None else round(drained, 2),
        "left_running": len(leftovers),
        "open_connections": conns["idle"],
        "leaked_connections": conns["left"],
        "cpu_percent_by_process": cpu,
        "warmup_tasks": len(warm),
        "ws_connections_closed_by_server": dict(t.ws_closed),
        "rss_cold_mb": round(rss_cold, 1),
        "rss_start_mb": round(rss_start, 1),
        "rss_peak_mb": round(t.peak_rss_mb, 1),
        "rss_end_mb": round(rss_end, 1),
        "errors": len(t.errors),
    }
    for error in t.errors[:5]:
        res.errors.append(f"{SCENARIO}: {error}")
    if len(t.errors) > 5:
        res.errors.append(f"{SCENARIO}: ... {len(t.errors) - 5} more errors")
    not_cancelled = {
        k: v for k, v in t.outcomes.items() if not k.startswith(("cancelled/", "disconnected"))
    }
    res.check(
        "cancel storm: every task ended cancelled",
        not not_cancelled,
        f"{sum(t.outcomes.values())} read back"
        if not not_cancelled
        else f"other outcomes: {not_cancelled}",
    )
    res.check(
        "cancel storm: no task left in the registry",
        drained is not None,
        f"GET /api/tasks empty {drained:.2f} s after the last cancel"
        if drained is not None
        else f"{len(leftovers)} tasks still listed after 60 s",
    )
    res.check(
        "cancel storm: no connection left open at any fake",
        not any(conns["left"].values()),
        f"still open after the pool's keep-alive expiry: {conns['left']} (idle pool "
        f"connections before it: {conns['idle']})",
    )
    res.check(
        "cancel storm: server RSS back within 10% of the start",
        rss_end <= rss_start * 1.10,
        f"start {rss_start:.1f} MB (after a {len(warm)}-task warm-up storm; "
        f"{rss_cold:.1f} MB before it), peak {t.peak_rss_mb:.1f} MB, end {rss_end:.1f} MB",
    )


# Probe tasks at most after the storm: enough to pass through each of the server's pools.
_FLUSH_PROBES = 40


async def _leftover_connections(b: Bench) -> dict[str, dict[str, int]]:
    """Connections still open at the fakes: ``idle`` now (the server's pools keep idle
    keep-alive connections), and ``left`` once more tasks have made the pools close every
    connection idle longer than its keep-alive expiry (httpcore closes expired connections
    when a request passes through their pool; the server's client closes those of its other
    pools then, ``server/providers/net/client.py``). Probe tasks run, one after another,
    until none is left or ``_FLUSH_PROBES`` have run (one has sufficed). A connection opened
    before the first probe and still open then is one the server never closed.
    Connections of the payload-first baseline's own pool (found by their client port)
    are not counted."""
    owners = _socket_owners(b)
    idle = {
        f.name: sum(
            1 for c in await f.open_connections() if owners.get(_peer_port(c)) != "payload_first"
        )
        for f in b.fakes
    }
    flush_at = time.monotonic()
    left: dict[str, int] = {}
    details: list[str] = []
    probes = 0
    while probes < _FLUSH_PROBES:
        await _probe_task(b)
        probes += 1
        left, details = {}, []
        owners.update(_socket_owners(b))
        for fake in b.fakes:
            records = [c for c in await fake.open_connections() if float(c["opened_at"]) < flush_at]
            records = [c for c in records if owners.get(_peer_port(c)) != "payload_first"]
            left[fake.name] = len(records)
            details += [
                f"{fake.name} #{c['id']} opened {flush_at - float(c['opened_at']):.1f} "
                f"s before, {len(c['paths'])} requests, last {c['paths'][-1:]}, client "
                f"{owners.get(_peer_port(c), 'unknown')}"
                for c in records[:5]
            ]
        if not any(left.values()):
            break
    b.results.figures[SCENARIO + "_left_connections"] = details
    b.results.figures[SCENARIO + "_flush_probes"] = probes
    return {"idle": idle, "left": left}


async def _probe_task(b: Bench) -> None:
    """One background web-search task, waited for until it ends."""
    conn = b.conn()
    try:
        body = b.chat_body(
            "probe " + b.marker("p"), chat_id="bench-storm-probe", web_search=True, background=True
        )
        answer = await conn.request("POST", "/api/chat/completions", body)
        task_id = answer.json()["task_id"]
        for _ in range(200):  # at most ~10 s
            task = (await conn.request("GET", f"/api/tasks/{task_id}")).json()
            if task["status"] not in ("queued", "running"):
                break
            await trio.sleep(0.05)
    finally:
        await conn.aclose()


def _peer_port(record: dict[str, Any]) -> int:
    try:
        return int(str(record.get("peer", "")).rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return 0


def _socket_owners(b: Bench) -> dict[int, str]:
    """Local port -> which of the bench's processes holds that client socket (the
    payload-first baseline has its own pool of connections to the same fakes)."""
    names = {p.pid: p.name for p in b.procs.procs}
    owners: dict[int, str] = {}
    for pid, name in names.items():
        try:
            for conn in psutil.Process(pid).net_connections(kind="tcp"):
                if conn.laddr:
                    owners[int(conn.laddr.port)] = name
        except psutil.Error:
            continue
    return owners
