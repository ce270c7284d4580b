"""Scenario 11: capacity per worker, ``tether serve --workers N`` for N = 1, 2, ... cores.

Does capacity grow with cores? The scenario starts its own redis-server and, one after the
other, a fresh ``tether serve --workers N`` on it (``TETHER_BACKEND=redis``), for N from 1
up to the machine's cores (``os.cpu_count()``, or ``workers_max``: ``--max-workers``): every
N up to 4, then doubling, and the cores themselves (1, 2, 3, 4, 8, 16 on 16 cores; 1 and 2 on
2). Each server is warmed up, then gets one level of the scale scenario (its ``run_level``
and client worker processes; one WebSocket client per stream, ``?batch=1``) at the same
load per worker: ``workers_streams`` x N streams of ``workers_tokens`` tokens at
``scale_rate`` tokens/s. The load per worker is about what one worker holds on the 2-core
dev machine (one process on Redis used 96 % of its core at 100 x 50/s), so that each N is
measured near its saturation.

Per N: delivered tokens/s (model tokens reaching clients per second over the scale
scenario's CPU window) against the offered, event lag p50/p99, events lost, the CPU % of
every process, and:

- **delivered per worker**: delivered tokens/s / N. Capacity grows with cores while this
  holds (ratio to one worker near 1.00x) and the lag stays within the bound;
- **tokens per server CPU-second**: delivered tokens per second of the servers' CPU (the
  supervisor's and the workers', over the whole level: 1 / the scale scenario's CPU per
  token): what one fully busy worker core delivers; its ratio to one worker's says what
  splitting across workers costs per token (a lagging server merges more tokens per
  message, which lowers its CPU per token: compare runs whose lag stayed in bound);
- **what the cores allow**: the cores left to the servers by everything else (Redis, the
  fake model, the clients, the bench, and another job's share of the machine's busy time),
  in workers: min(N, (cores x 100 % - their CPU %) / 100 %). On a small machine the clients
  and the fake model share the cores with the workers, so N workers cannot reach N x one;
  this says how far they could.

The level holds when the scale scenario's latency criteria hold (event lag p99 under its
bound, time to task id) and nothing was lost.
"""

from __future__ import annotations

import os
from typing import Any

from bench.context import Bench
from bench.procs import Proc
from bench.scenarios.replicas import (
    WARM_UP,
    Config,
    end_tether,
    level_row,
    pids,
    prefix,
    redis_env,
    servers_cpu_text,
    start_redis,
)
from bench.scenarios.scale import LAG_LIMIT_MS, Spec, Target, run_level, workers_for
from bench.stats import ratio
from bench.workers import WorkerPool

SCENARIO = "workers"


def worker_counts(cores: int) -> list[int]:
    """1, 2, 3, 4, then doubling, and ``cores`` itself: 1..4 at every step, then a
    handful of runs however many cores (8 runs on 64)."""
    counts = list(range(1, min(cores, 4) + 1))
    n = 8
    while n < cores:
        counts.append(n)
        n *= 2
    if counts[-1] != cores:
        counts.append(cores)
    return counts


def capacity(row: dict[str, Any], workers: int, cores: int) -> dict[str, Any]:
    """The per-worker figures of one level on ``--workers N``."""
    delivered = row["delivered_tokens_per_s"] or 0
    # From the server's CPU over the whole level (chats to the last end) per delivered
    # token, the scale scenario's headline: the window's figures mislead once the servers
    # lag by more than the window.
    us_per_token = row["us_per_token"]
    # Everything but the servers: this run's other processes, and another job's share of
    # the machine when the machine's busy time is known.
    others = row["others_cpu_percent"]
    if row.get("machine_cpu_percent") is not None:
        others = max(others, row["machine_cpu_percent"] - row["server_cpu_percent"])
    return {
        "workers": workers,
        "delivered_per_worker": round(delivered / workers),
        "tokens_per_cpu_s": round(1e6 / us_per_token) if us_per_token else None,
        "cores_allowed": round(max(0.0, min(workers, (cores * 100 - others) / 100)), 2),
        "held": bool(row["holds_latency"]) and row["lost"] == 0 and row["out_of_order"] == 0,
    }


async def run(b: Bench) -> None:
    res = b.results
    cfg = b.cfg
    cores = cfg.workers_max or os.cpu_count() or 1
    counts = worker_counts(cores)
    try:
        redis = await start_redis(b)
    except ImportError as exc:
        res.notes.append(f"workers skipped: no redis-server binary ({exc})")
        return
    rows: list[dict[str, Any]] = []
    exits: dict[str, int | None] = {}
    most = cfg.workers_streams * counts[-1]
    pool = WorkerPool(b.procs, workers_for(most, max(cfg.scale_max_workers, cores)))
    try:
        await pool.start()
        b.progress.step(
            f"redis :{redis.port} (pid {redis.pid}); --workers {', '.join(map(str, counts))}"
            f" at {cfg.workers_streams} streams x {cfg.scale_rate:g} tokens/s per worker"
        )
        for n in counts:
            rows.append(await _one(b, pool, redis, n, cores, exits))
    finally:
        await pool.stop()
        b.procs.end(redis)
        one = rows[0] if rows else None
        for row in rows:
            row["per_worker_over_one"] = ratio(
                row["delivered_per_worker"], one["delivered_per_worker"] if one else None
            )
            row["delivered_over_one"] = ratio(
                row["delivered_tokens_per_s"], one["delivered_tokens_per_s"] if one else None
            )
            row["per_cpu_over_one"] = ratio(
                row["tokens_per_cpu_s"], one["tokens_per_cpu_s"] if one else None
            )
        res.figures[SCENARIO] = {
            "cores": os.cpu_count(),
            "max_workers": cores,
            "streams_per_worker": cfg.workers_streams,
            "rate": cfg.scale_rate,
            "tokens": cfg.workers_tokens,
            "lag_limit_ms": LAG_LIMIT_MS,
            "levels": rows,
            "exit_codes": exits,
        }
    res.check(
        "workers: every --workers server exited 0 on SIGTERM",
        all(code == 0 for code in exits.values()),
        ", ".join(f"{name}: {code}" for name, code in exits.items()),
    )


async def _one(
    b: Bench, pool: WorkerPool, redis: Proc, n: int, cores: int, exits: dict[str, int | None]
) -> dict[str, Any]:
    """``--workers n`` on Redis, fresh: warmed up, then one level at n times the load per
    worker; ended after."""
    cfg = b.cfg
    name = f"tether_w{n}"
    args = ["--workers", str(n)] if n > 1 else []
    proc = await b.start_tether(name, redis_env(redis, prefix()), args, replicas=n)
    try:
        config = Config(f"w{n}", f"--workers {n}", proc, b.proc_rss_mb(proc))
        b.progress.step(f"{name} :{proc.port} (pids {pids(proc)})")
        target = Target(proc, SCENARIO, config.rss_at_start_mb)
        await run_level(b, pool, Spec(WARM_UP[0] * n, cfg.scale_rate, WARM_UP[1]), target)
        spec = Spec(cfg.workers_streams * n, cfg.scale_rate, cfg.workers_tokens)
        found = await run_level(b, pool, spec, target)
        row = {**level_row(config, found, cores), "holds_latency": found["holds_latency"]}
    finally:
        end_tether(b, proc, exits)
    row.update(capacity(row, n, cores))
    b.progress.step(
        f"--workers {n}: {row['delivered_tokens_per_s']} tokens/s delivered (offered "
        f"{row['offered_tokens_per_s']}), {row['delivered_per_worker']} per worker, "
        f"{row['tokens_per_cpu_s']} per server CPU-second; lag p50/p99 {row['lag_p50']}/"
        f"{row['lag_p99']} ms, lost {row['lost']}; CPU % {servers_cpu_text(row, name)}"
    )
    return row
