"""Scenario 7: Tether replicas on one Redis, and ``tether serve --workers 2``.

The scenario starts its own redis-server (the test dependencies' binary, see
``fakes/redis_server.py``) and its own Tether processes with ``TETHER_BACKEND=redis``,
through the bench's ``ProcessSet`` (ended by pid, a ``--workers`` supervisor's forked
workers too); the bench's own memory-backend server is left alone. Three parts:

1. **Stop via another replica.** Replicas A and B share one task space (one Redis, one key
   prefix). Each sample starts a background task on A whose model stream is long and slow
   (``stop_latency.LONG_STREAM``), waits until the fake model has its request, then sends
   ``POST /api/tasks/{id}/stop`` to A (same replica: the baseline) or to B (B passes the
   stop to A through Redis and answers once the terminal event is in the log); the two
   arms are interleaved in pairs, in random order. Measured from sending the stop to (a) its
   HTTP answer and (b) the fake model recording the task's upstream connection closed
   (``closed_at``, CLOCK_MONOTONIC). Goal: cross-replica p99 at most ``GOAL_MS``.
2. **Resume from another replica.** A task streams on A (``RESUME_STREAM``); each sample
   reads its ``last_seq`` from A and sends ``{"type": "subscribe", "after": last_seq -
   RESUME_BACK}`` on a WebSocket connected to A or to B (interleaved like the stops),
   measuring from the send to the first event's arrival; it then collects events until
   ``RESUME_LIVE`` past the cursor's backlog have arrived (the hand-over from replayed to
   live events), unsubscribes, and checks that the seqs run gapless from ``after + 1``
   (every gap, repeat or reordering counts as one violation).
3. **Scale, one process against two workers.** The scale scenario's levels (its
   ``run_level``, its client worker processes; N streams at ``scale_rate`` tokens/s of
   ``scale_tokens`` tokens) against a memory-backend process (the reference: what the Redis
   backend must keep), a Redis-backend process, ``serve --workers 2`` on Redis, and a
   process that finds the same Redis through one Sentinel (its cost over the URL), all four
   started fresh (each warmed up by ``WARM_UP``, not reported) and idle while another runs.
   Per level and server: delivered tokens/s
   (over the scale scenario's CPU window, against the offered N x rate), event lag,
   events lost, server CPU per delivered token (a ``--workers`` server's is its supervisor's
   plus its workers'), and the CPU % of every process over the window. Ratios: two workers
   over one (lag, CPU per token), Redis over memory (CPU per token, lag p99). On a machine
   of C cores, what a second worker can add is bounded by what the other processes leave:
   at most (C x 100 % minus their CPU %) / 100 %, reported beside the ratios.

Failover (a replica killed) is timed by the tests, not here.
"""

from __future__ import annotations

import random
import time
import uuid
from dataclasses import dataclass
from typing import Any

import trio

from bench.context import Bench
from bench.httpclient import HttpConnection
from bench.procs import Proc, ProcessError, free_port
from bench.scenarios.scale import Spec, Target, process_cpu, run_level, workers_for
from bench.scenarios.stop_latency import LONG_STREAM
from bench.stats import ratio
from bench.workers import WorkerPool
from bench.wsclient import WsClient, ws_client

SCENARIO = "replicas"
GOAL_MS = 50.0  # cross-replica stop: answer and upstream closed, p99
MODEL_PATH = "/v1/chat/completions"
# 60 s of tokens at 50/s: a steady stream of events to resume from, outlasting the samples
# (a new task is started if it ends).
RESUME_STREAM: dict[str, Any] = {"kind": "text", "tokens": 3000, "rate": 50}
RESUME_BACK = 10  # the cursor: this many events before the task's last one
RESUME_LIVE = 5  # then wait for this many events past the backlog
ARMS = ("same", "cross")  # the task's own replica (A), the other one (B)
# Before its levels, each fresh server streams this warm-up (tasks, tokens): in the scale
# scenario a level follows smaller ones, here it would otherwise meet a cold process (empty
# connection pool, first runs of every code path).
WARM_UP = (10, 50)
# A Tether server that has had WebSocket connections takes its whole graceful timeout (3 s,
# hypercorn's ping loops) to exit on SIGTERM, a --workers supervisor a little more: wait
# that long before SIGKILL, so that the replicas leave Redis as in a clean shutdown.
SHUTDOWN_GRACE_S = 8.0


@dataclass
class Replicas:
    """Two Tether processes sharing one task space (one Redis, one key prefix)."""

    a: Proc
    b: Proc


# -- processes ----------------------------------------------------------------------------


async def _redis_answers(port: int) -> bool:
    try:
        with trio.move_on_after(0.5):
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            async with stream:
                await stream.send_all(b"PING\r\n")
                return (await stream.receive_some(16)).startswith(b"+PONG")
    except OSError:
        pass
    return False


async def start_redis(b: Bench) -> Proc:
    """redis-server on a free loopback port, no persistence, its files in the log folder."""
    from fakes.redis_server import redis_binary

    directory = b.procs.log_dir / "redis"
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    proc = b.procs.spawn(
        "redis",
        [
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(directory),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
        ],
        program=redis_binary(),
    )
    proc.port = port
    deadline = time.monotonic() + 15
    while not await _redis_answers(port):
        if not proc.alive() or time.monotonic() > deadline:
            raise ProcessError(f"redis-server did not answer PING:\n{proc.log_tail()}")
        await trio.sleep(0.02)
    return proc


SENTINEL_SERVICE = "tether"


async def start_sentinel(b: Bench, redis: Proc) -> Proc:
    """One Redis Sentinel (quorum 1) on a free loopback port, monitoring ``redis``: enough to
    find the primary through Sentinel, as a Sentinel set-up's clients do (no failover)."""
    from fakes.redis_server import redis_binary

    directory = b.procs.log_dir / "sentinel"
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "sentinel.conf"
    config.write_text(f"sentinel monitor {SENTINEL_SERVICE} 127.0.0.1 {redis.port} 1\n")
    port = free_port()
    proc = b.procs.spawn(
        "sentinel",
        [str(config), "--sentinel", "--port", str(port), "--bind", "127.0.0.1"],
        program=redis_binary(),
    )
    proc.port = port
    deadline = time.monotonic() + 15
    while not await _redis_answers(port):
        if not proc.alive() or time.monotonic() > deadline:
            raise ProcessError(f"redis-server --sentinel did not answer PING:\n{proc.log_tail()}")
        await trio.sleep(0.02)
    return proc


def sentinel_env(sentinel: Proc, prefix: str) -> dict[str, str]:
    return {
        "TETHER_BACKEND": "redis",
        "TETHER_REDIS_SENTINELS": f"127.0.0.1:{sentinel.port}",
        "TETHER_REDIS_SENTINEL_SERVICE": SENTINEL_SERVICE,
        "TETHER_REDIS_PREFIX": prefix,
    }


def redis_env(redis: Proc, prefix: str) -> dict[str, str]:
    return {
        "TETHER_BACKEND": "redis",
        "TETHER_REDIS_URL": f"redis://127.0.0.1:{redis.port}/0",
        "TETHER_REDIS_PREFIX": prefix,
    }


async def start_replicas(b: Bench, redis: Proc, started: dict[str, Proc]) -> Replicas:
    """Replicas A and B (``replica_a``, ``replica_b``) on one task space (one Redis, one key
    prefix), started side by side; each goes into ``started`` as soon as it is up, so that
    the caller can end what did start if the other failed."""
    return await start_pair(b, redis_env(redis, prefix()), started)


async def start_pair(
    b: Bench, env: dict[str, str], started: dict[str, Proc], name: str = "replica"
) -> Replicas:
    """Replicas A and B (``<name>_a``, ``<name>_b``) with the backend settings ``env``, as
    ``start_replicas`` starts them."""
    names = (f"{name}_a", f"{name}_b")

    async def start(name: str) -> None:
        # Under --profile, B: the replica that reads what the other writes.
        started[name] = await b.start_tether(name, env, profile=name == names[1])

    async with trio.open_nursery() as nursery:
        for each in names:
            nursery.start_soon(start, each)
    return Replicas(started[names[0]], started[names[1]])


def end_tether(b: Bench, proc: Proc, exits: dict[str, int | None]) -> None:
    """End a Tether server of the scenario (SIGTERM, SIGKILL after ``SHUTDOWN_GRACE_S``) and
    note its exit status (-9: it had to be killed)."""
    b.procs.end(proc, SHUTDOWN_GRACE_S)
    exits[proc.name] = proc.popen.returncode


def pids(proc: Proc) -> str:
    return ", ".join(str(p.pid) for p in proc.processes())


def prefix() -> str:
    return "bench-" + uuid.uuid4().hex[:8]


def _arms(n: int) -> list[str]:
    """``n`` pairs of the two arms, each pair in random order."""
    out: list[str] = []
    for _ in range(n):
        out += random.sample(ARMS, 2)
    return out


# -- 1. stop via another replica ----------------------------------------------------------


@dataclass
class StopSample:
    arm: str
    answer: float
    upstream: float | None
    status: str
    reason: str
    phase: str


async def _stop_one(
    b: Bench, start: HttpConnection, via: HttpConnection, arm: str, chat_id: str
) -> StopSample:
    model = b.fake("model")
    seen = len(await model.requests(MODEL_PATH))
    marker = b.marker("rstop")
    answer = await start.request(
        "POST", "/api/chat/completions", b.chat_body(marker, chat_id=chat_id, background=True)
    )
    if answer.status != 202:
        raise RuntimeError(f"chat on A -> {answer.status}: {answer.body[:200]!r}")
    task_id = str(answer.json()["task_id"])
    request = await model.wait_request(MODEL_PATH, seen + 1, timeout=10)
    if request is None:
        raise RuntimeError("the fake model saw no request")
    if marker not in str(request.get("json_body")):
        raise RuntimeError("the fake model's latest request is not this sample's")
    stop = await via.request("POST", f"/api/tasks/{task_id}/stop", {})
    if stop.status != 200:
        raise RuntimeError(f"stop via {arm} -> {stop.status}: {stop.body[:200]!r}")
    task = stop.json()
    closed = await model.wait_closed(int(request["conn_id"]), timeout=10)
    upstream = None
    if closed is not None and closed.get("closed_at") is not None:
        upstream = float(closed["closed_at"]) - stop.sent_at
    return StopSample(
        arm,
        stop.elapsed,
        upstream,
        str(task.get("status")),
        str(task.get("cancel_reason")),
        str(task.get("phase")),
    )


async def stop_part(b: Bench, reps: Replicas, chat_id: str) -> dict[str, Any]:
    """Part 1: stops of A's tasks sent to A and to B, interleaved."""
    res = b.results
    await b.reset_fakes()
    await b.fake("model").configure(default_reply=LONG_STREAM)
    on_a, on_b = b.conn(reps.a.port), b.conn(reps.b.port)
    samples: list[StopSample] = []
    try:
        for arm in _arms(b.cfg.replica_stop_samples):
            with trio.fail_after(40):
                samples.append(
                    await _stop_one(b, on_a, on_a if arm == "same" else on_b, arm, chat_id)
                )
    finally:
        await on_a.aclose()
        await on_b.aclose()
    rows: dict[str, dict[str, Any]] = {}
    for arm in ARMS:
        mine = [s for s in samples if s.arm == arm]
        answer = res.add_set(SCENARIO, f"stop/{arm}/answer", [s.answer for s in mine])
        upstream = res.add_set(
            SCENARIO, f"stop/{arm}/upstream", [s.upstream for s in mine if s.upstream is not None]
        )
        rows[arm] = {
            "n": len(mine),
            "answer": answer,
            "upstream": upstream,
            "ended_in": sorted({s.phase for s in mine}),
        }
    same, cross = rows["same"], rows["cross"]
    problems = [
        f"{s.arm}: ended {s.status} ({s.reason})"
        for s in samples
        if s.status != "cancelled" or s.reason != "stop"
    ]
    problems += [
        f"{s.arm}: the model connection was not closed within 10 s"
        for s in samples
        if s.upstream is None
    ]
    res.check(
        "replicas: every task stopped via A or B ended cancelled (reason stop) and its "
        "model connection closed",
        not problems,
        f"{len(samples)} samples"
        if not problems
        else f"{len(problems)} problems, e.g. {problems[0]}",
    )
    fig = {
        "same": same,
        "cross": cross,
        "goal_ms": GOAL_MS,
        "ratio": {
            f"{metric}_{q}": ratio(cross[metric][q], same[metric][q])
            for metric in ("answer", "upstream")
            for q in ("p50", "p99")
        },
        "goal_met": all(
            cross[m]["p99"] is not None and cross[m]["p99"] <= GOAL_MS
            for m in ("answer", "upstream")
        ),
    }
    b.progress.step(
        f"stop via A / via B: answer p50 {same['answer']['p50']} / {cross['answer']['p50']} "
        f"ms, p99 {same['answer']['p99']} / {cross['answer']['p99']} ms; upstream closed "
        f"p99 {same['upstream']['p99']} / {cross['upstream']['p99']} ms; goal (B p99 <= "
        f"{GOAL_MS:g} ms) {'met' if fig['goal_met'] else 'NOT met'}"
    )
    return fig


# -- 2. resume from another replica -------------------------------------------------------


@dataclass
class ResumeSample:
    arm: str
    first: float | None
    after: int
    seqs: list[int]
    errors: list[str]

    @property
    def violations(self) -> int:
        """Each place where the seqs do not go on by one from ``after``."""
        return sum(
            1
            for prev, cur in zip([self.after, *self.seqs], self.seqs, strict=False)
            if cur != prev + 1
        )


async def _settle(client: WsClient) -> list[str]:
    """Wait for a ``pong``: the server handled every command sent before the ping, and any
    event it was sending meanwhile has arrived. The other replies since (errors) are
    returned and cleared."""
    await client.send({"type": "ping"})
    if not await client.wait_until(
        lambda: any(r.get("type") == "pong" for _, r in client.replies), 10
    ):
        raise TimeoutError("no pong in 10 s")
    others = [str(r)[:200] for _, r in client.replies if r.get("type") != "pong"]
    client.replies.clear()
    return others


async def _start_stream(b: Bench, on_a: HttpConnection, chat_id: str) -> str:
    answer = await on_a.request(
        "POST",
        "/api/chat/completions",
        b.chat_body(b.marker("resume"), chat_id=chat_id, background=True),
    )
    if answer.status != 202:
        raise RuntimeError(f"chat on A -> {answer.status}: {answer.body[:200]!r}")
    return str(answer.json()["task_id"])


async def _last_seq(on_a: HttpConnection, task_id: str) -> tuple[int, bool]:
    answer = await on_a.request("GET", f"/api/tasks/{task_id}")
    record = answer.json()
    return int(record["last_seq"]), record.get("status") in ("queued", "running")


async def _resume_one(client: WsClient, arm: str, task_id: str, after: int) -> ResumeSample:
    client.events.pop(task_id, None)
    wanted = RESUME_BACK + RESUME_LIVE

    def enough() -> bool:
        return len(client.events.get(task_id, ())) >= wanted or client.terminal(task_id) is not None

    sent = await client.send({"type": "subscribe", "task_id": task_id, "after": after})
    await client.wait_until(enough, 10)
    await client.send({"type": "unsubscribe", "task_id": task_id})
    errors = await _settle(client)
    events = client.events.pop(task_id, [])
    first = events[0].at - sent if events else None
    if len(events) < wanted and client.terminal(task_id) is None:
        errors.append(f"{len(events)} of {wanted} events in 10 s")
    return ResumeSample(arm, first, after, [e.seq for e in events], errors)


async def resume_part(b: Bench, reps: Replicas, chat_id: str) -> dict[str, Any]:
    """Part 2: subscriptions from a cursor to a task streaming on A, on A and on B."""
    res = b.results
    await b.reset_fakes()
    await b.fake("model").configure(default_reply=RESUME_STREAM)
    on_a = b.conn(reps.a.port)
    samples: list[ResumeSample] = []
    try:
        async with (
            ws_client(f"ws://127.0.0.1:{reps.a.port}/ws", batch=True) as ws_a,
            ws_client(f"ws://127.0.0.1:{reps.b.port}/ws", batch=True) as ws_b,
        ):
            task_id = await _start_stream(b, on_a, chat_id)
            for arm in _arms(b.cfg.replica_resume_samples):
                with trio.fail_after(40):
                    last, running = await _last_seq(on_a, task_id)
                    while not running or last <= RESUME_BACK:
                        if not running:
                            task_id = await _start_stream(b, on_a, chat_id)
                        await trio.sleep(0.05)
                        last, running = await _last_seq(on_a, task_id)
                    client = ws_a if arm == "same" else ws_b
                    samples.append(await _resume_one(client, arm, task_id, last - RESUME_BACK))
    finally:
        await on_a.aclose()
    await b.stop_chat(chat_id, reps.a.port)
    rows: dict[str, dict[str, Any]] = {}
    for arm in ARMS:
        mine = [s for s in samples if s.arm == arm]
        first = res.add_set(
            SCENARIO, f"resume/{arm}/first_event", [s.first for s in mine if s.first is not None]
        )
        rows[arm] = {
            "n": len(mine),
            "first_event": first,
            "violations": sum(s.violations for s in mine),
            "samples_with_violations": sum(1 for s in mine if s.violations),
            "errors": sum(len(s.errors) for s in mine),
        }
    same, cross = rows["same"], rows["cross"]
    bad = [s for s in samples if s.violations or s.errors]
    example = ""
    if bad:
        s = bad[0]
        example = (
            f", e.g. {s.arm} after {s.after}: seqs {s.seqs[:12]}"
            f"{' ' + '; '.join(s.errors[:2]) if s.errors else ''}"
        )
    res.check(
        "replicas: events resumed on A or B run gapless from after + 1",
        not bad,
        f"{len(samples)} samples, events past the cursor: {RESUME_BACK} replayed, then "
        f"{RESUME_LIVE} live"
        if not bad
        else f"{len(bad)} of {len(samples)} samples with gaps, repeats or errors{example}",
    )
    fig = {
        "same": same,
        "cross": cross,
        "back": RESUME_BACK,
        "live": RESUME_LIVE,
        "rate": RESUME_STREAM["rate"],
        "ratio": {
            q: ratio(cross["first_event"][q], same["first_event"][q]) for q in ("p50", "p99")
        },
    }
    b.progress.step(
        f"resume on A / on B: first event p50 {same['first_event']['p50']} / "
        f"{cross['first_event']['p50']} ms, p99 {same['first_event']['p99']} / "
        f"{cross['first_event']['p99']} ms; violations {same['violations']} / "
        f"{cross['violations']}"
    )
    return fig


# -- 3. scale: one process, two workers ---------------------------------------------------


@dataclass
class Config:
    """One server of part 3: its key in the figures, its label in the report."""

    key: str
    label: str
    proc: Proc
    rss_at_start_mb: float


def level_row(config: Config, row: dict[str, Any], cores: int) -> dict[str, Any]:
    """The figures of one level on one server, from ``run_level``'s row."""
    window = row.get("cpu_percent_window") or {}
    server = process_cpu(window, config.proc.name)
    total = round(sum(window.values()), 1)
    window_s = row.get("window_s") or 0
    return {
        "config": config.key,
        "label": config.label,
        "server": config.proc.name,
        "tasks": row["tasks"],
        "offered_tokens_per_s": round(row["tasks"] * row["rate"]),
        "delivered_tokens_per_s": round(row["tokens_in_window"] / window_s) if window_s else None,
        "lag_p50": row["lag_p50"],
        "lag_p99": row["lag_p99"],
        "lag_max": row["lag_max"],
        "lost": row["lost"],
        "out_of_order": row["out_of_order"],
        "undelivered": row["undelivered"],
        "closed_connections": row["closed_connections"],
        "not_completed": row["not_completed"],
        "ttid_p50": row["ttid_p50"],
        "ttid_p99": row["ttid_p99"],
        "us_per_token": row["us_per_token"],
        "server_cpu_percent": round(server, 1),
        "redis_cpu_percent": window.get("redis", 0.0),
        "total_cpu_percent": total,
        "others_cpu_percent": round(total - server, 1),
        "machine_cpu_percent": row.get("machine_cpu_percent_window"),
        "cpu_percent_window": window,
        "cores": cores,
        "peak_rss_mb": row["peak_rss_mb"],
        "kb_per_task": row["kb_per_task"],
    }


def _compare(rows: dict[str, dict[str, Any]], cores: int) -> dict[str, Any]:
    mem, one, two = rows.get("memory"), rows["redis"], rows["redis_w2"]
    out: dict[str, Any] = {
        "tasks": one["tasks"],
        "w2_over_w1": {
            key: ratio(two[key], one[key])
            for key in ("lag_p50", "lag_p99", "us_per_token", "delivered_tokens_per_s")
        },
        # What a second worker can add at best: the cores the other processes leave to the
        # servers, in units of the one core a single-threaded server can use.
        "gain_allowed": round(min(2.0, (cores * 100 - two["others_cpu_percent"]) / 100), 2),
        "one_worker_cpu_percent": one["server_cpu_percent"],
        "others_cpu_percent": two["others_cpu_percent"],
        "total_cpu_percent_w2": two["total_cpu_percent"],
        # CPU the machine spent beyond this run's processes (another job), at worst
        "foreign_cpu_percent": max(
            (
                round(r["machine_cpu_percent"] - r["total_cpu_percent"], 1)
                for r in rows.values()
                if r["machine_cpu_percent"] is not None
            ),
            default=None,
        ),
    }
    if mem is not None:
        out["redis_over_memory"] = {
            key: ratio(one[key], mem[key]) for key in ("us_per_token", "lag_p99")
        }
    sentinel = rows.get("redis_sentinel")
    if sentinel is not None:
        out["sentinel_over_url"] = {
            key: ratio(sentinel[key], one[key]) for key in ("us_per_token", "lag_p99")
        }
    return out


def servers_cpu_text(row: dict[str, Any], name: str) -> str:
    window = row["cpu_percent_window"]
    servers = [f"{v:.0f}" for k, v in window.items() if k == name or k.startswith(name + "/")]
    clients = sum(v for k, v in window.items() if k.startswith("client"))
    return (
        f"server {'+'.join(servers)} / redis {row['redis_cpu_percent']:.0f} / model "
        f"{window.get('model', 0):.0f} / clients {clients:.0f} / total "
        f"{row['total_cpu_percent']:.0f} (machine {row['machine_cpu_percent']:.0f})"
    )


async def scale_part(
    b: Bench, redis: Proc, sentinel: Proc, exits: dict[str, int | None]
) -> dict[str, Any]:
    """Part 3: the scale levels on a memory-backend process, a Redis-backend process,
    ``--workers 2`` on Redis, and a process that finds the same Redis through Sentinel
    (their exit statuses go to ``exits``)."""
    cfg = b.cfg
    cores = b.results.machine.get("cores") or 1
    specs = [
        ("memory", "memory backend, 1 process", "tether_memory", {"TETHER_BACKEND": "memory"}, []),
        ("redis", "Redis backend, 1 process", "tether_redis", redis_env(redis, prefix()), []),
        (
            "redis_w2",
            "Redis backend, --workers 2",
            "tether_redis_w2",
            redis_env(redis, prefix()),
            ["--workers", "2"],
        ),
        (
            "redis_sentinel",
            "Redis via Sentinel, 1 process",
            "tether_sentinel",
            sentinel_env(sentinel, prefix()),
            [],
        ),
    ]
    configs: dict[str, Config] = {}

    async def start(key: str, label: str, name: str, env: dict[str, str], args: list[str]) -> None:
        proc = await b.start_tether(name, env, args, replicas=2 if args else 1)
        configs[key] = Config(key, label, proc, b.proc_rss_mb(proc))

    levels: list[dict[str, Any]] = []
    comparisons: list[dict[str, Any]] = []
    pool = WorkerPool(b.procs, workers_for(max(cfg.replica_scale_levels), cfg.scale_max_workers))
    try:
        async with trio.open_nursery() as nursery:
            for spec in specs:
                nursery.start_soon(start, *spec)
        b.progress.step(
            "servers up: "
            + ", ".join(
                f"{configs[key].proc.name} :{configs[key].proc.port} "
                f"(pids {pids(configs[key].proc)})"
                for key, *_ in specs
            )
        )
        await pool.start()
        for key, *_ in specs:
            await run_level(
                b,
                pool,
                Spec(WARM_UP[0], cfg.scale_rate, WARM_UP[1]),
                Target(configs[key].proc, SCENARIO, configs[key].rss_at_start_mb),
            )
        b.progress.step(f"warm-up done: {WARM_UP[0]} streams of {WARM_UP[1]} tokens each")
        for n in cfg.replica_scale_levels:
            rows: dict[str, dict[str, Any]] = {}
            for key, *_ in specs:
                config = configs[key]
                target = Target(config.proc, SCENARIO, config.rss_at_start_mb)
                found = await run_level(b, pool, Spec(n, cfg.scale_rate, cfg.scale_tokens), target)
                rows[key] = level_row(config, found, cores)
                levels.append(rows[key])
                b.progress.step(
                    f"{config.label:>27} {n}x{cfg.scale_rate:g}/s: "
                    f"{rows[key]['delivered_tokens_per_s']} tokens/s delivered "
                    f"(offered {rows[key]['offered_tokens_per_s']}), lag p50/p99 "
                    f"{rows[key]['lag_p50']}/{rows[key]['lag_p99']} ms, lost "
                    f"{rows[key]['lost']}, {rows[key]['us_per_token']} µs/token; CPU % "
                    f"{servers_cpu_text(rows[key], config.proc.name)}"
                )
            comparisons.append(_compare(rows, cores))
    finally:
        await pool.stop()
        for config in configs.values():
            end_tether(b, config.proc, exits)
    return {
        "rate": cfg.scale_rate,
        "tokens": cfg.scale_tokens,
        "cores": cores,
        "levels": levels,
        "comparisons": comparisons,
    }


# -- the scenario -------------------------------------------------------------------------


async def run(b: Bench) -> None:
    res = b.results
    try:
        redis = await start_redis(b)
    except ImportError as exc:
        res.notes.append(f"replicas skipped: no redis-server binary ({exc})")
        return
    fig: dict[str, Any] = {}
    pair: dict[str, Proc] = {}
    exits: dict[str, int | None] = {}
    try:
        try:
            reps = await start_replicas(b, redis, pair)
            b.progress.step(
                f"redis :{redis.port} (pid {redis.pid}); replica A :{reps.a.port}"
                f" (pid {reps.a.pid}), B :{reps.b.port} (pid {reps.b.pid})"
            )
            chat_id = "bench-replicas-" + b.marker("c")
            fig["stop"] = await stop_part(b, reps, chat_id)
            fig["resume"] = await resume_part(b, reps, chat_id)
            left = await b.wait_no_tasks(15, reps.a.port)
            res.check(
                "replicas: no task left running on A and B after the stops",
                left is not None,
                "none"
                if left is not None
                else f"{len(await b.running_tasks(reps.a.port))} tasks left",
            )
        finally:
            for proc in pair.values():
                end_tether(b, proc, exits)
        sentinel = await start_sentinel(b, redis)
        try:
            fig["scale"] = await scale_part(b, redis, sentinel, exits)
        finally:
            b.procs.end(sentinel)
    finally:
        fig["exit_codes"] = exits
        res.figures[SCENARIO] = fig
        b.procs.end(redis)
    res.check(
        f"replicas: every Tether process exited 0 on SIGTERM within {SHUTDOWN_GRACE_S:g} s",
        all(code == 0 for code in exits.values()),
        ", ".join(f"{name}: {code}" for name, code in exits.items()),
    )
