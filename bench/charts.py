"""One PNG chart per scenario (matplotlib, Agg backend): ``<name>-<scenario>.png``."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from bench.results import Results  # noqa: E402

Drawer = Callable[[Results], Figure | None]


def _num(value: Any) -> float:
    return float(value) if value is not None else float("nan")


def _bars(
    ax: Axes,
    labels: list[str],
    series: dict[str, tuple[list[float], list[float]]],
    ylabel: str,
    log: bool = False,
) -> None:
    """Grouped bars of p50 with a p99 marker above each bar."""
    width = 0.8 / max(1, len(series))
    for k, (name, (p50, p99)) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i in range(len(labels))]
        bars = ax.bar(xs, p50, width, label=f"{name} p50")
        ax.scatter(
            xs,
            p99,
            marker="_",
            s=200,
            color=bars.patches[0].get_facecolor() if bars.patches else None,
            zorder=3,
        )
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, title="bar: p50, dash: p99", title_fontsize=7)


def _time_to_task_id(res: Results) -> Figure | None:
    rows = res.figures.get("time_to_task_id") or []
    if not rows:
        return None
    labels = [
        f"{r['path']} {r['search_delay_s']:g}s\n{str(r['clients']).split(' ')[0]} cl." for r in rows
    ]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    _bars(
        left,
        labels,
        {
            "floor": ([_num(r["floor_p50"]) for r in rows], [_num(r["floor_p99"]) for r in rows]),
            "Tether": (
                [_num(r["tether_p50"]) for r in rows],
                [_num(r["tether_p99"]) for r in rows],
            ),
            "payload-first": ([_num(r["pf_p50"]) for r in rows], [_num(r["pf_p99"]) for r in rows]),
        },
        "ms (log)",
        log=True,
    )
    left.set_title("time to task id")
    _bars(
        right,
        labels,
        {
            "Tether / floor": (
                [_num(r["tether_ratio_p50"]) for r in rows],
                [_num(r["tether_ratio_p99"]) for r in rows],
            ),
            "payload-first / its floor": (
                [_num(r["pf_ratio_p50"]) for r in rows],
                [_num(r["pf_ratio_p99"]) for r in rows],
            ),
        },
        "ratio to the in-run floor (log)",
        log=True,
    )
    right.axhline(1.0, color="grey", lw=0.8)
    right.set_title("ratio to the floor (GET /healthz; WebSocket: ping)")
    fig.tight_layout()
    return fig


def _stop_latency(res: Results) -> Figure | None:
    rows = res.figures.get("stop_latency") or []
    if not rows:
        return None
    labels = [f"{r['phase']}\n{r['transport']}" for r in rows]
    fig, ax = plt.subplots(figsize=(12, 5))
    _bars(
        ax,
        labels,
        {
            metric: ([_num(r[f"{key}_p50"]) for r in rows], [_num(r[f"{key}_p99"]) for r in rows])
            for metric, key in (
                ("HTTP answer", "answer"),
                ("task:cancelled at client", "cancelled"),
                ("upstream closed", "upstream"),
            )
        },
        "ms after the stop was sent",
    )
    ping = res.figures.get("stop_latency_ping")
    if ping:
        ax.axhline(
            _num(ping["p50"]),
            color="grey",
            ls="--",
            lw=1,
            label=f"WebSocket ping p50 ({ping['p50']:.2f} ms)",
        )
        ax.legend(fontsize=7)
    ax.set_title("stop latency per phase")
    fig.tight_layout()
    return fig


def _disconnect(res: Results) -> Figure | None:
    rows = res.figures.get("disconnect") or []
    if not rows:
        return None
    labels = [f"{r['client']} mid-{r['phase']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    _bars(
        ax,
        labels,
        {"upstream closed": ([_num(r["p50"]) for r in rows], [_num(r["p99"]) for r in rows])},
        "ms after the client closed its socket",
    )
    ax.set_title("disconnect latency")
    fig.tight_layout()
    return fig


def _scale(res: Results) -> Figure | None:
    fig_data = res.figures.get("scale") or {}
    rows = fig_data.get("levels") or []
    if not rows:
        return None
    xs = [r["tasks"] for r in rows]
    fig, axes = plt.subplots(2, 2, figsize=(12, 8))
    a, b, c, d = axes[0][0], axes[0][1], axes[1][0], axes[1][1]
    for key, label in (("ttid", "task id"), ("floor", "floor /healthz")):
        a.plot(xs, [_num(r[f"{key}_p50"]) for r in rows], marker="o", label=f"{label} p50")
        a.plot(xs, [_num(r[f"{key}_p99"]) for r in rows], marker="x", ls="--", label=f"{label} p99")
    a.axhline(fig_data.get("ttid_limit_ms", 50), color="red", lw=0.8, label="50 ms limit")
    a.set_title("time to task id under load")
    a.set_ylabel("ms (log)")
    b.plot(xs, [_num(r["lag_p50"]) for r in rows], marker="o", label="p50")
    b.plot(xs, [_num(r["lag_p99"]) for r in rows], marker="x", ls="--", label="p99")
    b.set_title("event lag (client arrival - fake send schedule)")
    b.set_ylabel("ms (log)")

    def cpu(r: dict[str, Any], name: str) -> float:
        by = r.get("cpu_percent_window") or r.get("cpu_percent_by_process") or {}
        if name == "clients":
            return float(sum(v for k, v in by.items() if k.startswith("client")))
        return float(by.get(name, 0))

    for name in ("tether", "model", "clients", "bench"):
        c.plot(xs, [cpu(r, name) for r in rows], marker="o", label=name)
    c.axhline(100, color="grey", lw=0.8)
    c.set_title(f"CPU, % of one core (machine: {res.machine.get('cores')} cores)")
    d.plot(xs, [_num(r["peak_rss_mb"]) for r in rows], marker="o", label="server peak RSS MB")
    d2 = d.twinx()
    d2.plot(
        xs,
        [_num(r.get("kb_per_task")) for r in rows],
        marker="x",
        color="tab:orange",
        label="KB per active task",
    )
    d.set_title("server memory")
    d.legend(loc="upper left", fontsize=7)
    d2.legend(loc="lower right", fontsize=7)
    for ax in (a, b, c, d):
        ax.set_xscale("log")
        ax.set_xlabel("concurrent streaming tasks")
        ax.grid(alpha=0.3)
    for ax in (a, b, c):
        ax.legend(fontsize=7)
    a.set_yscale("log")
    b.set_yscale("log")
    fig.tight_layout()
    return fig


def _cancel_storm(res: Results) -> Figure | None:
    data = res.figures.get("cancel_storm")
    if not data:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    phases = data.get("phases") or {}
    left.bar(list(phases), list(phases.values()))
    left.set_title(f"phase at cancel ({data['tasks']} tasks; disconnects not read back)")
    left.set_ylabel("tasks")
    names = ["before warm-up", "start", "peak", "end"]
    values = [data["rss_cold_mb"], data["rss_start_mb"], data["rss_peak_mb"], data["rss_end_mb"]]
    right.bar(names, values, color=["grey", "tab:blue", "tab:orange", "tab:green"])
    right.axhline(data["rss_start_mb"] * 1.1, color="red", lw=0.8, ls="--", label="start + 10%")
    right.set_ylabel("server RSS MB")
    right.set_title("server memory around the storm")
    right.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _replicas(res: Results) -> Figure | None:
    data = res.figures.get("replicas") or {}
    stop, resume = data.get("stop"), data.get("resume")
    levels = (data.get("scale") or {}).get("levels") or []
    if not (stop or resume or levels):
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    labels: list[str] = []
    same: tuple[list[float], list[float]] = ([], [])
    cross: tuple[list[float], list[float]] = ([], [])
    for part, metrics in (
        (stop, (("answer", "stop answer"), ("upstream", "upstream closed"))),
        (resume, (("first_event", "resume: first event"),)),
    ):
        if not part:
            continue
        for key, label in metrics:
            labels.append(label)
            for arm, series in (("same", same), ("cross", cross)):
                series[0].append(_num(part[arm][key]["p50"]))
                series[1].append(_num(part[arm][key]["p99"]))
    if labels:
        _bars(left, labels, {"on A (the task's replica)": same, "via B": cross}, "ms")
        if stop:
            left.axhline(stop["goal_ms"], color="red", lw=0.8, ls="--")
        left.set_title("stop and resume: the task's replica and another")
    if levels:
        names = [f"{r['label']}\n{r['tasks']} tasks" for r in levels]
        _bars(
            right,
            names,
            {
                "event lag": (
                    [_num(r["lag_p50"]) for r in levels],
                    [_num(r["lag_p99"]) for r in levels],
                )
            },
            "ms",
        )
        twin = right.twinx()
        per_token = [_num(r["us_per_token"]) for r in levels]
        twin.plot(range(len(levels)), per_token, "o", color="black", label="server µs per token")
        twin.set_ylabel("µs per delivered token")
        known = [v for v in per_token if not math.isnan(v)]
        if known:
            twin.set_ylim(0, 1.4 * max(known))
        twin.legend(loc="upper center", fontsize=7)
        right.set_title("streams: memory, Redis, Redis with --workers 2")
    fig.tight_layout()
    return fig


def _target(res: Results) -> Figure | None:
    """``--target``: each measure against the target's floor; the levels' lag."""
    fig_data = res.figures.get("target") or {}
    rows = [*(fig_data.get("first_token") or []), *(fig_data.get("tether") or [])]
    if not rows:
        return None
    levels = fig_data.get("levels") or []
    fig, axes = plt.subplots(1, 2 if levels else 1, figsize=(13 if levels else 8, 5))
    left = axes[0] if levels else axes
    _bars(
        left,
        [str(r["measure"]).replace(" -> ", "\n→ ").replace(": ", ":\n") for r in rows],
        {
            "floor": ([_num(r["floor_p50"]) for r in rows], [_num(r["floor_p99"]) for r in rows]),
            "target": ([_num(r["p50"]) for r in rows], [_num(r["p99"]) for r in rows]),
        },
        "ms (log)",
        log=True,
    )
    left.set_title(f"{fig_data.get('url')} against its floor {fig_data.get('floor')}")
    if levels:
        right = axes[1]
        xs = [str(r["streams"]) for r in levels]
        right.plot(xs, [_num(r["lag_p99"]) for r in levels], marker="o", label="lag p99")
        right.plot(xs, [_num(r["ttft_p99"]) for r in levels], marker="s", label="first token p99")
        right.set_xlabel("streams at once")
        right.set_ylabel("ms")
        right.grid(alpha=0.3)
        right.legend(fontsize=7)
        right.set_title("load levels")
    fig.tight_layout()
    return fig


def _peers(res: Results) -> Figure | None:
    """``--peer``: first token, CPU per token and lag by level, one series per server."""
    data = res.figures.get("peers") or {}
    targets = data.get("targets") or []
    first = data.get("first_token") or {}
    if not targets or not first:
        return None
    fig, (left, mid, right) = plt.subplots(1, 3, figsize=(15, 5))
    labels = [str(r["measure"]).replace(": ", ":\n") for r in first[targets[0]["name"]]]
    _bars(
        left,
        labels,
        {
            t["label"]: (
                [_num(r["p50"]) for r in first[t["name"]]],
                [_num(r["p99"]) for r in first[t["name"]]],
            )
            for t in targets
        },
        "ms",
    )
    left.set_title("first byte and first token")
    levels = data.get("levels") or {}
    for t in targets:
        rows = [r for r in levels.get(t["name"], []) if r["streams"] > 1]
        xs = [str(r["streams"]) for r in rows]
        mid.plot(xs, [_num(r["cpu_us_per_token"]) for r in rows], marker="o", label=t["label"])
        right.plot(xs, [_num(r["lag_p99"]) for r in rows], marker="o", label=t["label"])
    mid.set_title("server CPU per streamed token")
    mid.set_ylabel("µs")
    right.set_title("lag p99 behind a lone stream")
    right.set_ylabel("ms (symlog)")
    right.set_yscale("symlog", linthresh=1.0)
    for ax in (mid, right):
        ax.set_xlabel("streams at once")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


DRAWERS: dict[str, Drawer] = {
    "time_to_task_id": _time_to_task_id,
    "stop_latency": _stop_latency,
    "disconnect": _disconnect,
    "scale": _scale,
    "cancel_storm": _cancel_storm,
    "replicas": _replicas,
    "target": _target,
    "peers": _peers,
}


def draw_all(res: Results, directory: Path) -> list[Path]:
    paths: list[Path] = []
    for scenario, drawer in DRAWERS.items():
        fig = drawer(res)
        if fig is None:
            continue
        path = directory / f"{res.name}-{scenario}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths
