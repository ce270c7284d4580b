"""Scenario 10: many WebSocket followers on replica B of tasks running on replica A.

A follower on B of a task that runs on A does not read A's memory: B learns of each new
event of the task's log from Redis. B's multiplexer (``server/tasks/redis/tailing.py``)
holds ONE blocking ``XREAD`` over the streams of every task it follows on one server,
whatever the number of followers; on a Redis Cluster, one per hash slot followed, at most
``TETHER_REDIS_FOLLOW_READS`` at once (past that, the slots take turns with 50 ms reads).
Each follower's connection then reads what is new with a (non-blocking, multiplexed)
``XRANGE``. This scenario measures what that costs, at two follower counts:

- the replicas scenario's redis-server and replicas A and B (its helpers: ``start_redis``,
  ``start_pair``), fresh, with ``TETHER_BACKEND=redis``. ``followers_redis``
  (``--followers-redis``) names other set-ups, each a pair of replicas of its own:
  ``cluster`` is the test suite's Redis Cluster (``fakes/redis_cluster.py``: six nodes,
  three primaries; ``TETHER_REDIS_URL`` names one node and the replicas find the others),
  ``cluster:N`` the same cluster with ``TETHER_REDIS_FOLLOW_READS=N`` (a key prefix of its
  own); each task's keys are a hash slot of their own (the tag ``{<task id>}``), so a level
  follows about as many slots as tasks. Every set-up is started before the levels, and each
  level runs on each set-up in turn, in a random order per level, so that a noisy machine
  weighs on all of them alike;
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
  own probe connection is left out. On a cluster, every node is asked (a probe connection
  to each) and the counts are summed, B's also kept per node. Taken with the followers
  connected but not subscribed yet, every 0.5 s while the tasks stream (min and max), and
  after the tasks ended. Also ``total_connections_received`` over the level (connections
  opened, the ones a cancelled blocking read costs included) and the calls of ``XREAD``
  and ``XRANGE`` (``INFO commandstats``), summed over the nodes.
- **Event lag**: a token's arrival at a follower minus the fake model's schedule for it
  (request received + i / rate), as in the scale scenario, for the tokens scheduled from
  ``LAG_SETTLE_S`` after the subscriptions were sent (earlier ones are the catch-up replay
  of what was written before the follower came, on both replicas); p50 / p99 of B's
  followers against A's in the same level, and B / A.
- events lost, out of order or undelivered, tasks not completed, connections closed (any
  fails the check), and the CPU % of every process over the streaming.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

import psutil  # type: ignore[import-untyped]
import trio

from bench.context import Bench
from bench.procs import Proc
from bench.redis_clients import RedisProbe, parse_setup, sum_clients, tally_clients
from bench.scenarios.replicas import (
    Replicas,
    end_tether,
    pids,
    prefix,
    redis_env,
    start_pair,
    start_redis,
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
# The server's TETHER_REDIS_FOLLOW_READS when a set-up names none.
DEFAULT_FOLLOW_READS = 32
LABELS = ("a", "b")  # the followers on A (the task's own replica), on B (another one)


@dataclass
class RedisNodes:
    """The Redis of some set-ups: one redis-server, or every node of a cluster; with a probe
    connection to each (opened by ``open_probes``)."""

    kind: str
    procs: list[Proc]
    url: str
    cluster: Any = None  # the RedisCluster of fakes/redis_cluster.py, for a cluster
    probes: list[RedisProbe] = field(default_factory=list)

    @property
    def ports(self) -> list[int]:
        return [proc.port for proc in self.procs]

    async def open_probes(self) -> None:
        for port in self.ports:
            self.probes.append(await RedisProbe.open(port))


@dataclass
class Setup:
    """Replicas A and B on one of the Redis set-ups, a task space (key prefix) of their own."""

    spec: str  # as named in followers_redis
    follow_reads: int | None  # TETHER_REDIS_FOLLOW_READS of its replicas (None: the default)
    redis: RedisNodes
    reps: Replicas

    @property
    def key(self) -> str:
        """Its sample sets' key prefix (none for one redis-server, as before set-ups)."""
        return "" if self.spec == "one" else f"redis={self.spec}/"

    @property
    def connections_bound(self) -> int:
        """The connections B may hold to one Redis node: its command pool's bound, its
        blocking reads (one on one server; on a cluster, at most the follow-reads bound on
        one node), the control stream's read and two being replaced."""
        if self.redis.kind == "one":
            return CONNECTIONS_BOUND
        return 64 + (self.follow_reads or DEFAULT_FOLLOW_READS) + 1 + 2


def setup_tag(spec: str) -> str:
    """A set-up's name for its processes: ``replica`` (as before set-ups), ``cluster``,
    ``cluster128``."""
    return "replica" if spec == "one" else spec.replace(":", "")


async def start_one(b: Bench) -> RedisNodes:
    redis = await start_redis(b)
    return RedisNodes("one", [redis], f"redis://127.0.0.1:{redis.port}/0")


async def start_cluster(b: Bench) -> RedisNodes:
    """The test suite's Redis Cluster (``fakes/redis_cluster.py``: six nodes, three
    primaries), formed in a thread; its nodes are taken into the bench's processes (ended by
    pid with the rest, CPU counted). Raises ImportError without a redis-server binary."""
    from fakes.redis_cluster import RedisCluster
    from fakes.redis_server import redis_binary

    redis_binary()  # no binary: ImportError here
    cluster = RedisCluster()
    # A failed start stops the nodes it started. A cancel waits for the thread (it is not
    # abandoned) and arrives at the next checkpoint, after the nodes are taken in below.
    await trio.to_thread.run_sync(cluster.start)
    procs: list[Proc] = []
    for i, node in enumerate(cluster.nodes):
        assert node.process is not None
        proc = b.procs.adopt(f"cluster_redis_{i}", node.process, node.log_path)
        proc.port = node.port
        procs.append(proc)
    return RedisNodes("cluster", procs, cluster.url, cluster)


def end_redis(b: Bench, redis: RedisNodes) -> None:
    for proc in redis.procs:
        b.procs.end(proc)
    if redis.cluster is not None:
        redis.cluster.stop()  # its nodes have ended: this removes their directories


def redis_ports(proc: Proc, nodes: Collection[int]) -> dict[int, set[int]]:
    """The local ports of a process's established connections to each Redis node, by the
    node's port (the same local port may reach two nodes)."""
    out: dict[int, set[int]] = {port: set() for port in nodes}
    for process in proc.processes():
        for c in process.net_connections(kind="tcp"):
            if c.raddr and c.raddr.port in out and c.status == psutil.CONN_ESTABLISHED:
                out[c.raddr.port].add(int(c.laddr.port))
    return out


async def client_counts(setup: Setup) -> dict[str, Any]:
    """Redis's clients by owner over every node of the set-up (``sum_clients``)."""
    ports = setup.redis.ports
    a_ports, b_ports = redis_ports(setup.reps.a, ports), redis_ports(setup.reps.b, ports)
    nodes: dict[int, dict[str, Any]] = {}
    for probe in setup.redis.probes:
        listing = str(await probe.command("CLIENT", "LIST"))
        nodes[probe.port] = tally_clients(
            listing, probe.local_port, a_ports[probe.port], b_ports[probe.port]
        )
    return sum_clients(nodes)


def _calls(stats: dict[str, str], command: str) -> int:
    found = re.search(r"calls=(\d+)", stats.get(f"cmdstat_{command}", ""))
    return int(found.group(1)) if found else 0


async def _redis_counters(probes: Iterable[RedisProbe]) -> dict[str, int]:
    """The counters of ``_node_counters``, summed over the nodes."""
    out: dict[str, int] = {}
    for probe in probes:
        for name, value in (await _node_counters(probe)).items():
            out[name] = out.get(name, 0) + value
    return out


async def _node_counters(probe: RedisProbe) -> dict[str, int]:
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
    setup: Setup,
    per_task_b: int,
    *,
    warm_up: bool = False,
) -> dict[str, Any]:
    """One level on one set-up: ``followers_tasks`` tasks on A, ``followers_on_a`` followers
    per task on A and ``per_task_b`` on B. A warm-up level is short and records no sample
    set."""
    cfg, res = b.cfg, b.results
    reps, probes = setup.reps, setup.redis.probes
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
    before = await client_counts(setup)
    counters0 = await _redis_counters(probes)
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
            samples.append(await client_counts(setup))
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
    after = await client_counts(setup)
    counters1 = await _redis_counters(probes)
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
    key = f"{setup.key}tasks={n_tasks}/on_b={n_b}/on_a={n_a}/rate={rate:g}"
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
        "redis": setup.spec,
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
            # B's most on any one node (on one server, its count)
            "during_b_node_max": max(
                (max(s["b_by_node"].values(), default=0) for s in samples), default=0
            ),
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
    row["cpu"] = {
        "a": cpu.get(reps.a.name, 0.0),
        "b": cpu.get(reps.b.name, 0.0),
        "redis": round(sum(cpu.get(p.name, 0.0) for p in setup.redis.procs), 1),
    }
    clients = sum(v for k, v in cpu.items() if k.startswith("client"))
    b.progress.step(
        f"{'' if setup.spec == 'one' else setup.spec + ': '}"
        f"{'warm-up: ' if warm_up else ''}{n_tasks} tasks x {rate:g}/s on A; followers "
        f"A {n_a} / B {n_b}: lag p50 "
        f"{lags['a']['p50']} / {lags['b']['p50']} ms, p99 {lags['a']['p99']} / "
        f"{lags['b']['p99']} ms (B/A p99 {row['ratio']['p99']}); B's Redis clients: "
        f"{before['b']} before, {min(during_b)}-{max(during_b)} while streaming "
        f"({steady['b_by_cmd']}), {after['b']} after; connections opened "
        f"{delta['connections_received']}, XREAD {delta['xread']}, XRANGE {delta['xrange']}; "
        f"CPU % A {row['cpu']['a']:.0f} / B {row['cpu']['b']:.0f} / redis "
        f"{row['cpu']['redis']:.0f} / clients {clients:.0f}; lost {row['a']['lost']} / "
        f"{row['b']['lost']}"
    )
    return row


async def start_setups(
    b: Bench, redises: dict[str, RedisNodes], started: dict[str, Proc]
) -> list[Setup]:
    """A pair of replicas per set-up of ``followers_redis``, each on a key prefix of its own
    (set-ups of one kind share its Redis)."""
    setups: list[Setup] = []
    for spec in b.cfg.followers_redis:
        kind, follow_reads = parse_setup(spec)
        redis = redises[kind]
        if kind == "one":
            env = redis_env(redis.procs[0], prefix())
        else:
            env = {
                "TETHER_BACKEND": "redis",
                "TETHER_REDIS_URL": redis.url,
                "TETHER_REDIS_PREFIX": prefix(),
            }
        if follow_reads is not None:
            env["TETHER_REDIS_FOLLOW_READS"] = str(follow_reads)
        reps = await start_pair(b, env, started, setup_tag(spec))
        setups.append(Setup(spec, follow_reads, redis, reps))
        where = ", ".join(f":{p.port} (pid {p.pid})" for p in redis.procs)
        b.progress.step(
            f"{spec}: redis {where}; replica A :{reps.a.port} (pids {pids(reps.a)}), "
            f"B :{reps.b.port} (pids {pids(reps.b)})"
        )
    return setups


async def run(b: Bench) -> None:
    res, cfg = b.results, b.cfg
    kinds = list(dict.fromkeys(parse_setup(spec)[0] for spec in cfg.followers_redis))
    redises: dict[str, RedisNodes] = {}
    pair: dict[str, Proc] = {}
    exits: dict[str, int | None] = {}
    levels: list[dict[str, Any]] = []
    setups: list[Setup] = []
    fig: dict[str, Any] = {
        "tasks": cfg.followers_tasks,
        "rate": cfg.followers_rate,
        "tokens": cfg.followers_tokens,
        "on_a_per_task": cfg.followers_on_a,
        "on_b_per_task": list(cfg.followers_on_b),
        "lag_settle_s": LAG_SETTLE_S,
        "redis": list(cfg.followers_redis),
        "levels": levels,
        "cores": res.machine.get("cores"),
    }
    most = cfg.followers_tasks * (cfg.followers_on_a + max(cfg.followers_on_b))
    pool = WorkerPool(b.procs, workers_for(most, cfg.scale_max_workers))
    try:
        for kind in kinds:
            try:
                redises[kind] = await (start_one(b) if kind == "one" else start_cluster(b))
            except ImportError as exc:
                res.notes.append(f"followers skipped: no redis-server binary ({exc})")
                return
        setups = await start_setups(b, redises, pair)
        fig["nodes"] = {kind: redis.ports for kind, redis in redises.items()}
        fig["follow_reads"] = {
            s.spec: s.follow_reads or DEFAULT_FOLLOW_READS for s in setups if s.spec != "one"
        }
        for redis in redises.values():
            await redis.open_probes()
        await pool.start()
        fig["client_workers"] = pool.count
        for setup in setups:
            await run_followers(b, pool, setup, cfg.followers_on_b[0], warm_up=True)
        # Each level on every set-up in turn, in a random order per level.
        for per_task_b in cfg.followers_on_b:
            for setup in random.sample(setups, len(setups)):
                levels.append(await run_followers(b, pool, setup, per_task_b))
    finally:
        res.figures[SCENARIO] = fig
        try:
            await pool.stop()
            for redis in redises.values():
                for probe in redis.probes:
                    await probe.aclose()
        finally:  # by pid, also when cancelled
            for proc in pair.values():
                end_tether(b, proc, exits)
            fig["exit_codes"] = exits
            for redis in redises.values():
                end_redis(b, redis)
    named = len(setups) > 1 or any(s.spec != "one" for s in setups)

    def where(level: dict[str, Any]) -> str:
        return f" ({level['redis']})" if named else ""

    bad = [
        f"{lv['followers_b']} on B{where(lv)}, {label}: lost {lv[label]['lost']}, out of order "
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
    for setup in setups:
        mine = [lv for lv in levels if lv["redis"] == setup.spec]
        if setup.redis.kind == "one":
            peaks = [(lv["followers_b"], lv["redis_clients"]["during_b_max"]) for lv in mine]
            res.check(
                f"followers{where(mine[0]) if mine else ''}: B's Redis connections stay within "
                f"{CONNECTIONS_BOUND} (its pools' bound), whatever its followers",
                bool(peaks) and all(peak <= CONNECTIONS_BOUND for _, peak in peaks),
                ", ".join(f"at most {peak} with {n} followers on B" for n, peak in peaks),
            )
            continue
        bound = setup.connections_bound
        res.check(
            f"followers ({setup.spec}): B's Redis connections stay within {bound} on each "
            "node (its command pool's bound, its follow-reads bound, the control stream's "
            "read, two being replaced), whatever its followers",
            bool(mine) and all(lv["redis_clients"]["during_b_node_max"] <= bound for lv in mine),
            ", ".join(
                f"at most {lv['redis_clients']['during_b_node_max']} on one node "
                f"({lv['redis_clients']['during_b_max']} on "
                f"{len(setup.redis.procs)} nodes) with {lv['followers_b']} followers on B"
                for lv in mine
            ),
        )
    res.check(
        "followers: replicas A and B exited 0 on SIGTERM",
        bool(exits) and all(code == 0 for code in exits.values()),
        ", ".join(f"{name}: {code}" for name, code in exits.items()),
    )
