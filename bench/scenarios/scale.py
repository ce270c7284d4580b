"""Scenario 4: many concurrent streams, each to its own WebSocket client; CPU per token.

Per level (N tasks at R tokens/s, T tokens each): N WebSocket clients connect, spread over
the client worker processes (``bench/wsworker.py``), one session each; each sends one
``chat`` (a background task bound to its session) and the fake model streams it T tokens at
R tokens/s. Tether's clients connect with ``?batch=1`` (what the browser client does), except
on the unbatched levels. The same streams are also run against the relay floor
(``baselines/relay_floor.py``), which relays each model chunk as one WebSocket frame.

Each level is timed from the moment the chats are sent (t0; the streams last D = T / R).
The burst of N chats is the ramp: it ends at t1, when every client has its first token
(``ramp_s`` = t1 - t0; admitting N tasks and opening N model requests at once is its own
load, not the steady state of N streams). Then:

- first half of what remains (t1 to h = t1 + (t0 + D - t1) / 2): a probe client sends
  background POSTs (short answers) interleaved with the ``/healthz`` floor: the time to
  task id while N tasks stream;
- CPU window (h to t0 + 0.9 D, at least 0.5 s), with the probe stopped: CPU % of
  every process over the window (who ran out of CPU), and the server's CPU over the window
  per token that reached a client in it (``us_per_token_window``: steady state, but
  meaningless once the server lags by more than the window);
- then every client waits for its task's end (the bench stops waiting when no event has
  arrived for ``STALL_S`` after D).

CPU per delivered token (``us_per_token``, the headline): the server's CPU seconds (user +
system, from /proc via psutil) from t0 until every client has its end, divided by the model
tokens delivered to the clients. A delivered token is one model chunk (``tok<i> ``) that
reached a client, whether alone or merged with others into one ``delta`` event or one
``events`` batch (Tether merges under load; the relay floor never does). Tether's figure
includes its share of the probe requests of the first half.

Measured per level: probe and floor p50/p99, event lag (arrival at the client minus the
fake's schedule for that token: request received + i / R, so it includes any lag of the fake
itself), events lost or out of order (gaps or disorder in ``seq``, missing tokens, missing
terminal event), CPU % of every process over the level and over the CPU window, server peak
RSS and memory per task (peak RSS above the server's RSS right after start-up, divided by
N; and the marginal figure, see ``_memory``). A level holds when: time to task id p99 < 50
ms and at most 2x the floor p99 of the same level, event lag p99 < 100 ms, nothing lost,
out of order, undelivered or closed, and at most 64 KB of server memory per added task
(judged from 100 tasks up).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import trio

from bench.context import Bench
from bench.procs import Proc
from bench.stats import ratio, summarize
from bench.workers import WorkerPool, split

SCENARIO = "scale"
TTID_LIMIT_MS = 50.0
TTID_FLOOR_RATIO = 2.0
LAG_LIMIT_MS = 100.0
KB_PER_TASK_LIMIT = 64.0
# Memory is judged from this many tasks up: below it the added tasks' memory (a few MB at
# most) is lost in the heap's one-off growth (the first use of caches, buffers, pools).
KB_JUDGED_FROM_TASKS = 100
STALL_S = 15.0  # no event at any client for this long after the streams' end: stop waiting
CLIENTS_PER_WORKER = 150  # more clients than this per worker process: use another worker


@dataclass
class Spec:
    n: int
    rate: float
    tokens: int
    target: str = "tether"  # or "floor" (the relay floor)
    batch: bool = True

    @property
    def label(self) -> str:
        where = (
            "floor" if self.target == "floor" else "tether" + ("" if self.batch else " unbatched")
        )
        return f"{where} {self.n}x{self.rate:g}/s"


@dataclass
class Target:
    """A Tether server of another scenario's own to run levels against (the replicas
    scenario starts several): its process (a ``--workers`` supervisor stands for its
    workers too), the scenario its result sets and checks go under, and its RSS right after
    start-up (for the memory per task)."""

    proc: Proc
    scenario: str
    rss_at_start_mb: float


@dataclass
class Probe:
    probe: list[float] = field(default_factory=list)
    floor: list[float] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    peak_rss_mb: float = 0.0


async def probe_loop(
    b: Bench, probe: Probe, until: float, chat_id: str, interval: float, port: int | None = None
) -> None:
    """Background POSTs interleaved with ``/healthz`` until ``until`` (monotonic), to the
    bench's Tether server or to the one on ``port``."""
    conn = b.conn(port)
    try:
        while time.monotonic() < until:
            floor = await conn.request("GET", "/healthz")
            probe.floor.append(floor.elapsed)
            body = b.chat_body("probe " + b.marker("p"), chat_id=chat_id, background=True)
            answer = await conn.request("POST", "/api/chat/completions", body)
            if answer.status == 202:
                probe.probe.append(answer.elapsed)
            else:
                probe.failures.append(f"probe {answer.status}")
            await trio.sleep(interval)
    finally:
        await conn.aclose()


async def watch_rss(b: Bench, probe: Probe, stop: trio.Event, proc: Proc | None = None) -> None:
    """The peak RSS of the bench's Tether server (or of ``proc``, with its workers)."""
    while not stop.is_set():
        rss = b.rss_mb() if proc is None else b.proc_rss_mb(proc)
        probe.peak_rss_mb = max(probe.peak_rss_mb, rss)
        with trio.move_on_after(0.1):
            await stop.wait()


async def model_schedule(b: Bench) -> dict[str, float]:
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


async def server_records(
    b: Bench, task_ids: list[str], port: int | None = None
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    conn = b.conn(port)
    try:
        for task_id in task_ids:
            answer = await conn.request("GET", f"/api/tasks/{task_id}")
            if answer.status == 200:
                out[task_id] = answer.json()
    finally:
        await conn.aclose()
    return out


def workers_for(n: int, available: int) -> int:
    return max(1, min(available, math.ceil(n / CLIENTS_PER_WORKER)))


def cpu_percent(before: dict[str, float], after: dict[str, float], wall: float) -> dict[str, float]:
    return {
        name: round(100 * (after[name] - before[name]) / wall, 1)
        for name in after
        if name in before and wall > 0
    }


def process_cpu(cpu: dict[str, float], name: str) -> float:
    """One process's figure in a ``cpu_by_process`` reading (or ``cpu_percent`` of two),
    with its forked workers' (``<name>/1``, ...)."""
    return sum(v for k, v in cpu.items() if k == name or k.startswith(name + "/"))


def merge(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Sum the workers' analyses (counts add up, lists concatenate, dicts merge)."""
    out: dict[str, Any] = {}
    for answer in answers:
        for key, value in answer.items():
            if isinstance(value, list):
                out.setdefault(key, []).extend(value)
            elif isinstance(value, dict):
                merged = out.setdefault(key, {})
                for k, v in value.items():
                    merged[k] = merged.get(k, 0) + v
            else:
                out[key] = out.get(key, 0) + value
    return out


async def run_level(
    b: Bench, pool: WorkerPool, spec: Spec, target: Target | None = None
) -> dict[str, Any]:
    """One level against the bench's Tether server or relay floor (``spec.target``), or
    against ``target``, another Tether server."""
    res = b.results
    tether = spec.target == "tether"
    proc = target.proc if target else b.tether if tether else b.floor
    scenario = target.scenario if target else SCENARIO
    label = f"{proc.name} {spec.n}x{spec.rate:g}/s" if target else spec.label
    port = proc.port if target else None
    server_name = proc.name
    await b.reset_fakes()
    await b.fake("model").configure(
        default_reply={"kind": "text", "tokens": spec.tokens, "rate": spec.rate},
        rules=[["probe", {"kind": "text", "chunks": ["ok"]}]],
    )
    chat_id = f"bench-scale-{spec.n}-" + b.marker("c")
    used = workers_for(spec.n, pool.count)
    counts = split(spec.n, used)
    path = "/ws?batch=1" if tether and spec.batch else "/ws"
    connect = await pool.each(
        [
            {
                "cmd": "connect",
                "host": "127.0.0.1",
                "port": proc.port,
                "path": path,
                "n": c,
                "mode": spec.target,
            }
            for c in counts
        ]
    )
    failed = sum(int(a.get("failed", 0)) for a in connect)
    probe = Probe()
    for a in connect:
        probe.failures += [f"connect: {f}" for f in a.get("failures", [])]
    rss_before = b.proc_rss_mb(proc)
    probe.peak_rss_mb = rss_before
    duration = spec.tokens / spec.rate
    cmds: list[dict[str, Any] | None] = []
    for c in counts:
        cmds.append(
            {
                "cmd": "chat",
                "bodies": [b.chat_body(b.marker("scale"), chat_id=chat_id) for _ in range(c)],
            }
        )
    stop = trio.Event()
    cpu0, t0 = b.cpu_by_process(), time.monotonic()
    window: list[float] = []
    busy_a = busy_b = 0.0
    cpu_a: dict[str, float] = {}
    cpu_b: dict[str, float] = {}
    waited: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(watch_rss, b, probe, stop, proc)
        await pool.each(cmds)
        # The level is measured once every task streams: the burst of chats that starts
        # them (N tasks admitted, N model requests opened at once) is the ramp, reported
        # as its own figure, not the steady state the level holds.
        reached = await pool.all({"cmd": "streaming", "deadline_s": duration}, used)
        ats = [a.get("at") for a in reached]
        t_streaming = max(ats) if None not in ats and ats else time.monotonic()
        ramp_s = t_streaming - t0 if None not in ats else None
        half = (
            max(t_streaming, t0 + duration / 2)
            if ramp_s is None
            else (t_streaming + max(0.5, (t0 + duration - t_streaming) / 2))
        )
        if tether:
            nursery.start_soon(
                probe_loop, b, probe, half, chat_id, b.cfg.scale_probe_interval_s, port
            )
        await trio.sleep_until(_trio_at(half))
        cpu_a, busy_a, ta = b.cpu_by_process(), b.machine_busy_s(), time.monotonic()
        await trio.sleep(max(0.5, t0 + 0.9 * duration - ta))
        cpu_b, busy_b, tb = b.cpu_by_process(), b.machine_busy_s(), time.monotonic()
        window = [ta, tb]
        waited = await pool.all(
            {
                "cmd": "wait",
                "stall_s": STALL_S,
                "hard_s": duration,
                "started_at": t0,
                "deadline_s": duration + 120 + spec.n / 10,
            },
            used,
        )
        stop.set()
    cpu1, wall = b.cpu_by_process(), time.monotonic() - t0
    complete = all(w.get("complete") for w in waited)
    pending = [t for w in waited for t in w.get("pending", [])]
    records = await server_records(b, pending, port) if tether else {}
    schedule = await model_schedule(b)
    found = merge(
        await pool.all(
            {
                "cmd": "analyze",
                "schedule": schedule,
                "rate": spec.rate,
                "tokens": spec.tokens,
                "window": window,
                "records": records,
            },
            used,
        )
    )
    await pool.all({"cmd": "close"}, used)
    if tether:
        await b.stop_chat(chat_id, port)
        await b.wait_no_tasks(30, port)
    key = (
        f"{proc.name if target else spec.target}"
        f"{'' if spec.batch or not tether else '-unbatched'}/"
        f"tasks={spec.n}/rate={spec.rate:g}"
    )
    probe_s = res.add_set(scenario, f"{key}/time_to_task_id", probe.probe)
    floor_s = res.add_set(scenario, f"{key}/floor", probe.floor)
    spawn = summarize([t / 1000 for t in found.get("ttid", [])])
    res.sets.setdefault(scenario, {})[f"{key}/spawn_ws_chat_to_task"] = spawn
    lag = summarize([x / 1000 for x in found.get("lags", [])])
    res.sets[scenario][f"{key}/event_lag"] = lag
    in_window = int(found.get("tokens_in_window", 0))
    server_cpu_s = process_cpu(cpu_b, server_name) - process_cpu(cpu_a, server_name)
    us_per_token = round(server_cpu_s / in_window * 1e6, 1) if in_window else None
    level_tokens = int(found.get("tokens_delivered", 0))
    level_cpu_s = process_cpu(cpu1, server_name) - process_cpu(cpu0, server_name)
    clean = (
        found.get("lost", 0) == 0
        and found.get("out_of_order", 0) == 0
        and found.get("undelivered", 0) == 0
        and found.get("closed", 0) == 0
        and found.get("not_completed", 0) == 0
        and failed == 0
    )
    at_start = target.rss_at_start_mb if target else b.rss_at_start_mb
    kb_per_task = round(
        (probe.peak_rss_mb - (at_start if tether else rss_before)) * 1024 / spec.n, 1
    )
    row: dict[str, Any] = {
        "tasks": spec.n,
        "rate": spec.rate,
        "tokens": spec.tokens,
        "target": spec.target,
        "batch": spec.batch if tether else None,
        "workers": used,
        "ttid_p50": probe_s["p50"],
        "ttid_p99": probe_s["p99"],
        "floor_p50": floor_s["p50"],
        "floor_p99": floor_s["p99"],
        "ttid_ratio_p50": ratio(probe_s["p50"], floor_s["p50"]),
        "ttid_ratio_p99": ratio(probe_s["p99"], floor_s["p99"]),
        "spawn_p50": spawn["p50"],
        "spawn_p99": spawn["p99"],
        "lag_p50": lag["p50"],
        "lag_p99": lag["p99"],
        "lag_max": lag["max"],
        "lost": found.get("lost", 0),
        "out_of_order": found.get("out_of_order", 0),
        "undelivered": found.get("undelivered", 0),
        "closed_connections": found.get("closed", 0) + failed,
        "close_reasons": found.get("close_reasons", {}),
        "not_completed": found.get("not_completed", 0),
        "not_completed_sample": found.get("not_completed_sample", [])[:5],
        "expired_before_delivery": found.get("expired_before_delivery", 0),
        "all_delivered": complete,
        "messages": found.get("messages", 0),
        "tokens_delivered": level_tokens,
        "tokens_in_window": in_window,
        "window_s": round(window[1] - window[0], 2) if window else None,
        "us_per_token": round(level_cpu_s / level_tokens * 1e6, 1) if level_tokens else None,
        "us_per_token_window": us_per_token,
        "cpu_percent": process_cpu(cpu_percent(cpu0, cpu1, wall), server_name),
        "cpu_percent_by_process": cpu_percent(cpu0, cpu1, wall),
        "cpu_percent_window": cpu_percent(cpu_a, cpu_b, window[1] - window[0]) if window else {},
        # the whole machine's over the window: more than the sum above is someone else's
        "machine_cpu_percent_window": round(100 * (busy_b - busy_a) / (window[1] - window[0]), 1)
        if window
        else None,
        "peak_rss_mb": round(probe.peak_rss_mb, 1),
        "rss_before_mb": round(rss_before, 1),
        "kb_per_task": kb_per_task,
        "duration_s": round(wall, 2),
        "ramp_s": None if ramp_s is None else round(ramp_s, 2),
    }
    # Memory is judged in run(), against the level before (see _memory).
    row["holds_latency"] = bool(
        tether
        and clean
        and not probe.failures
        and probe_s["p99"] is not None
        and probe_s["p99"] < TTID_LIMIT_MS
        and floor_s["p99"] is not None
        and probe_s["p99"] <= TTID_FLOOR_RATIO * floor_s["p99"]
        and lag["p99"] is not None
        and lag["p99"] < LAG_LIMIT_MS
    )
    row["holds"] = row["holds_latency"]
    for failure in probe.failures[:5]:
        res.errors.append(f"{scenario} {label}: {failure}")
    res.check(
        f"{scenario} {label}: no event lost or out of order, every event delivered, "
        "every task completed",
        clean,
        f"lost {row['lost']}, out of order {row['out_of_order']}, undelivered "
        f"{row['undelivered']}, connections closed or refused {row['closed_connections']}"
        f" {row['close_reasons'] or ''}, not completed {row['not_completed']} "
        f"{row['not_completed_sample'][:2] or ''}, expired before their end reached the "
        f"client {row['expired_before_delivery']}",
    )
    return row


def _memory(rows: list[dict[str, Any]], previous: dict[str, Any] | None) -> None:
    """Memory per task for the held criterion: the marginal cost, the rise of the server's
    peak RSS over the previous level's peak divided by the added tasks. Over the start-up
    RSS instead (``kb_per_task``), the one-off growth of a fresh heap (about 1 MB: first
    use of caches, buffers, pools) is divided by a handful of tasks at the small levels.
    The first level has no level before it: one task's memory is below RSS noise there,
    so it is not judged, nor is any level of fewer than ``KB_JUDGED_FROM_TASKS`` tasks."""
    for row in rows:
        if previous is None or row["tasks"] <= previous["tasks"]:
            row["kb_per_task_marginal"] = None
        else:
            row["kb_per_task_marginal"] = round(
                max(0.0, row["peak_rss_mb"] - previous["peak_rss_mb"])
                * 1024
                / (row["tasks"] - previous["tasks"]),
                1,
            )
        marginal = row["kb_per_task_marginal"]
        judged = marginal is not None and row["tasks"] >= KB_JUDGED_FROM_TASKS
        row["holds"] = bool(row["holds_latency"] and (not judged or marginal <= KB_PER_TASK_LIMIT))
        previous = row


def _trio_at(monotonic_at: float) -> float:
    """trio's clock for a ``time.monotonic()`` instant."""
    return trio.current_time() + (monotonic_at - time.monotonic())


def cpu_text(cpu: dict[str, float], server: str = "tether") -> str:
    clients = sum(v for k, v in cpu.items() if k.startswith("client"))
    parts = [
        f"{server} {cpu.get(server, 0):.0f}",
        f"model {cpu.get('model', 0):.0f}",
        f"clients {clients:.0f}",
        f"bench {cpu.get('bench', 0):.0f}",
    ]
    return " / ".join(parts)


def _progress(b: Bench, spec: Spec, row: dict[str, Any]) -> None:
    server = "tether" if spec.target == "tether" else "relay_floor"
    probe = (
        f"task id p99 {row['ttid_p99']} ms (floor {row['floor_p99']}), "
        if spec.target == "tether"
        else ""
    )
    b.progress.step(
        f"{spec.label:>26}: {probe}lag p99 {row['lag_p99']} ms, lost {row['lost']}, "
        f"{row['us_per_token']} µs/token, RSS {row['peak_rss_mb']:.0f} MB, "
        f"CPU % (window) {cpu_text(row['cpu_percent_window'], server)}"
        f"{'' if row['holds_latency'] or spec.target != 'tether' else '  (latency: no)'}"
    )


async def run(b: Bench) -> None:
    res = b.results
    if not b.ws_available:
        res.notes.append("scale skipped: no WebSocket /ws")
        return
    cfg = b.cfg
    most = max([*cfg.scale_levels, *(n for n, _, _ in cfg.scale_slow_levels)])
    pool = WorkerPool(b.procs, workers_for(most, cfg.scale_max_workers))
    await pool.start()
    try:
        levels: list[dict[str, Any]] = []
        extra: list[dict[str, Any]] = []
        floors: dict[tuple[int, float], dict[str, Any]] = {}
        for n in cfg.scale_levels:
            spec = Spec(n, cfg.scale_rate, cfg.scale_tokens)
            row = await run_level(b, pool, spec)
            levels.append(row)
            _progress(b, spec, row)
        for n, rate, tokens in cfg.scale_slow_levels:
            spec = Spec(n, rate, tokens)
            row = await run_level(b, pool, spec)
            extra.append(row)
            _progress(b, spec, row)
        for n in cfg.scale_unbatched_levels:
            spec = Spec(n, cfg.scale_rate, cfg.scale_tokens, batch=False)
            row = await run_level(b, pool, spec)
            extra.append(row)
            _progress(b, spec, row)
        floor_specs = [
            Spec(n, cfg.scale_rate, cfg.scale_tokens, target="floor")
            for n in cfg.scale_floor_levels
        ]
        if cfg.scale_floor_slow:
            floor_specs += [
                Spec(n, rate, tokens, target="floor") for n, rate, tokens in cfg.scale_slow_levels
            ]
        for spec in floor_specs:
            row = await run_level(b, pool, spec)
            floors[(spec.n, spec.rate)] = row
            _progress(b, spec, row)
    finally:
        await pool.stop()
    per_token: list[dict[str, Any]] = []
    for row in [*levels, *extra]:
        floor = floors.get((row["tasks"], row["rate"]))
        if floor is None:
            continue
        per_token.append(
            {
                "tasks": row["tasks"],
                "rate": row["rate"],
                "batch": row["batch"],
                "tether_us_per_token": row["us_per_token"],
                "floor_us_per_token": floor["us_per_token"],
                "ratio": ratio(row["us_per_token"], floor["us_per_token"]),
                "tether_cpu_window": row["cpu_percent_window"],
                "floor_cpu_window": floor["cpu_percent_window"],
                "tether_lag_p99": row["lag_p99"],
                "floor_lag_p99": floor["lag_p99"],
                "tether_messages_per_token": round(row["messages"] / row["tokens_delivered"], 3)
                if row["tokens_delivered"]
                else None,
            }
        )
    _memory(levels, None)
    slow = [r for r in extra if r["rate"] != cfg.scale_rate]
    _memory(slow, levels[-1] if levels else None)
    for row in extra:
        if row not in slow:
            row["kb_per_task_marginal"] = None
            row["holds"] = row["holds_latency"]
    held = [r["tasks"] for r in levels if r["holds"]]
    res.figures[SCENARIO] = {
        "tokens": cfg.scale_tokens,
        "rate": cfg.scale_rate,
        "levels": levels,
        "extra_levels": extra,
        "floor_levels": list(floors.values()),
        "per_token_cpu": per_token,
        "ttid_limit_ms": TTID_LIMIT_MS,
        "ttid_floor_ratio": TTID_FLOOR_RATIO,
        "lag_limit_ms": LAG_LIMIT_MS,
        "kb_per_task_limit": KB_PER_TASK_LIMIT,
        "kb_judged_from_tasks": KB_JUDGED_FROM_TASKS,
        "highest_level_held": max(held) if held else None,
    }
