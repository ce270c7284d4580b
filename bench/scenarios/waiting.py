"""Scenario 6: thousands of tasks waiting on a slow web search beside a few streams.

``waiting_tasks`` clients (quick and full: 2,000), each with its own WebSocket connection
(spread over the client worker processes), each start one task with web search on while
the fake search engine takes ``waiting_search_delay_s`` (30 s) to answer; beside them
``waiting_streams`` (50) other clients stream ``scale_tokens`` tokens at ``scale_rate``
tokens/s. The waiting tasks' chats go out at once (a burst); once every one of their search
requests has reached the fake, the streams start, and a probe client measures the time to
task id (background POSTs, interleaved with the ``/healthz`` floor) while the streams run
beside the waiting tasks. Measured: that time to task id, each chat's own ``chat`` to
``task`` time (the burst); the server's memory per waiting task (RSS once every
search request has reached the fake, minus RSS before the clients connected, divided by the
number of waiting tasks: a task, its session, its WebSocket connection and its pending search
request); the streams' event lag and losses. The server is restarted first, so that this RSS growth
is not absorbed by the heap scale left behind. Then one ``POST /api/chats/{id}/stop`` stops all
the waiting tasks: every client must get its ``task:cancelled``, ``GET /api/tasks`` must be
empty and the fake search engine must see every one of its connections closed.
"""

from __future__ import annotations

import time
from typing import Any

import trio

from bench.context import Bench
from bench.scenarios.scale import (
    STALL_S,
    Probe,
    cpu_percent,
    merge,
    model_schedule,
    probe_loop,
    watch_rss,
    workers_for,
)
from bench.stats import ratio, summarize
from bench.workers import WorkerPool, split

SCENARIO = "waiting"
TTID_LIMIT_MS = 50.0


async def _open_search_connections(b: Bench, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while True:
        left = len(await b.fake("search").open_connections())
        if left == 0 or time.monotonic() > deadline:
            return left
        await trio.sleep(0.1)


async def run(b: Bench) -> None:
    res = b.results
    if not b.ws_available:
        res.notes.append("waiting skipped: no WebSocket /ws")
        return
    cfg = b.cfg
    waiting, streams = cfg.waiting_tasks, cfg.waiting_streams
    total = waiting + streams
    # A fresh server: after scale, the heap's high-water mark would absorb the waiting
    # tasks' memory (Python reuses freed memory), hiding it from RSS.
    await b.restart_server()
    pool = WorkerPool(b.procs, workers_for(total, cfg.scale_max_workers))
    await pool.start()
    try:
        row = await _run(b, pool, waiting, streams)
    finally:
        await pool.stop()
    res.figures[SCENARIO] = row
    b.progress.step(
        f"{waiting} waiting + {streams} streaming: task id p50/p99 {row['ttid_p50']}/"
        f"{row['ttid_p99']} ms (floor {row['floor_p50']}/{row['floor_p99']}), chat to task "
        f"p99 {row['chat_p99']} ms, {row['kb_per_waiting_task']} KB per waiting task, stop "
        f"{row['stop_ms']} ms, left: tasks {row['tasks_left']}, search connections "
        f"{row['search_connections_left']}"
    )


async def _run(b: Bench, pool: WorkerPool, waiting: int, streams: int) -> dict[str, Any]:
    res, cfg = b.results, b.cfg
    tokens, rate = cfg.scale_tokens, cfg.scale_rate
    await b.reset_fakes()
    await b.fake("search").configure(delay=cfg.waiting_search_delay_s)
    await b.fake("model").configure(
        default_reply={"kind": "text", "tokens": tokens, "rate": rate},
        rules=[["probe", {"kind": "text", "chunks": ["ok"]}]],
    )
    wait_chat = "bench-waiting-" + b.marker("c")
    stream_chat = "bench-waiting-streams-" + b.marker("c")
    used = pool.count
    wait_counts, stream_counts = split(waiting, used), split(streams, used)
    rss_before = b.server_rss_mb()
    connect = await pool.each(
        [
            {
                "cmd": "connect",
                "host": "127.0.0.1",
                "port": b.tether.port,
                "path": "/ws?batch=1",
                "n": w + s,
                "mode": "tether",
                "concurrency": 100,
            }
            for w, s in zip(wait_counts, stream_counts, strict=True)
        ]
    )
    refused = sum(int(a.get("failed", 0)) for a in connect)
    for a in connect:
        res.errors += [f"waiting: connect: {f}" for f in a.get("failures", [])[:2]]
    probe = Probe(peak_rss_mb=b.server_rss_mb())
    wait_cmds: list[dict[str, Any] | None] = []
    stream_cmds: list[dict[str, Any] | None] = []
    for w, s in zip(wait_counts, stream_counts, strict=True):
        wait_cmds.append(
            {
                "cmd": "chat",
                "bodies": [
                    b.chat_body(b.marker("wait"), chat_id=wait_chat, web_search=True)
                    for _ in range(w)
                ],
            }
        )
        stream_cmds.append(
            {
                "cmd": "chat",
                "bodies": [b.chat_body(b.marker("ws"), chat_id=stream_chat) for _ in range(s)],
            }
        )
    duration = tokens / rate
    t0 = time.monotonic()
    await pool.each(wait_cmds)  # a burst: every waiting task's chat at once
    arrived = await b.fake("search").wait_request("/search", waiting, timeout=60)
    all_waiting_s = time.monotonic() - t0
    rss_waiting = b.server_rss_mb()
    running = len(await b.running_tasks())
    stop = trio.Event()
    cpu0, t1 = b.cpu_by_process(), time.monotonic()
    await pool.each(stream_cmds)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_rss, b, probe, stop, None)
        await probe_loop(b, probe, t1 + max(duration, 2.0), stream_chat, cfg.scale_probe_interval_s)
        stop.set()
    cpu1, wall = b.cpu_by_process(), time.monotonic() - t1
    stop_s, stopped = await b.stop_chat(wait_chat)
    waited = await pool.all(
        {
            "cmd": "wait",
            "stall_s": STALL_S,
            "hard_s": 0.0,
            "started_at": time.monotonic(),
            "deadline_s": 120,
        }
    )
    schedule = await model_schedule(b)
    found = merge(
        await pool.all(
            {
                "cmd": "analyze",
                "schedule": schedule,
                "rate": rate,
                "tokens": tokens,
                "window": [0.0, 0.0],
                "records": {},
            }
        )
    )
    drained = await b.wait_no_tasks(30)
    tasks_left = len(await b.running_tasks())
    search_left = await _open_search_connections(b, 10.0)
    await pool.all({"cmd": "close"})
    await b.reset_fakes()
    probe_s = res.add_set(SCENARIO, "time_to_task_id", probe.probe)
    floor_s = res.add_set(SCENARIO, "floor", probe.floor)
    chat = summarize([t / 1000 for t in found.get("ttid", [])])
    res.sets.setdefault(SCENARIO, {})["ws_chat_to_task"] = chat
    lag = summarize([x / 1000 for x in found.get("lags", [])])
    res.sets[SCENARIO]["stream_event_lag"] = lag
    terminals: dict[str, int] = found.get("terminals", {})
    row: dict[str, Any] = {
        "waiting_tasks": waiting,
        "streams": streams,
        "search_delay_s": cfg.waiting_search_delay_s,
        "workers": used,
        "ttid_p50": probe_s["p50"],
        "ttid_p99": probe_s["p99"],
        "floor_p50": floor_s["p50"],
        "floor_p99": floor_s["p99"],
        "ttid_ratio_p50": ratio(probe_s["p50"], floor_s["p50"]),
        "ttid_ratio_p99": ratio(probe_s["p99"], floor_s["p99"]),
        "chat_p50": chat["p50"],
        "chat_p99": chat["p99"],
        "chat_n": chat["n"],
        "all_waiting_s": round(all_waiting_s, 2) if arrived else None,
        "running_while_waiting": running,
        "rss_before_mb": round(rss_before, 1),
        "rss_waiting_mb": round(rss_waiting, 1),
        "peak_rss_mb": round(probe.peak_rss_mb, 1),
        "kb_per_waiting_task": round((rss_waiting - rss_before) * 1024 / waiting, 1),
        "stream_lag_p50": lag["p50"],
        "stream_lag_p99": lag["p99"],
        "lost": found.get("lost", 0),
        "out_of_order": found.get("out_of_order", 0),
        "closed_connections": found.get("closed", 0) + refused,
        "terminals": terminals,
        "stop_ms": round(stop_s * 1000, 1),
        "stopped": stopped,
        "all_ended": all(w.get("complete") for w in waited),
        "drained_s": round(drained, 2) if drained is not None else None,
        "tasks_left": tasks_left,
        "search_connections_left": search_left,
        "cpu_percent_by_process": cpu_percent(cpu0, cpu1, wall),
        "duration_s": round(time.monotonic() - t0, 2),
    }
    cancelled_ok = terminals.get("task:cancelled", 0) == waiting
    res.check(
        f"waiting: all {waiting} waiting tasks reached the search and were running",
        bool(arrived) and running >= waiting,
        f"search requests arrived: {bool(arrived)}, tasks running {running}",
    )
    res.check(
        f"waiting: one chat stop ended all {waiting} waiting tasks, every client got "
        "its task:cancelled, nothing left behind",
        cancelled_ok
        and stopped == waiting
        and tasks_left == 0
        and search_left == 0
        and row["all_ended"],
        f"stopped {stopped}, client terminals {terminals}, tasks left {tasks_left}, "
        f"search connections left open {search_left}",
    )
    res.check(
        f"waiting: the {streams} streams beside them lost nothing",
        row["lost"] == 0
        and row["out_of_order"] == 0
        and row["closed_connections"] == 0
        and terminals.get("task:completed", 0) == streams,
        f"lost {row['lost']}, out of order {row['out_of_order']}, connections closed "
        f"or refused {row['closed_connections']}, completed "
        f"{terminals.get('task:completed', 0)}",
    )
    return row
