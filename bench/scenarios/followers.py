"""Scenario 10: many WebSocket followers on replica B of tasks running on replica A.

A follower on B of a task that runs on A does not read A's memory: B learns of each new
event of the task's log from Redis. B's multiplexer (``server/tasks/redis/tailing.py``)
holds ONE blocking ``XREAD`` over the streams of every task it follows, whatever the number
of followers; each follower's connection then reads what is new with a (non-blocking,
multiplexed) ``XRANGE``. This scenario measures what that costs, at two follower counts:

- the replicas scenario's redis-server and replicas A and B (its helpers: ``start_redis``,
  ``start_replicas``), fresh, with ``TETHER_BACKEND=redis``;
- per level, N tasks stream on A (background ``POST /api/chat/completions`` on A) at a
  modest rate (``followers_rate`` tokens/s, ``followers_tokens`` tokens), and the scale
  scenario's WebSocket client workers hold, on ``/ws?batch=1``, ``followers_on_a`` followers
  per task on A (A's own followers: the floor, served from A's memory) and, per level,
  ``followers_on_b[i]`` followers per task on B; each sends ``subscribe`` with ``after`` 0
  right after the tasks started. A's and B's followers are spread alike over the same
  workers, so a busy worker slows both alike.

Measured per level:

- **B's Redis connections**: Redis ``CLIENT LIST``, each client told apart by its address:
  the local ports of the process's established TCP connections to Redis (psutil, by pid)
  name A's and B's (Tether does not name its clients with ``CLIENT SETNAME``); the bench's
  own probe connection is left out. Taken with the followers connected but not subscribed
  yet, every 0.5 s while the tasks stream (min and max), and after the tasks ended. Also
  ``total_connections_received`` over the level (connections opened, the ones a
  cancelled blocking read costs included) and the calls of ``XREAD`` and ``XRANGE``
  (``INFO commandstats``).
- **Event lag**: a token's arrival at a follower minus the fake model's schedule for it
  (request received + i / rate), as in the scale scenario, for the tokens scheduled from
  ``LAG_SETTLE_S`` after the subscriptions were sent (earlier ones are the catch-up replay
  of what was written before the follower came, on both replicas); p50 / p99 of B's
  followers against A's in the same level, and B / A.
- events lost, out of order or undelivered, tasks not completed, connections closed (any
  fails the check), and the CPU % of every process over the streaming.
"""

from __future__ import annotations

import re
import time
from typing import Any

import psutil  # type: ignore[import-untyped]
import trio

from bench.context import Bench
from bench.procs import Proc
from bench.scenarios.replicas import (
    Replicas,
    end_tether,
    pids,
    start_redis,
    start_replicas,
)
from bench.scenarios.scale import (
    STALL_S,
    cpu_percent,
    merge,
    model_schedule,
    server_records,
    workers_for,
)
from bench.stats import ratio, summarize
from bench.workers import WorkerPool, split

SCENARIO = "followers"
# Lags count from this long after the subscriptions went out: before it, a follower gets
# the replay of what the task wrote before it subscribed (A's and B's alike).
LAG_SETTLE_S = 1.0
SAMPLE_EVERY_S = 0.5  # CLIENT LIST while the tasks stream
# Before the levels, one short level (tokens per task, its B followers as the first
# level's) warms the fresh replicas up (their pools, the first runs of every code path).
WARM_UP_TOKENS = 10
# The connections a Tether process may hold to Redis, whatever it serves: its command
# pool's bound (``server/tasks/redis/connection.py``: 64), the multiplexer's blocking XREAD,
# the control stream's blocking XREADGROUP, and two being replaced (a cancelled blocking
# read costs its connection).
CONNECTIONS_BOUND = 64 + 2 + 2
LABELS = ("a", "b")  # the followers on A (the task's own replica), on B (another one)
_ADDR = re.compile(r"(?:^| )addr=[^ ]*:(\d+)(?: |$)")
_CMD = re.compile(r"(?:^| )cmd=([^ ]*)")


class RedisProbe:
    """The bench's own connection to the scenario's Redis: a few RESP2 commands (``CLIENT
    LIST``, ``INFO``), written and parsed here."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = b""
        self.local_port = int(stream.socket.getsockname()[1])

    @classmethod
    async def open(cls, port: int) -> RedisProbe:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def _more(self) -> None:
        data = await self._stream.receive_some(1 << 16)
        if not data:
            raise ConnectionError("Redis closed the probe connection")
        self._buf += data

    async def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            await self._more()
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    async def _reply(self) -> Any:
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"Redis: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self._buf) < n + 2:
                await self._more()
            data, self._buf = self._buf[:n], self._buf[n + 2 :]
            return data.decode()
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [await self._reply() for _ in range(n)]
        raise RuntimeError(f"Redis: unexpected reply {line[:80]!r}")

    async def command(self, *args: str) -> Any:
        out = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        await self._stream.send_all(b"".join(out))
        return await self._reply()

    async def info(self, section: str) -> dict[str, str]:
        text = str(await self.command("INFO", section))
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {k: v for k, v in pairs}

    async def aclose(self) -> None:
        await self._stream.aclose()


def redis_ports(proc: Proc, redis_port: int) -> set[int]:
    """The local ports of a process's established connections to Redis."""
    ports: set[int] = set()
    for process in proc.processes():
        for c in process.net_connections(kind="tcp"):
            if c.raddr and c.raddr.port == redis_port and c.status == psutil.CONN_ESTABLISHED:
                ports.add(int(c.laddr.port))
    return ports


async def client_counts(probe: RedisProbe, reps: Replicas, redis: Proc) -> dict[str, Any]:
    """Redis's clients by owner: A, B, others (the probe itself left out); and B's by the
    last command each ran (``cmd=`` of ``CLIENT LIST``)."""
    a_ports, b_ports = redis_ports(reps.a, redis.port), redis_ports(reps.b, redis.port)
    lines = [line for line in str(await probe.command("CLIENT", "LIST")).splitlines() if line]
    out: dict[str, Any] = {"total": 0, "a": 0, "b": 0, "other": 0, "b_by_cmd": {}}
    for line in lines:
        found = _ADDR.search(line)
        port = int(found.group(1)) if found else -1
        if port == probe.local_port:
            continue
        out["total"] += 1
        if port in b_ports:
            out["b"] += 1
            cmd = _CMD.search(line)
            name = cmd.group(1) if cmd else "?"
            out["b_by_cmd"][name] = out["b_by_cmd"].get(name, 0) + 1
        elif port in a_ports:
            out["a"] += 1
        else:
            out["other"] += 1
    return out


def _calls(stats: dict[str, str], command: str) -> int:
    found = re.search(r"calls=(\d+)", stats.get(f"cmdstat_{command}", ""))
    return int(found.group(1)) if found else 0


async def _redis_counters(probe: RedisProbe) -> dict[str, int]:
    stats = await probe.info("stats")
    commands = await probe.info("commandstats")
    out = {
        "connections_received": int(stats.get("total_connections_received", 0)),
        "xread": _calls(commands, "xread"),
        "xrange": _calls(commands, "xrange"),
    }
    for key in commands:
        if key.startswith("cmdstat_"):
            out["cmd:" + key.removeprefix("cmdstat_")] = _calls(
                commands, key.removeprefix("cmdstat_")
            )
    out["commands"] = sum(v for k, v in out.items() if k.startswith("cmd:"))
    return out


def _spread(subs: list[dict[str, Any]], counts: list[int]) -> list[list[dict[str, Any]]]:
    out: list[list[dict[str, Any]]] = []
    start = 0
    for c in counts:
        out.append(subs[start : start + c])
        start += c
    return out


async def run_followers(
    b: Bench,
    pool: WorkerPool,
    reps: Replicas,
    redis: Proc,
    probe: RedisProbe,
    per_task_b: int,
    *,
    warm_up: bool = False,
) -> dict[str, Any]:
    """One level: ``followers_tasks`` tasks on A, ``followers_on_a`` followers per task on
    A and ``per_task_b`` on B. A warm-up level is short and records no sample set."""
    cfg, res = b.cfg, b.results
    n_tasks, rate = cfg.followers_tasks, cfg.followers_rate
    tokens = WARM_UP_TOKENS if warm_up else cfg.followers_tokens
    per_task_a = cfg.followers_on_a
    n_a, n_b = n_tasks * per_task_a, n_tasks * per_task_b
    duration = tokens / rate
    await b.reset_fakes()
    await b.fake("model").configure(default_reply={"kind": "text", "tokens": tokens, "rate": rate})
    used = pool.count
    counts = {"a": split(n_a, used), "b": split(n_b, used)}
    ports = {"a": reps.a.port, "b": reps.b.port}
    failures: list[str] = []
    for label in LABELS:  # on each worker: its A followers first, then its B followers
        answers = await pool.each(
            [
                {
                    "cmd": "connect",
                    "host": "127.0.0.1",
                    "port": ports[label],
                    "path": "/ws?batch=1",
                    "n": c,
                    "mode": "tether",
                    "label": label,
                }
                for c in counts[label]
            ]
        )
        failures += [f"connect {label}: {f}" for a in answers for f in a.get("failures", [])]
    before = await client_counts(probe, reps, redis)
    counters0 = await _redis_counters(probe)
    chat_id = f"bench-followers-{n_b}-" + b.marker("c")
    on_a = b.conn(reps.a.port)
    started: list[tuple[str, str]] = []  # (task id, marker)
    t0 = time.monotonic()
    try:
        for _ in range(n_tasks):
            marker = b.marker("follow")
            answer = await on_a.request(
                "POST",
                "/api/chat/completions",
                b.chat_body(marker, chat_id=chat_id, background=True),
            )
            if answer.status != 202:
                raise RuntimeError(f"chat on A -> {answer.status}: {answer.body[:200]!r}")
            started.append((str(answer.json()["task_id"]), marker))
    finally:
        await on_a.aclose()
    # Follower k of every task, then follower k + 1: each worker gets a mix of the tasks.
    subs = {
        label: [
            {"task_id": task_id, "marker": marker, "after": 0}
            for _ in range(per_task)
            for task_id, marker in started
        ]
        for label, per_task in (("a", per_task_a), ("b", per_task_b))
    }
    per_worker_a, per_worker_b = _spread(subs["a"], counts["a"]), _spread(subs["b"], counts["b"])
    await pool.each(
        [
            {"cmd": "subscribe", "subs": sa + sb}
            for sa, sb in zip(per_worker_a, per_worker_b, strict=True)
        ]
    )
    t_sub = time.monotonic()
    lag_from = t_sub + LAG_SETTLE_S
    samples: list[dict[str, Any]] = []
    done = trio.Event()

    async def sample() -> None:
        while not done.is_set():
            samples.append(await client_counts(probe, reps, redis))
            with trio.move_on_after(SAMPLE_EVERY_S):
                await done.wait()

    cpu_a: dict[str, float] = {}
    cpu_b: dict[str, float] = {}
    window: list[float] = []
    waited: list[dict[str, Any]] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(sample)
        await trio.sleep_until(trio.current_time() + max(0.0, lag_from - time.monotonic()))
        cpu_a, ta = b.cpu_by_process(), time.monotonic()
        await trio.sleep(max(0.5, t0 + 0.95 * duration - ta))
        cpu_b, tb = b.cpu_by_process(), time.monotonic()
        window = [ta, tb]
        waited = await pool.all(
            {
                "cmd": "wait",
                "stall_s": STALL_S,
                "hard_s": duration,
                "started_at": t0,
                "deadline_s": duration + 120,
            }
        )
        done.set()
    after = await client_counts(probe, reps, redis)
    counters1 = await _redis_counters(probe)
    pending = sorted({t for w in waited for t in w.get("pending", [])})
    records = await server_records(b, pending, reps.a.port)
    schedule = await model_schedule(b)
    found: dict[str, dict[str, Any]] = {}
    for label in LABELS:
        found[label] = merge(
            await pool.all(
                {
                    "cmd": "analyze",
                    "schedule": schedule,
                    "rate": rate,
                    "tokens": tokens,
                    "window": window,
                    "records": records,
                    "label": label,
                    "lag_from": lag_from,
                }
            )
        )
    await pool.all({"cmd": "close"})
    await b.stop_chat(chat_id, reps.a.port)
    await b.wait_no_tasks(30, reps.a.port)
    key = f"tasks={n_tasks}/on_b={n_b}/on_a={n_a}/rate={rate:g}"
    lags: dict[str, dict[str, Any]] = {}
    for label in LABELS:
        samples_s = [x / 1000 for x in found[label].get("lags", [])]
        lags[label] = (
            summarize(samples_s)
            if warm_up
            else res.add_set(SCENARIO, f"{key}/{label}/event_lag", samples_s)
        )
    during_b = [s["b"] for s in samples] or [0]
    during_a = [s["a"] for s in samples] or [0]
    steady = max(samples, key=lambda s: s["b"]) if samples else before
    delta = {k: v - counters0.get(k, 0) for k, v in counters1.items()}
    delivered_b = int(found["b"].get("tokens_delivered", 0))
    wall = window[1] - window[0] if window else 0.0
    row: dict[str, Any] = {
        "tasks": n_tasks,
        "rate": rate,
        "tokens": tokens,
        "followers_a": n_a,
        "followers_b": n_b,
        "connect_failures": failures[:5],
        "redis_clients": {
            "before": before,
            "during_b_min": min(during_b),
            "during_b_max": max(during_b),
            "during_a_max": max(during_a),
            "during_total_max": max((s["total"] for s in samples), default=0),
            "at_b_max": steady,
            "after": after,
            "samples": len(samples),
        },
        "redis_counters": delta,
        "xrange_per_b_token": round(delta["xrange"] / delivered_b, 2) if delivered_b else None,
        "lag_from_s": round(lag_from - t0, 2),
        "ratio": {q: ratio(lags["b"][q], lags["a"][q]) for q in ("p50", "p99")},
        "cpu_percent_window": cpu_percent(cpu_a, cpu_b, wall),
        "window_s": round(wall, 2),
    }
    for label in LABELS:
        f = found[label]
        row[label] = {
            "followers": n_a if label == "a" else n_b,
            "lag": lags[label],
            "tokens_delivered": int(f.get("tokens_delivered", 0)),
            "messages": int(f.get("messages", 0)),
            "lost": int(f.get("lost", 0)),
            "out_of_order": int(f.get("out_of_order", 0)),
            "undelivered": int(f.get("undelivered", 0)),
            "closed": int(f.get("closed", 0)),
            "close_reasons": f.get("close_reasons", {}),
            "not_completed": int(f.get("not_completed", 0)),
            "not_completed_sample": (f.get("not_completed_sample") or [])[:3],
        }
    cpu = row["cpu_percent_window"]
    clients = sum(v for k, v in cpu.items() if k.startswith("client"))
    b.progress.step(
        f"{'warm-up: ' if warm_up else ''}{n_tasks} tasks x {rate:g}/s on A; followers "
        f"A {n_a} / B {n_b}: lag p50 "
        f"{lags['a']['p50']} / {lags['b']['p50']} ms, p99 {lags['a']['p99']} / "
        f"{lags['b']['p99']} ms (B/A p99 {row['ratio']['p99']}); B's Redis clients: "
        f"{before['b']} before, {min(during_b)}-{max(during_b)} while streaming "
        f"({steady['b_by_cmd']}), {after['b']} after; connections opened "
        f"{delta['connections_received']}, XREAD {delta['xread']}, XRANGE {delta['xrange']}; "
        f"CPU % A {cpu.get('replica_a', 0):.0f} / B {cpu.get('replica_b', 0):.0f} / redis "
        f"{cpu.get('redis', 0):.0f} / clients {clients:.0f}; lost {row['a']['lost']} / "
        f"{row['b']['lost']}"
    )
    return row


async def run(b: Bench) -> None:
    res, cfg = b.results, b.cfg
    try:
        redis = await start_redis(b)
    except ImportError as exc:
        res.notes.append(f"followers skipped: no redis-server binary ({exc})")
        return
    pair: dict[str, Proc] = {}
    exits: dict[str, int | None] = {}
    levels: list[dict[str, Any]] = []
    fig: dict[str, Any] = {
        "tasks": cfg.followers_tasks,
        "rate": cfg.followers_rate,
        "tokens": cfg.followers_tokens,
        "on_a_per_task": cfg.followers_on_a,
        "on_b_per_task": list(cfg.followers_on_b),
        "lag_settle_s": LAG_SETTLE_S,
        "levels": levels,
        "cores": res.machine.get("cores"),
    }
    most = cfg.followers_tasks * (cfg.followers_on_a + max(cfg.followers_on_b))
    pool = WorkerPool(b.procs, workers_for(most, cfg.scale_max_workers))
    probe: RedisProbe | None = None
    try:
        reps = await start_replicas(b, redis, pair)
        b.progress.step(
            f"redis :{redis.port} (pid {redis.pid}); replica A :{reps.a.port} "
            f"(pids {pids(reps.a)}), B :{reps.b.port} (pids {pids(reps.b)})"
        )
        probe = await RedisProbe.open(redis.port)
        await pool.start()
        fig["client_workers"] = pool.count
        await run_followers(b, pool, reps, redis, probe, cfg.followers_on_b[0], warm_up=True)
        for per_task_b in cfg.followers_on_b:
            levels.append(await run_followers(b, pool, reps, redis, probe, per_task_b))
    finally:
        res.figures[SCENARIO] = fig
        await pool.stop()
        if probe is not None:
            await probe.aclose()
        for proc in pair.values():
            end_tether(b, proc, exits)
        fig["exit_codes"] = exits
        b.procs.end(redis)
    bad = [
        f"{lv['followers_b']} on B, {label}: lost {lv[label]['lost']}, out of order "
        f"{lv[label]['out_of_order']}, undelivered {lv[label]['undelivered']}, closed "
        f"{lv[label]['closed']}, not completed {lv[label]['not_completed']}"
        for lv in levels
        for label in LABELS
        if lv[label]["lost"]
        or lv[label]["out_of_order"]
        or lv[label]["undelivered"]
        or lv[label]["closed"]
        or lv[label]["not_completed"]
        or lv["connect_failures"]
    ]
    res.check(
        "followers: every follower on A and B got every event of its task, in order, and its end",
        not bad and bool(levels),
        f"{len(levels)} levels, {sum(lv['followers_a'] + lv['followers_b'] for lv in levels)} "
        "followers"
        if not bad
        else "; ".join(bad[:3]),
    )
    peaks = [(lv["followers_b"], lv["redis_clients"]["during_b_max"]) for lv in levels]
    res.check(
        f"followers: B's Redis connections stay within {CONNECTIONS_BOUND} (its pools' "
        "bound), whatever its followers",
        bool(peaks) and all(peak <= CONNECTIONS_BOUND for _, peak in peaks),
        ", ".join(f"at most {peak} with {n} followers on B" for n, peak in peaks),
    )
    res.check(
        "followers: replicas A and B exited 0 on SIGTERM",
        bool(exits) and all(code == 0 for code in exits.values()),
        ", ".join(f"{name}: {code}" for name, code in exits.items()),
    )
