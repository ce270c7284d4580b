"""Scenario 1: time from sending a background request (web search on) to its task id.

For each search delay (the fake search engine waits 0, 10 or 30 s), interleaved in random
order within each round: the floor (``GET /healthz`` on the same server, same connection),
Tether's background POST, and the payload-first baseline (its own ``/healthz`` floor and its
POST). Sequential (one client) and concurrent (50 clients, each with its own keep-alive
connection). At delays above 0 the payload-first POST takes the whole delay, so a few of its
samples are sent concurrently while Tether is measured. The WebSocket path (``chat`` to
``task``) is measured against a ``ping`` round trip on the same connection.
"""

from __future__ import annotations

import random

import trio

from bench.context import Bench
from bench.httpclient import HttpConnection
from bench.stats import Op, Samples, interleaved_rounds, ratio
from bench.wsclient import ws_client

SCENARIO = "time_to_task_id"

SEQUENTIAL_GAP_S = 0.01


async def timed_chat_post(
    conn: HttpConnection, body: dict[str, object], samples: Samples, key: str
) -> None:
    """POST a background chat; its time to the 202 with a task id goes to ``key``."""
    answer = await conn.request("POST", "/api/chat/completions", body)
    if answer.status == 202 and "task_id" in answer.json():
        samples.add(key, answer.elapsed)
    else:
        samples.fail(key, f"{answer.status}: {answer.body[:120]!r}")


async def timed_get(conn: HttpConnection, path: str, samples: Samples, key: str) -> None:
    """GET ``path``; its time from sending to the whole answer goes to ``key`` (a 200)."""
    answer = await conn.request("GET", path)
    if answer.status == 200:
        samples.add(key, answer.elapsed)
    else:
        samples.fail(key, f"{answer.status}")


def _client_ops(
    b: Bench,
    tether: HttpConnection,
    pf: HttpConnection,
    samples: Samples,
    mode: str,
    chat_id: str,
    with_pf_post: bool,
) -> list[Op]:
    def body() -> dict[str, object]:
        return b.chat_body(b.marker("q"), chat_id=chat_id, web_search=True, background=True)

    ops: list[Op] = [
        lambda: timed_get(tether, "/healthz", samples, f"floor/{mode}"),
        lambda: timed_chat_post(tether, body(), samples, f"tether/{mode}"),
        lambda: timed_get(pf, "/healthz", samples, f"pf_floor/{mode}"),
    ]
    if with_pf_post:
        ops.append(lambda: timed_chat_post(pf, body(), samples, f"payload_first/{mode}"))
    return ops


async def _sequential(b: Bench, samples: Samples, chat_id: str, delay: float) -> None:
    tether, pf = b.conn(), b.pf_conn()
    try:
        ops = _client_ops(b, tether, pf, samples, "sequential", chat_id, delay == 0)
        # With no search delay each task runs its whole pipeline right after its 202; a short
        # gap lets that work finish, so that it does not land on whichever sample comes next
        # (the concurrent set measures everything under load).
        gap = SEQUENTIAL_GAP_S if delay == 0 else 0.0
        await interleaved_rounds(ops, 5, random.Random(1), gap)  # warm-up, discarded below
        for key in [k for k in samples.values if k.endswith("/sequential")]:
            del samples.values[key]
        await interleaved_rounds(ops, b.cfg.ttid_sequential, random.Random(2), gap)
    finally:
        await tether.aclose()
        await pf.aclose()


async def _concurrent(b: Bench, samples: Samples, chat_id: str, delay: float) -> None:
    n = b.cfg.ttid_concurrent_clients
    conns = [(b.conn(), b.pf_conn()) for _ in range(n)]
    try:
        async with trio.open_nursery() as nursery:
            for tether, _ in conns:
                nursery.start_soon(tether.connect)
        go = trio.Event()

        async def client(i: int, tether: HttpConnection, pf: HttpConnection) -> None:
            ops = _client_ops(b, tether, pf, samples, "concurrent", chat_id, delay == 0)
            await go.wait()
            await interleaved_rounds(ops, b.cfg.ttid_concurrent_rounds, random.Random(100 + i))

        async with trio.open_nursery() as nursery:
            for i, (tether, pf) in enumerate(conns):
                nursery.start_soon(client, i, tether, pf)
            go.set()
    finally:
        for tether, pf in conns:
            await tether.aclose()
            await pf.aclose()


async def _payload_first_delayed(b: Bench, samples: Samples, chat_id: str) -> None:
    """A few payload-first POSTs at once: each takes about the search delay."""

    async def one() -> None:
        conn = b.pf_conn()
        try:
            body = b.chat_body(b.marker("q"), chat_id=chat_id, web_search=True, background=True)
            await timed_chat_post(conn, body, samples, "payload_first/delayed")
        finally:
            await conn.aclose()

    async with trio.open_nursery() as nursery:
        for _ in range(b.cfg.payload_first_delayed):
            nursery.start_soon(one)


async def _websocket(b: Bench, samples: Samples, chat_id: str) -> None:
    async with ws_client(b.ws_url) as client:
        rng = random.Random(3)

        async def ping() -> None:
            samples.add("ws_ping/sequential", await client.ping())

        async def chat() -> None:
            body = b.chat_body(b.marker("q"), chat_id=chat_id, web_search=True)
            rtt, answer = await client.request({"type": "chat", "request": body})
            if answer.get("type") == "task":
                samples.add("ws_chat/sequential", rtt)
            else:
                samples.fail("ws_chat/sequential", str(answer)[:200])

        for _ in range(3):
            await ping()
            await chat()
        samples.values.pop("ws_ping/sequential", None)
        samples.values.pop("ws_chat/sequential", None)
        await interleaved_rounds([ping, chat], b.cfg.ws_chat_samples, rng)


async def run(b: Bench) -> None:
    res = b.results
    headline: list[dict[str, object]] = []
    for delay in b.cfg.search_delays_s:
        await b.reset_fakes()
        await b.fake("search").configure(delay=delay)
        chat_id = f"bench-ttid-{int(delay)}-{b.marker('c')}"
        samples = Samples()
        b.progress.step(
            f"search delay {delay:g} s: sequential x{b.cfg.ttid_sequential}, "
            f"{b.cfg.ttid_concurrent_clients} clients x"
            f"{b.cfg.ttid_concurrent_rounds}"
        )
        async with trio.open_nursery() as nursery:
            if delay > 0:
                nursery.start_soon(_payload_first_delayed, b, samples, chat_id)
            await _sequential(b, samples, chat_id, delay)
            await _concurrent(b, samples, chat_id, delay)
            if b.ws_available:
                await _websocket(b, samples, chat_id + "-ws")
            b.progress.step("  waiting for the payload-first samples" if delay > 0 else "  done")
        stop_s, stopped = await b.stop_chat(chat_id)
        if b.ws_available:  # the WebSocket set's tasks (its session is in its grace period)
            ws_stop_s, ws_stopped = await b.stop_chat(chat_id + "-ws")
            stop_s, stopped = stop_s + ws_stop_s, stopped + ws_stopped
        drained = await b.wait_no_tasks(30)
        prefix = f"delay={delay:g}"
        for key, values in sorted(samples.values.items()):
            res.add_set(
                SCENARIO,
                f"{prefix}/{key}",
                values,
                search_delay_s=delay,
                failures=len(samples.failures.get(key, [])),
            )
        for key, fails in samples.failures.items():
            res.errors.append(f"{SCENARIO} {prefix}/{key}: {len(fails)} failed, e.g. {fails[0]}")
        res.figures.setdefault(SCENARIO + "_cleanup", []).append(
            {
                "search_delay_s": delay,
                "chat_stop_ms": round(stop_s * 1000, 1),
                "tasks_stopped": stopped,
                "drained_s": None if drained is None else round(drained, 2),
            }
        )
        headline.extend(_headline_rows(b, prefix, delay))
    res.figures[SCENARIO] = headline


def _headline_rows(b: Bench, prefix: str, delay: float) -> list[dict[str, object]]:
    res = b.results
    rows: list[dict[str, object]] = []
    for mode in ("sequential", "concurrent"):
        floor = res.get_set(SCENARIO, f"{prefix}/floor/{mode}")
        tether = res.get_set(SCENARIO, f"{prefix}/tether/{mode}")
        pf_floor = res.get_set(SCENARIO, f"{prefix}/pf_floor/{mode}")
        pf = res.get_set(SCENARIO, f"{prefix}/payload_first/{mode}")
        clients = "1" if mode == "sequential" else str(b.cfg.ttid_concurrent_clients)
        if pf is None and mode == "sequential":
            # At delays above 0, a few payload-first requests were sent at once instead.
            pf = res.get_set(SCENARIO, f"{prefix}/payload_first/delayed")
            if pf is not None:
                clients += f" (payload-first: {pf['n']} at once)"
        if floor is None or tether is None:
            continue
        pf_base = pf_floor
        rows.append(
            {
                "path": "HTTP",
                "search_delay_s": delay,
                "clients": clients,
                "floor_p50": floor["p50"],
                "floor_p99": floor["p99"],
                "tether_p50": tether["p50"],
                "tether_p99": tether["p99"],
                "tether_n": tether["n"],
                "tether_ratio_p50": ratio(tether["p50"], floor["p50"]),
                "tether_ratio_p99": ratio(tether["p99"], floor["p99"]),
                "pf_p50": pf["p50"] if pf else None,
                "pf_p99": pf["p99"] if pf else None,
                "pf_n": pf["n"] if pf else 0,
                "pf_ratio_p50": ratio(pf["p50"], pf_base["p50"]) if pf and pf_base else None,
                "pf_ratio_p99": ratio(pf["p99"], pf_base["p99"]) if pf and pf_base else None,
            }
        )
    ping = res.get_set(SCENARIO, f"{prefix}/ws_ping/sequential")
    chat = res.get_set(SCENARIO, f"{prefix}/ws_chat/sequential")
    if ping and chat:
        rows.append(
            {
                "path": "WebSocket",
                "search_delay_s": delay,
                "clients": "1",
                "floor_p50": ping["p50"],
                "floor_p99": ping["p99"],
                "tether_p50": chat["p50"],
                "tether_p99": chat["p99"],
                "tether_n": chat["n"],
                "tether_ratio_p50": ratio(chat["p50"], ping["p50"]),
                "tether_ratio_p99": ratio(chat["p99"], ping["p99"]),
                "pf_p50": None,
                "pf_p99": None,
                "pf_n": 0,
                "pf_ratio_p50": None,
                "pf_ratio_p99": None,
            }
        )
    return rows
