"""The run's outputs: ``<name>.json``, ``<name>.md`` (quoted in docs/benchmarks.md) and charts."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from bench.results import RESULTS_DIR, Results


def _ms(value: Any) -> str:
    if value is None:
        return "–"
    value = float(value)
    if value >= 1000:
        return f"{value / 1000:.2f} s"
    if value >= 100:
        return f"{value:.0f}"
    if value >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _dur(value_ms: Any) -> str:
    """A duration in ms for running text, with its unit."""
    text = _ms(value_ms)
    return text if text.endswith(" s") or text == "–" else text + " ms"


def _x(value: Any) -> str:
    if value is None:
        return "–"
    value = float(value)
    return f"{value:.0f}×" if value >= 100 else f"{value:.1f}×" if value >= 10 else f"{value:.2f}×"


def _pair(a: Any, b: Any, fmt: Any = _ms) -> str:
    return f"{fmt(a)} / {fmt(b)}"


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return out


def _time_to_task_id(res: Results) -> list[str]:
    rows = res.figures.get("time_to_task_id") or []
    if not rows:
        return []
    out = [
        "## 1. Time to task id",
        "",
        "Background request with web search on, from sending it to the 202 (WebSocket: "
        "`chat` to `task`). Floor: `GET /healthz` on the same server and connection "
        "(WebSocket: `ping`), interleaved in random order. Payload-first: the same "
        "pipeline answering only after search and page fetches, against its own "
        "`/healthz` floor. p50 / p99.",
        "",
    ]
    table = []
    for r in rows:
        table.append(
            [
                str(r["path"]),
                f"{r['search_delay_s']:g} s",
                str(r["clients"]),
                _pair(r["floor_p50"], r["floor_p99"]),
                _pair(r["tether_p50"], r["tether_p99"]),
                f"**{_pair(r['tether_ratio_p50'], r['tether_ratio_p99'], _x)}**",
                _pair(r["pf_p50"], r["pf_p99"]),
                _pair(r["pf_ratio_p50"], r["pf_ratio_p99"], _x),
            ]
        )
    out += _table(
        [
            "path",
            "search delay",
            "clients",
            "floor ms",
            "Tether ms",
            "Tether / floor",
            "payload-first ms",
            "payload-first / floor",
        ],
        table,
    )
    cleanup = res.figures.get("time_to_task_id_cleanup") or []
    if cleanup:
        out += [
            "",
            "After each set, one `POST /api/chats/{id}/stop` stopped all of its tasks "
            "still running: "
            + "; ".join(
                f"delay {c['search_delay_s']:g} s: {c.get('tasks_stopped', '?')} tasks in "
                f"{_dur(c['chat_stop_ms'])}"
                for c in cleanup
            )
            + ".",
        ]
    return out + [""]


def _stop_latency(res: Results) -> list[str]:
    rows = res.figures.get("stop_latency") or []
    if not rows:
        return []
    out = [
        "## 2. Stop latency",
        "",
        "From sending the stop to: the HTTP answer; the `task:cancelled` event at a "
        "subscribed client; the fake upstream seeing its connection closed (its "
        "CLOCK_MONOTONIC record). p50 / p99 in ms, and p50 as a multiple of a WebSocket "
        "`ping` round trip measured in the same run.",
        "",
    ]
    table = []
    for r in rows:
        table.append(
            [
                str(r["phase"]),
                str(r["transport"]),
                str(r["n"]),
                _pair(r.get("answer_p50"), r.get("answer_p99")),
                _pair(r.get("cancelled_p50"), r.get("cancelled_p99")),
                _pair(r.get("upstream_p50"), r.get("upstream_p99")),
                _x(r.get("cancelled_ratio_p50")),
                str(r.get("ended_in", "")),
            ]
        )
    out += _table(
        [
            "phase",
            "stop by",
            "n",
            "answer ms",
            "`task:cancelled` ms",
            "upstream closed ms",
            "cancelled / ping",
            "ended in phase",
        ],
        table,
    )
    ping = res.figures.get("stop_latency_ping")
    if ping:
        out += [
            "",
            f"WebSocket ping round trip (baseline): p50 {_dur(ping['p50'])}, "
            f"p99 {_dur(ping['p99'])} (n={ping['n']}).",
        ]
    mcp = [r for r in rows if str(r["phase"]).startswith("mcp_")]
    if mcp:
        out += [
            "",
            "MCP rows (`mcp_stdio`: the MCP server over stdio, `mcp_http`: over "
            "streamable HTTP; the model calls its `slow` tool for an hour and the stop "
            'goes once the server has the call): "upstream closed" is the MCP server '
            "seeing the cancel, the first of its records below (CLOCK_MONOTONIC; a stdio "
            "server's records are stamped as they reach the recorder). p50 / p99 in ms "
            "from the stop; upstream / ping is the p50 ratio.",
            "",
        ]
        out += _table(
            [
                "phase",
                "stop by",
                "`notifications/cancelled` ms",
                "HTTP stream closed ms (by)",
                "tool cancelled ms",
                "upstream / ping",
            ],
            [
                [
                    str(r["phase"]),
                    str(r["transport"]),
                    _pair(r.get("notified_p50"), r.get("notified_p99")),
                    (
                        _pair(r.get("stream_closed_p50"), r.get("stream_closed_p99"))
                        + f" ({r.get('stream_closed_by') or '–'})"
                    )
                    if "stream_closed_p50" in r
                    else "–",
                    _pair(r.get("tool_cancelled_p50"), r.get("tool_cancelled_p99")),
                    _x(r.get("upstream_ratio_p50")),
                ]
                for r in mcp
            ],
        )
    return out + [""]


def _disconnect(res: Results) -> list[str]:
    rows = res.figures.get("disconnect") or []
    if not rows:
        return []
    out = [
        "## 3. Disconnect latency",
        "",
        "The client closes its socket mid-search or mid-generation; time until the fake "
        "upstream sees its connection closed. p50 / p99 / max in ms.",
        "",
    ]
    table = [
        [
            str(r["client"]),
            str(r["phase"]),
            str(r["n"]),
            f"{_ms(r['p50'])} / {_ms(r['p99'])} / {_ms(r['max'])}",
            str(r.get("status", "")),
        ]
        for r in rows
    ]
    out += _table(["client", "phase", "n", "to upstream closed ms", "task ended as"], table)
    return out + [""]


def _scale(res: Results) -> list[str]:
    fig = res.figures.get("scale") or {}
    rows = [*(fig.get("levels") or []), *(fig.get("extra_levels") or [])]
    if not rows:
        return []
    out = [
        "## 4. Scale",
        "",
        f"Concurrent background tasks, each streaming {fig.get('tokens')} tokens (1,000-task "
        "level: fewer, slower) from the fake model to its own WebSocket client (clients "
        "spread over worker processes; Tether's connect with `?batch=1` unless marked "
        "unbatched). Ramp: from sending the chats until every client has its first token. "
        "Time to task id: probe requests from then on, over the first half of the "
        "streaming left, interleaved with the `/healthz` floor. Event lag (every token, "
        "the ramp's included): arrival at the client minus the "
        "fake's send schedule (so it includes any lag of the fake itself). KB per task: the "
        "server's peak RSS above its RSS at start-up, divided by the tasks; per added task: its "
        "rise over the previous level's peak, divided by the added tasks (judged from "
        f"{fig.get('kb_judged_from_tasks', 100)} tasks up: below that, a few MB lost in the "
        "heap's one-off growth). Holds: task id "
        f"p99 < {fig.get('ttid_limit_ms', 50):g} ms and ≤ {fig.get('ttid_floor_ratio', 2):g}× "
        f"the floor p99, lag p99 < {fig.get('lag_limit_ms', 100):g} ms, nothing lost, "
        f"≤ {fig.get('kb_per_task_limit', 64):g} KB per added task. CPU: % of one core over the "
        "second half of the streaming (the probe stopped) for the server / model fake / "
        "each client worker / bench; this machine has "
        f"{res.machine.get('cores')} cores, shared by all of them.",
        "",
    ]
    table = []
    for r in rows:
        table.append(
            [
                str(r["tasks"]),
                f"{r.get('rate', fig.get('rate')):g}",
                "yes" if r.get("batch", True) else "no",
                f"{r['ramp_s']:.2f}" if r.get("ramp_s") is not None else "–",
                _pair(r["ttid_p50"], r["ttid_p99"]),
                _pair(r["floor_p50"], r["floor_p99"]),
                _pair(r["ttid_ratio_p50"], r["ttid_ratio_p99"], _x),
                _pair(r["lag_p50"], r["lag_p99"]),
                f"{r['lost']} / {r['out_of_order']} / {r.get('undelivered', 0)} / "
                f"{r.get('closed_connections', 0)}",
                _us(r.get("us_per_token")),
                _cpu(r),
                f"{r['peak_rss_mb']:.0f}",
                f"{r['kb_per_task']:.0f}" if r.get("kb_per_task") is not None else "–",
                f"{r['kb_per_task_marginal']:.0f}"
                if r.get("kb_per_task_marginal") is not None
                else "–",
                "yes" if r["holds"] else "no",
            ]
        )
    out += _table(
        [
            "tasks",
            "tokens/s each",
            "batched",
            "ramp s",
            "task id ms",
            "floor ms",
            "task id / floor",
            "event lag ms",
            "events lost / out of order / undelivered / connections closed",
            "server µs per token",
            "CPU % server / model / clients / bench",
            "server peak RSS MB",
            "KB per task",
            "KB per added task",
            "holds",
        ],
        table,
    )
    limit = fig.get("highest_level_held")
    out += [
        "",
        f"Highest level held at {fig.get('rate', 50):g} tokens/s: **{limit}** tasks."
        if limit
        else f"No level held at {fig.get('rate', 50):g} tokens/s.",
    ]
    per_token = fig.get("per_token_cpu") or []
    if per_token:
        out += [
            "",
            "### CPU per delivered token: Tether and the relay floor",
            "",
            "The same streams against the relay floor (`baselines/relay_floor.py`: raw ASGI "
            "on hypercorn, one httpx2 stream per chat, each model chunk relayed as one "
            "WebSocket frame). Server CPU seconds (user + system) from the chats to the "
            "last end, divided by the model tokens delivered to clients (a token merged "
            "with others into one event or batch counts once); Tether's includes the "
            "probe. CPU %: the second half of the streaming, server / model / clients.",
            "",
        ]
        table = []
        for r in per_token:
            t_cpu, f_cpu = r.get("tether_cpu_window") or {}, r.get("floor_cpu_window") or {}
            table.append(
                [
                    str(r["tasks"]),
                    f"{r['rate']:g}",
                    "yes" if r.get("batch") else "no",
                    _us(r["tether_us_per_token"]),
                    _us(r["floor_us_per_token"]),
                    f"**{_x(r['ratio'])}**",
                    f"{r['tether_messages_per_token']}"
                    if r.get("tether_messages_per_token") is not None
                    else "–",
                    _pair(r.get("tether_lag_p99"), r.get("floor_lag_p99")),
                    _cpu_short(t_cpu, "tether"),
                    _cpu_short(f_cpu, "relay_floor"),
                ]
            )
        out += _table(
            [
                "tasks",
                "tokens/s each",
                "Tether batched",
                "Tether µs/token",
                "floor µs/token",
                "Tether / floor",
                "Tether WS messages per token",
                "lag p99 ms Tether / floor",
                "CPU % (Tether run)",
                "CPU % (floor run)",
            ],
            table,
        )
    return out + [""]


def _us(value: Any) -> str:
    return "–" if value is None else f"{float(value):.0f}"


def _clients(cpu: dict[str, Any]) -> str:
    values = [f"{v:.0f}" for k, v in sorted(cpu.items()) if k.startswith("client") and v > 0.5]
    return "+".join(values) or "0"


def _cpu_short(cpu: dict[str, Any], server: str) -> str:
    return f"{cpu.get(server, 0):.0f} / {cpu.get('model', 0):.0f} / {_clients(cpu)}"


def _cpu(row: dict[str, Any]) -> str:
    cpu = row.get("cpu_percent_window") or row.get("cpu_percent_by_process") or {}
    return (
        f"{cpu.get('tether', 0):.0f} / {cpu.get('model', 0):.0f} / {_clients(cpu)} / "
        f"{cpu.get('bench', 0):.0f}"
    )


def _waiting(res: Results) -> list[str]:
    r = res.figures.get("waiting")
    if not r:
        return []
    out = [
        "## 6. Many waiting tasks",
        "",
        f"{r['waiting_tasks']} tasks, each with its own WebSocket client, wait on a web "
        f"search that takes {r['search_delay_s']:g} s (their chats sent in one burst), "
        f"while {r['streams']} others stream; then one `POST /api/chats/{{id}}/stop` "
        "stops the waiting ones.",
        "",
    ]
    cpu = r.get("cpu_percent_by_process") or {}
    table = [
        [
            "time to task id p50 / p99 ms (probe, while they wait)",
            _pair(r["ttid_p50"], r["ttid_p99"]),
        ],
        ["floor (`/healthz`) p50 / p99 ms", _pair(r["floor_p50"], r["floor_p99"])],
        ["task id / floor p50 / p99", _pair(r["ttid_ratio_p50"], r["ttid_ratio_p99"], _x)],
        [
            f"`chat` to `task`, burst of {r['chat_n']} p50 / p99 ms",
            _pair(r["chat_p50"], r["chat_p99"]),
        ],
        ["every search request at the fake after", f"{r['all_waiting_s']} s"],
        [
            "server RSS before the clients / with all waiting MB",
            f"{r['rss_before_mb']:.0f} / {r['rss_waiting_mb']:.0f}",
        ],
        [
            "server memory per waiting task (task, session, WebSocket, pending search)",
            f"**{r['kb_per_waiting_task']:.0f} KB**",
        ],
        ["streams beside them: lag p50 / p99 ms", _pair(r["stream_lag_p50"], r["stream_lag_p99"])],
        ["chat stop: answer / tasks stopped", f"{_dur(r['stop_ms'])} / {r['stopped']}"],
        [
            "client terminal events",
            ", ".join(f"{k}: {v}" for k, v in sorted(r["terminals"].items())),
        ],
        [
            "left afterwards: tasks / open search connections",
            f"{r['tasks_left']} / {r['search_connections_left']}",
        ],
        [
            "CPU % server / model / clients / bench (while streaming)",
            f"{cpu.get('tether', 0):.0f} / {cpu.get('model', 0):.0f} / {_clients(cpu)} / "
            f"{cpu.get('bench', 0):.0f}",
        ],
    ]
    out += _table(["", ""], table)
    return out + [""]


def _storm(res: Results) -> list[str]:
    fig = res.figures.get("cancel_storm")
    if not fig:
        return []
    out = [
        "## 5. Cancel storm",
        "",
        f"{fig['tasks']} tasks cancelled at random points "
        f"({fig.get('concurrency')} at a time, {fig['duration_s']:.0f} s), by HTTP stop, "
        "WebSocket stop and client disconnect, after a warm-up storm of "
        f"{fig.get('warmup_tasks')} tasks (a first storm raises the allocator's high-water "
        "mark once; later ones do not move it).",
        "",
    ]
    table = [
        ["tasks ended as", ", ".join(f"{k}: {v}" for k, v in sorted(fig["outcomes"].items()))],
        ["phases at cancel", ", ".join(f"{k}: {v}" for k, v in sorted(fig["phases"].items()))],
        ["HTTP stop answer p50 / p99 ms", _pair(fig.get("stop_p50"), fig.get("stop_p99"))],
        [
            "floor (`GET /healthz` every 20 ms during the storm) p50 / p99 ms",
            _pair(fig.get("floor_p50"), fig.get("floor_p99")),
        ],
        [
            "WebSocket stop to `task:cancelled` at that client p50 / p99 / max ms",
            f"{_ms(fig.get('ws_cancelled_p50'))} / {_ms(fig.get('ws_cancelled_p99'))} / "
            f"{_ms(fig.get('ws_cancelled_max'))}",
        ],
        [
            "stop answer / floor p50 / p99",
            _pair(fig.get("stop_ratio_p50"), fig.get("stop_ratio_p99"), _x),
        ],
        ["CPU % server / model fake / bench client during the storm", _cpu(fig)],
        [
            "registry empty after",
            f"{fig['drained_s']} s" if fig.get("drained_s") is not None else "never (timeout)",
        ],
        [
            "idle keep-alive connections at the fakes after the storm",
            ", ".join(f"{k}: {v}" for k, v in fig["open_connections"].items()),
        ],
        [
            "connections left open after the pool's keep-alive expiry",
            ", ".join(f"{k}: {v}" for k, v in fig["leaked_connections"].items()),
        ],
        [
            "server RSS before warm-up / start / peak / end MB",
            f"{fig['rss_cold_mb']:.1f} / {fig['rss_start_mb']:.1f} / {fig['rss_peak_mb']:.1f} / "
            f"{fig['rss_end_mb']:.1f}",
        ],
    ]
    out += _table(["", ""], table)
    return out + [""]


# CPU % of the machine beyond the run's own processes above which a level's figures are
# flagged as shared with another job.
FOREIGN_CPU_WARNING = 20.0


def _replicas(res: Results) -> list[str]:
    fig = res.figures.get("replicas") or {}
    if not fig:
        return []
    out = [
        "## 7. Replicas on one Redis",
        "",
        "The scenario's own redis-server and Tether processes (`TETHER_BACKEND=redis`); "
        "the bench's memory-backend server is not involved. Samples of the two arms are "
        "interleaved in pairs, in random order. p50 / p99 in ms.",
        "",
    ]
    stop = fig.get("stop")
    if stop:
        same, cross, r = stop["same"], stop["cross"], stop["ratio"]
        out += [
            "### Stop via another replica",
            "",
            "A background task streams on replica A (a long, slow model stream); once the "
            "fake model has its request, `POST /api/tasks/{id}/stop` goes to A or to B. "
            "From sending the stop to its HTTP answer, and to the fake model recording "
            "the task's connection closed.",
            "",
        ]
        out += _table(
            ["stop sent to", "n", "answer ms", "upstream closed ms", "ended in phase"],
            [
                [
                    "A (the task's replica)",
                    str(same["n"]),
                    _pair(same["answer"]["p50"], same["answer"]["p99"]),
                    _pair(same["upstream"]["p50"], same["upstream"]["p99"]),
                    ", ".join(same["ended_in"]),
                ],
                [
                    "B (another replica)",
                    str(cross["n"]),
                    _pair(cross["answer"]["p50"], cross["answer"]["p99"]),
                    _pair(cross["upstream"]["p50"], cross["upstream"]["p99"]),
                    ", ".join(cross["ended_in"]),
                ],
                [
                    "**B / A**",
                    "",
                    f"**{_pair(r['answer_p50'], r['answer_p99'], _x)}**",
                    f"**{_pair(r['upstream_p50'], r['upstream_p99'], _x)}**",
                    "",
                ],
            ],
        )
        met = "met" if stop["goal_met"] else "not met"
        out += [
            "",
            f"Goal: a stop via another replica answered and its upstream closed "
            f"within {stop['goal_ms']:g} ms at p99: **{met}** (answer p99 "
            f"{_dur(cross['answer']['p99'])}, upstream closed p99 "
            f"{_dur(cross['upstream']['p99'])}).",
            "",
        ]
    resume = fig.get("resume")
    if resume:
        same, cross, r = resume["same"], resume["cross"], resume["ratio"]
        out += [
            "### Resume from another replica",
            "",
            f"A task streams on A at {resume['rate']:g} tokens/s; a WebSocket client "
            f"(`?batch=1`) on A or on B sends `subscribe` with `after` "
            f"{resume['back']} events before the task's last one, and collects the "
            f"replayed events and {resume['live']} live ones. From sending `subscribe` to "
            "the first event's arrival; a violation is a place where the seqs do not go "
            "on by one from `after`.",
            "",
        ]
        out += _table(
            ["subscribed on", "n", "first event ms", "violations (samples)", "errors"],
            [
                [
                    "A (the task's replica)",
                    str(same["n"]),
                    _pair(same["first_event"]["p50"], same["first_event"]["p99"]),
                    f"{same['violations']} ({same['samples_with_violations']})",
                    str(same["errors"]),
                ],
                [
                    "B (another replica)",
                    str(cross["n"]),
                    _pair(cross["first_event"]["p50"], cross["first_event"]["p99"]),
                    f"{cross['violations']} ({cross['samples_with_violations']})",
                    str(cross["errors"]),
                ],
                ["**B / A**", "", f"**{_pair(r['p50'], r['p99'], _x)}**", "", ""],
            ],
        )
        out.append("")
    scale = fig.get("scale")
    if scale and scale.get("levels"):
        out += _replicas_scale(scale)
    return out


def _replicas_scale(scale: dict[str, Any]) -> list[str]:
    cores = scale.get("cores")
    out = [
        "### Scale: one process, two workers",
        "",
        f"The scale scenario's streams ({scale['tokens']} tokens at {scale['rate']:g} "
        "tokens/s each, one WebSocket client each, `?batch=1`) against a fresh "
        "memory-backend process (the reference), a Redis-backend process and "
        "`serve --workers 2` on Redis, one after the other. Delivered tokens/s: model "
        "tokens reaching clients per second over the second half of the streaming. "
        "µs per token: server CPU (for `--workers 2`, supervisor + both workers) from "
        "the chats to the last end, per delivered token. CPU %: of one core, over the "
        f"second half of the streaming; this machine has {cores} cores "
        f'({(cores or 0) * 100} %), shared by every process; "machine" is the whole '
        'machine\'s busy time over the same window, and what it has above "all" was '
        "not this run's (another job on the machine).",
        "",
    ]
    table = []
    for r in scale["levels"]:
        table.append(
            [
                str(r["label"]),
                str(r["tasks"]),
                f"{r['delivered_tokens_per_s']} / {r['offered_tokens_per_s']}",
                _pair(r["lag_p50"], r["lag_p99"]),
                f"{r['lost']} / {r['out_of_order']} / {r['undelivered']} / "
                f"{r['closed_connections']}",
                _us(r["us_per_token"]),
                _servers_cpu(r),
                f"{r['total_cpu_percent']:.0f} / {_us(r.get('machine_cpu_percent'))}",
            ]
        )
    out += _table(
        [
            "server",
            "tasks",
            "tokens/s delivered / offered",
            "event lag ms",
            "events lost / out of order / undelivered / connections closed",
            "server µs per token",
            "CPU % server(s) / redis / model / clients / bench",
            "CPU % all / machine",
        ],
        table,
    )
    out.append("")
    for c in scale.get("comparisons") or []:
        w = c["w2_over_w1"]
        text = (
            f"{c['tasks']} tasks: `--workers 2` / 1 process (both on Redis): event lag "
            f"p50 {_x(w['lag_p50'])}, p99 {_x(w['lag_p99'])}, server CPU per token "
            f"{_x(w['us_per_token'])}, delivered tokens/s {_x(w['delivered_tokens_per_s'])}."
        )
        mem = c.get("redis_over_memory")
        if mem:
            text += (
                f" Redis / memory backend (1 process): CPU per token "
                f"{_x(mem['us_per_token'])}, event lag p99 {_x(mem['lag_p99'])}."
            )
        found = c.get("sentinel_over_url")
        if found:
            text += (
                f" Redis found through Sentinel / at its URL (1 process): CPU per token "
                f"{_x(found['us_per_token'])}, event lag p99 {_x(found['lag_p99'])}."
            )
        text += (
            f" What the cores allow: in the 2-worker run every process together used "
            f"{c['total_cpu_percent_w2']:.0f} % of {(cores or 0) * 100} %, the "
            f"processes other than Tether's {c['others_cpu_percent']:.0f} %, so the "
            f"two workers could have had at most {_x(c['gain_allowed'])} the one core a "
            f"single process can use; the single process used "
            f"{c['one_worker_cpu_percent']:.0f} % of its core, so "
            + (
                "it was the bottleneck."
                if c["one_worker_cpu_percent"] >= 90
                else "this level did not need a second worker: the ratios show what splitting "
                "costs, not a capacity gain."
            )
        )
        foreign = c.get("foreign_cpu_percent")
        if foreign is not None and foreign >= FOREIGN_CPU_WARNING:
            text += (
                f" **Beware**: in one of these runs the machine was busy {foreign:.0f} % "
                "of a core beyond this run's processes (another job shared the cores), "
                "which moves the figures of this level."
            )
        out += [text, ""]
    return out


def _servers_cpu(r: dict[str, Any]) -> str:
    """CPU % server(s) / redis / model / clients / bench of a level on a server of the
    replicas or workers scenario (a ``--workers`` server's as its supervisor's + each
    worker's)."""
    window = r["cpu_percent_window"]
    clients = sum(v for k, v in window.items() if k.startswith("client"))
    servers = "+".join(f"{v:.0f}" for k, v in window.items() if k.split("/")[0] == r["server"])
    return (
        f"{servers} / {r['redis_cpu_percent']:.0f} / {window.get('model', 0):.0f} / "
        f"{clients:.0f} / {window.get('bench', 0):.0f}"
    )


def _responses(res: Results) -> list[str]:
    fig = res.figures.get("responses")
    if not fig:
        return []
    out = [
        "## 8. The Responses API",
        "",
        "Time to the background Response: `POST /v1/responses` with `background: true`, "
        "from sending it to the 200 (status `queued`), plain (the model answers at once) "
        "and with the `web_search` tool (the search engine never answers: the Response "
        "comes before any search). Floor: `GET /healthz` on the same server and "
        "connection; beside it the chat route's background POST with the same work "
        "(`POST /api/chat/completions`, web search off and on, to its 202): all "
        "interleaved in random order. p50 / p99.",
        "",
    ]
    out += _table(
        [
            "body",
            "clients",
            "n",
            "floor ms",
            "Response ms",
            "Response / floor",
            "chat route ms",
            "chat / floor",
            "Response / chat",
        ],
        [
            [
                str(r["body"]),
                str(r["clients"]),
                str(r["n"]),
                _pair(r["floor_p50"], r["floor_p99"]),
                _pair(r["response_p50"], r["response_p99"]),
                f"**{_pair(r['ratio_p50'], r['ratio_p99'], _x)}**",
                _pair(r.get("chat_p50"), r.get("chat_p99")),
                _pair(r.get("chat_ratio_p50"), r.get("chat_ratio_p99"), _x),
                _pair(r.get("response_chat_ratio_p50"), r.get("response_chat_ratio_p99"), _x),
            ]
            for r in fig.get("time_to_response") or []
        ],
    )
    held = res.figures.get("responses_held_cancel") or {}
    if held:
        out += [
            "",
            f"The {held['responses']} web-search responses, still waiting on the search, "
            f"were then cancelled at once: {held['cancelled']} answered `cancelled`.",
        ]
    floor = fig.get("cancel_floor") or {}
    out += [
        "",
        "Cancel: a background response held in a phase (the search hangs; the pages "
        "hang; a slow token stream, cancelled after its first text delta), then "
        "`POST /v1/responses/{id}/cancel` or, interleaved, the task route's "
        "`POST /api/tasks/{id}/stop` on the same response (the baseline: a response is a "
        "task). From sending it to its answer; to the stream's `response.incomplete` at a "
        "client following the response; to the fake upstream recording every connection "
        "of the response closed (CLOCK_MONOTONIC). p50 / p99 in ms; upstream closed "
        "cancel / task stop. Floor: `GET /healthz` before each sample, p50 / p99 "
        f"{_pair(floor.get('p50'), floor.get('p99'))} ms (n={floor.get('n')}).",
        "",
    ]
    out += _table(
        [
            "phase",
            "by",
            "n",
            "answer ms",
            "`response.incomplete` ms",
            "upstream closed ms",
            "upstream closed / task stop",
        ],
        [
            [
                str(r["phase"]),
                "Responses cancel" if r["by"] == "cancel" else "task stop",
                str(r["n"]),
                _pair(r["answer_p50"], r["answer_p99"]),
                _pair(r["terminal_p50"], r["terminal_p99"]),
                _pair(r["upstream_p50"], r["upstream_p99"]),
                _pair(r["upstream_ratio_p50"], r["upstream_ratio_p99"], _x)
                if r["by"] == "cancel"
                else "–",
            ]
            for r in fig.get("cancel") or []
        ],
    )
    out += [
        "",
        "Resume: a completed response; `GET /v1/responses/{id}?stream=true` with "
        f"`starting_after` {fig.get('resume_back')} events before its end, from sending it "
        "to its first event, against a fresh stream's first event (no `starting_after`) "
        "and `/healthz`, interleaved on one connection; every stream read to its end and "
        "checked against the full replay. p50 / p99.",
        "",
    ]
    out += _table(
        [
            "tokens",
            "events in the log",
            "n",
            "floor ms",
            "fresh stream ms",
            "resumed ms",
            "resumed / fresh",
            "resumed / floor",
        ],
        [
            [
                str(r["tokens"]),
                str(r["events"]),
                str(r["n"]),
                _pair(r["floor_p50"], r["floor_p99"]),
                _pair(r["fresh_p50"], r["fresh_p99"]),
                _pair(r["resumed_p50"], r["resumed_p99"]),
                f"**{_pair(r['resumed_fresh_ratio_p50'], r['resumed_fresh_ratio_p99'], _x)}**",
                _pair(r["resumed_floor_ratio_p50"], r["resumed_floor_ratio_p99"], _x),
            ]
            for r in fig.get("resume") or []
        ],
    )
    return out + [""]


def _steering(res: Results) -> list[str]:
    fig = res.figures.get("steering")
    if not fig:
        return []
    deadline = fig.get("deadline_s")
    out = [
        "## 9. Steering a running task",
        "",
        "Skip: a background task held in one step by a fake that does not answer (the "
        "search; one of the three result pages, `/page/1`, the others answering at once; a "
        "`fetch_url` call of a page that hangs), then `POST /api/tasks/{id}/skip` of that "
        "step (`web_search`, `page:<url>`, the `tool_call_id`); the floor is the same task "
        "stopped instead (`POST /api/tasks/{id}/stop`, stop_latency's sample), interleaved "
        "in random order. From sending it to its answer and to the fake recording the "
        "step's connection closed (CLOCK_MONOTONIC). p50 / p99 in ms; the server's own "
        "`stop_ms` (from its `task:cancelled`) beside the stop.",
        "",
    ]
    out += _table(
        [
            "step",
            "n",
            "skip answer ms",
            "skip → closed ms",
            "stop answer ms",
            "stop → closed ms",
            "server `stop_ms`",
            "skip / stop (closed)",
        ],
        [
            [
                str(r["kind"]),
                str(r["n"]),
                _pair(r["skip_answer_p50"], r["skip_answer_p99"]),
                _pair(r["skip_closed_p50"], r["skip_closed_p99"]),
                _pair(r["stop_answer_p50"], r["stop_answer_p99"]),
                _pair(r["stop_closed_p50"], r["stop_closed_p99"]),
                _pair(r["server_stop_ms_p50"], r["server_stop_ms_p99"]),
                f"**{_pair(r['ratio_p50'], r['ratio_p99'], _x)}**",
            ]
            for r in fig.get("skip") or []
        ],
    )
    out += [
        "",
        f"Deadline: a streaming chat with `deadlines.<phase>` = {deadline} s and the step "
        "hanging; how late after the deadline the fake records the step's connection "
        "closed: from the request's send time + the deadline (an upper bound: the deadline "
        "runs from the step's start, after the task began, and for a tool call after the "
        "model's first round), and from the step's request reaching the fake + the "
        "deadline (a lower bound: the step began before). Against the stop of the same "
        "step (same run, interleaved). p50 / p99 in ms.",
        "",
    ]
    out += _table(
        [
            "deadline",
            "n",
            "closed after the deadline ms",
            "from the step's request ms",
            "stop → closed ms",
            "late / stop",
        ],
        [
            [
                f"`{r['deadline']}`",
                str(r["n"]),
                _pair(r["late_p50"], r["late_p99"]),
                _pair(r["late_from_step_p50"], r["late_from_step_p99"]),
                _pair(r["stop_closed_p50"], r["stop_closed_p99"]),
                f"**{_pair(r['ratio_p50'], r['ratio_p99'], _x)}**",
            ]
            for r in fig.get("deadline") or []
        ],
    )
    ft = fig.get("first_token") or {}
    if ft:
        out += [
            "",
            f"First token after a search deadline: the `web_search_s` = {deadline} s streams "
            "above, from the deadline (request + deadline; or the search request at the fake "
            "+ deadline) to the answer's first content chunk; the floor is a streaming chat "
            "without web search, from sending it to its first content chunk, interleaved on "
            "the same connection. p50 / p99 in ms.",
            "",
        ]
        out += _table(
            ["n", "after the deadline ms", "from the search request ms", "floor ms", "ratio"],
            [
                [
                    str(ft["n"]),
                    _pair(ft["after_deadline_p50"], ft["after_deadline_p99"]),
                    _pair(ft["from_step_p50"], ft["from_step_p99"]),
                    _pair(ft["floor_p50"], ft["floor_p99"]),
                    f"**{_pair(ft['ratio_p50'], ft['ratio_p99'], _x)}**",
                ]
            ],
        )
    return out + [""]


def _followers(res: Results) -> list[str]:
    fig = res.figures.get("followers") or {}
    levels = fig.get("levels") or []
    if not levels:
        return []
    setups = fig.get("redis") or ["one"]
    named = setups != ["one"]
    out = [
        "## 10. Followers on another replica",
        "",
        f"{fig['tasks']} tasks stream on replica A ({fig['tokens']} tokens at "
        f"{fig['rate']:g} tokens/s each); WebSocket followers (`?batch=1`, `subscribe` with "
        f"`after` 0) on A ({fig['on_a_per_task']} per task: A's own followers, the floor) "
        "and on B (per level), spread alike over the same client workers. B's Redis "
        "connections: `CLIENT LIST` entries whose address is one of B's connections to "
        "Redis (psutil, by pid), before the subscriptions / min-max every 0.5 s while the "
        "tasks stream / after. Event lag: a token's arrival minus the fake model's schedule "
        f"for it, tokens scheduled from {fig['lag_settle_s']:g} s after the subscriptions "
        "(before: the replay of what was written before they came). p50 / p99 in ms.",
        "",
    ]
    if named:
        out += [_followers_setups(fig), ""]
    rows = []
    for lv in levels:
        rc, a, b = lv["redis_clients"], lv["a"], lv["b"]
        cpu = lv.get("cpu") or {}
        connections = f"{rc['before']['b']} / {rc['during_b_min']}-{rc['during_b_max']} / "
        connections += f"{rc['after']['b']}"
        if lv.get("redis", "one") != "one":
            connections += f" (at most {rc['during_b_node_max']} on one node)"
        rows.append(
            ([f"`{lv['redis']}`"] if named else [])
            + [
                f"{lv['followers_b']:,} on B, {lv['followers_a']:,} on A",
                connections,
                _pair(a["lag"]["p50"], a["lag"]["p99"]),
                _pair(b["lag"]["p50"], b["lag"]["p99"]),
                f"**{_pair(lv['ratio']['p50'], lv['ratio']['p99'], _x)}**",
                f"{lv['redis_counters']['xread']:,} / {lv['redis_counters']['xrange']:,}",
                f"{cpu.get('a', 0):.0f} / {cpu.get('b', 0):.0f} / {cpu.get('redis', 0):.0f}",
                f"{a['lost'] + a['out_of_order']} / {b['lost'] + b['out_of_order']}",
            ]
        )
    out += _table(
        (["Redis"] if named else [])
        + [
            "followers",
            "B's Redis connections",
            "lag on A ms",
            "lag on B ms",
            "**B / A**",
            "XREAD / XRANGE calls",
            "CPU % A / B / redis",
            "lost or out of order A / B",
        ],
        rows,
    )
    if named:
        out += ["", *_followers_compared(levels, setups)]
    return out + [""]


def _followers_setups(fig: dict[str, Any]) -> str:
    """What each Redis set-up of the followers scenario was."""
    reads = fig.get("follow_reads") or {}
    nodes = fig.get("nodes") or {}
    said = []
    for spec in fig["redis"]:
        if spec == "one":
            said.append("`one`: one redis-server")
        else:
            said.append(
                f"`{spec}`: the tests' Redis Cluster ({len(nodes.get('cluster', []))} nodes, "
                f"three primaries; `TETHER_REDIS_URL` names one), "
                f"`TETHER_REDIS_FOLLOW_READS={reads.get(spec)}`"
            )
    return (
        "Redis set-ups, each with a pair of replicas of its own (a key prefix each; the "
        "cluster set-ups share one cluster): "
        + "; ".join(said)
        + ". Each level ran on every set-up in turn, in a random order per level. On a "
        "cluster, B's connections and the calls are summed over every node, and each task's "
        "keys are a hash slot of their own (`{<task id>}`), so B follows about as many slots "
        "as tasks. CPU % of redis: every node's, summed."
    )


def _followers_compared(levels: list[dict[str, Any]], setups: list[str]) -> list[str]:
    """B / A lag and B's connections of each set-up, side by side per follower count."""
    by_count: dict[int, dict[str, dict[str, Any]]] = {}
    for lv in levels:
        by_count.setdefault(lv["followers_b"], {})[lv["redis"]] = lv
    rows = []
    for count, mine in by_count.items():
        cells = [f"{count:,} on B"]
        for spec in setups:
            lv = mine.get(spec)
            cells.append(
                f"**{_pair(lv['ratio']['p50'], lv['ratio']['p99'], _x)}**, "
                f"{lv['redis_clients']['during_b_max']} conn."
                if lv
                else "–"
            )
        rows.append(cells)
    return [
        "Side by side: B / A event lag p50 / p99, and the most Redis connections B held "
        "while the tasks streamed.",
        "",
        *_table(["followers", *[f"`{spec}`" for spec in setups]], rows),
    ]


def _workers(res: Results) -> list[str]:
    fig = res.figures.get("workers") or {}
    if not fig.get("levels"):
        return []
    out = [
        "## Workers: capacity per worker",
        "",
        f"`tether serve --workers N` on Redis, a fresh server per N, up to "
        f"{fig['max_workers']} (this machine has {fig['cores']} cores, shared by every "
        f"process). The same load per worker: {fig['streams_per_worker']} x N streams of "
        f"{fig['tokens']} tokens at {fig['rate']:g} tokens/s, one WebSocket client each "
        "(`?batch=1`). Delivered tokens/s: model tokens reaching clients per second over the "
        "second half of the streaming. Per server CPU-second: tokens delivered per second of "
        "the servers' CPU (supervisor and workers) over the whole level. Cores allowed: "
        "what everything else (Redis, the fake model, the clients, the bench, and another "
        "job: what the machine "
        "was busy beyond all of this run's processes) left to the servers, in cores, at most "
        "N. Held: event lag p99 under "
        f"{fig['lag_limit_ms']:g} ms, time to task id within bounds, nothing lost.",
        "",
    ]
    rows = []
    for r in fig["levels"]:
        rows.append(
            [
                str(r["workers"]),
                f"{r['tasks']} x {fig['rate']:g}/s",
                f"{r['delivered_tokens_per_s']} / {r['offered_tokens_per_s']}",
                f"{r['delivered_per_worker']} (**{_x(r.get('per_worker_over_one'))}**)",
                _x(r.get("delivered_over_one")),
                f"{r['tokens_per_cpu_s']} ({_x(r.get('per_cpu_over_one'))})",
                _pair(r["lag_p50"], r["lag_p99"]),
                str(r["lost"]),
                _servers_cpu(r),
                f"{r['total_cpu_percent']:.0f} / {_us(r.get('machine_cpu_percent'))}",
                f"{r['cores_allowed']:g}",
                "yes" if r["held"] else "no",
            ]
        )
    out += _table(
        [
            "workers",
            "streams",
            "tokens/s delivered / offered",
            "delivered per worker (/ 1 worker)",
            "delivered / 1 worker",
            "tokens per server CPU-second (/ 1 worker)",
            "event lag ms p50 / p99",
            "lost",
            "CPU % server(s) / redis / model / clients / bench",
            "CPU % all / machine",
            "cores allowed",
            "held",
        ],
        rows,
    )
    out.append("")
    for r in fig["levels"]:
        foreign = (r.get("machine_cpu_percent") or 0) - r["total_cpu_percent"]
        if foreign >= FOREIGN_CPU_WARNING:
            out += [
                f"**Beware**: at `--workers {r['workers']}` the machine was busy {foreign:.0f} % "
                "of a core beyond this run's processes (another job shared the cores): the "
                "servers got less CPU than the cores allowed, which lowers the tokens/s "
                "delivered and raises the lag (and lowers the CPU per token: a lagging "
                "server merges more tokens per message); compare only within a quiet run.",
                "",
            ]
        model = r["cpu_percent_window"].get("model", 0)
        if model >= 90:
            out += [
                f"**Beware**: at `--workers {r['workers']}` the fake model (one process) used "
                f"{model:.0f} % of its core: the bench, not Tether, may have bounded the level.",
                "",
            ]
    return out


def markdown(res: Results) -> str:
    data = res.to_json()
    m = data["machine"]
    v = data["versions"]
    status = "all checks passed" if data["ok"] else "**FAILED** (see Checks)"
    out = [
        f"# Tether bench: `{res.name}` ({res.mode} run)",
        "",
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(res.started_at))}, "
        f"{data['duration_s']:.0f} s, {status}. Machine: {m['cores']} cores ({m['cpu_model']}),"
        f" load average {m['load_average_start'][0]:.2f} at start, "
        f"{m['load_average_end'][0]:.2f} at end; Python {m['python']}, trio {v['trio']}, "
        f"hypercorn {v['hypercorn']}, quart-trio {v['quart-trio']}, httpx2 {v['httpx2']}; "
        f"Tether {v['tether_commit']}.",
        "",
        "How to read it: every headline figure is a ratio to a baseline measured in the same "
        "run, interleaved with the samples, so a noisy machine moves both; raw milliseconds "
        "are beside the ratios. All processes (server, fakes, bench client) share this "
        "machine's cores.",
        "",
    ]
    for section in (
        _time_to_task_id,
        _stop_latency,
        _disconnect,
        _scale,
        _storm,
        _waiting,
        _replicas,
        _responses,
        _steering,
        _followers,
        _workers,
    ):
        out += section(res)
    from bench.remote_report import sections as remote_sections  # imports this module

    out += remote_sections(res)
    if res.checks:
        out += ["## Checks", ""]
        out += [f"- {'✅' if c.ok else '❌'} {c.name}: {c.detail}" for c in res.checks]
        out.append("")
    if res.errors:
        out += ["## Errors", ""] + [f"- {e.splitlines()[0]}" for e in res.errors] + [""]
    if res.notes:
        out += ["## Notes", ""] + [f"- {n}" for n in res.notes] + [""]
    if res.charts:
        out += ["## Charts", ""] + [f"![{Path(c).stem}]({Path(c).name})" for c in res.charts]
        out.append("")
    return "\n".join(out)


def write_outputs(
    res: Results, *, charts: bool = True, directory: Path = RESULTS_DIR
) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    if charts:
        from bench.charts import draw_all

        try:
            paths += draw_all(res, directory)
        except Exception as exc:  # a chart must not lose the figures
            res.errors.append(f"charts failed: {type(exc).__name__}: {exc}")
        res.charts = [str(p) for p in paths]
    md = directory / f"{res.name}.md"
    md.write_text(markdown(res))
    paths.insert(0, md)
    paths.insert(0, res.write_json(directory))
    return paths
