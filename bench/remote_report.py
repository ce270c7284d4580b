"""The report's sections of a ``--target`` and a ``--peer`` run (``bench/report.py`` adds them
to ``<name>.md`` when the run has their figures)."""

from __future__ import annotations

from typing import Any

from bench.remote import LAG_HELD_MS
from bench.report import _ms, _table, _x
from bench.results import Results


def _n(row: dict[str, Any]) -> str:
    fails = row.get("failures") or 0
    return f"{row['n']}" + (f" ({fails} failed)" if fails else "")


def _vs_floor_table(rows: list[dict[str, Any]]) -> list[str]:
    return _table(
        ["measure", "n", "p50 ms", "p99 ms", "floor p50 / p99 ms", "× floor p50", "× floor p99"],
        [
            [
                r["measure"],
                _n(r),
                _ms(r["p50"]),
                _ms(r["p99"]),
                f"{_ms(r['floor_p50'])} / {_ms(r['floor_p99'])}",
                _x(r["ratio_p50"]),
                _x(r["ratio_p99"]),
            ]
            for r in rows
        ],
    )


def _levels_table(rows: list[dict[str, Any]]) -> list[str]:
    return _table(
        [
            "streams",
            "completed",
            "errors",
            "first token p50 / p99 ms",
            "lag p50 / p99 ms",
            "pieces/s",
            "server CPU µs/token",
            "CPU %",
            "held",
        ],
        [
            [
                str(r["streams"]),
                str(r["completed"]),
                str(r["errors"]),
                f"{_ms(r['ttft_p50'])} / {_ms(r['ttft_p99'])}",
                f"{_ms(r['lag_p50'])} / {_ms(r['lag_p99'])}",
                "–" if r["pieces_per_s"] is None else f"{r['pieces_per_s']:.0f}",
                "–" if r["cpu_us_per_token"] is None else f"{r['cpu_us_per_token']:.0f}",
                ", ".join(f"{k} {v:.0f}" for k, v in (r.get("cpu_pct") or {}).items()),
                "yes" if r["held"] else "**no**",
            ]
            for r in rows
        ],
    )


LEVELS_TEXT = (
    f"A level is N streaming chats sent at once. A piece's *lag* is how much later, counted "
    f"from sending its request, it arrives than the same piece of the answer did in the lone "
    f"stream of level 1 at the same server (so level 1 is the floor, lag 0; a wait for the "
    f"first token counts). A level holds "
    f"when every stream ends without an error and the lag p99 is at most {LAG_HELD_MS:g} ms. "
    "CPU %: of each process over the level (where it can be read), the bench client's too, "
    "and the whole machine's (every process, this run's or another job's); on 2 cores a "
    "process near 100 %, or a machine near 200 %, means the level measured the machine, not "
    "only the server."
)


def target_section(res: Results) -> list[str]:
    fig = res.figures.get("target")
    if not fig:
        return []
    kind = "a Tether server" if fig.get("kind") == "tether" else "not a Tether server"
    out = [
        "## Target",
        "",
        f"`{fig['url']}`: {kind}; model `{fig.get('model')}`; floor `{fig.get('floor')}` (the "
        "cheapest route it answers 200 on, of "
        + ", ".join(
            f"`{r}` {_ms(m) if m >= 0 else 'no'}"
            for r, m in fig.get("floor_candidates_ms", {}).items()
        )
        + " ms p50). Every measure is interleaved with the floor on the same connection.",
        "",
    ]
    if fig.get("server_pid"):
        out += [f"The server's pid (listening on the target's port): {fig['server_pid']}.", ""]
    if fig.get("first_token"):
        out += ["### First byte and first token", ""]
        out += [
            "A sync answer's first token is readable only with the whole answer, so its time "
            "to first token is the answer's.",
            "",
        ]
        out += _vs_floor_table(fig["first_token"]) + [""]
    if fig.get("tether"):
        out += ["### Tether: task id, stop, resume", ""]
        out += _vs_floor_table(fig["tether"]) + [""]
    if fig.get("levels"):
        out += ["### Load levels", "", LEVELS_TEXT, ""]
        out += _levels_table(fig["levels"]) + [""]
    if fig.get("skipped"):
        out += ["### Skipped", ""]
        out += [f"- `{s['scenario']}`: {s['reason']}" for s in fig["skipped"]]
        out.append("")
    return out


def _cell(value: Any, unit: str) -> str:
    if value is None:
        return "–"
    if unit == "×":
        return _x(value)
    if unit in ("ms",):
        return _ms(value)
    if unit == "µs":
        return f"{value:.0f}"
    return str(value)


def peers_section(res: Results) -> list[str]:
    fig = res.figures.get("peers")
    if not fig or not fig.get("targets"):
        return []
    targets = fig["targets"]
    names = [t["name"] for t in targets]
    labels = {t["name"]: t["label"] for t in targets}
    cfg = fig["config"]
    header = ["metric", "unit", labels[names[0]]]
    for n in names[1:]:
        header += [labels[n], f"{labels[n]} / Tether"]
    rows = []
    for r in fig.get("summary", []):
        row = [r["metric"], r["unit"], _cell(r["values"].get(names[0]), r["unit"])]
        for n in names[1:]:
            row += [_cell(r["values"].get(n), r["unit"]), _x(r["ratios"].get(n))]
        rows.append(row)
    out = [
        "## Tether and a peer gateway, side by side",
        "",
        "Both in front of the bench's own fake model (one process, TCP_NODELAY on its "
        "sockets), measured in the same run, interleaved (each round or level in a random "
        "order of the servers). Floors: "
        + ", ".join(f"{labels[t['name']]} `{t['floor']}`" for t in targets)
        + ". A ratio is the peer's figure over Tether's: above 1 Tether "
        "is ahead on a *lower is better* metric (everything but the levels held).",
        "",
    ]
    out += _table(header, rows) + [""]
    levels = fig.get("levels") or {}
    if levels:
        out += [
            "### Levels",
            "",
            f"Each stream: {cfg['level_tokens']} tokens at {cfg['level_rate']:g} tokens/s from "
            f"the fake. Server CPU: the server's process and its children (user + system, "
            f"/proc), over the level, per token delivered. " + LEVELS_TEXT,
            "",
        ]
        for n in names:
            out += [f"**{labels[n]}**", ""] + _levels_table(levels[n]) + [""]
    disc = fig.get("disconnect") or {}
    if disc:
        out += [
            "### Client disconnect → upstream closed",
            "",
            "The client closes its socket (streaming: after its first token; sync: 0.2 s after "
            "the fake got the request); from that moment to the fake model seeing the "
            "gateway's upstream connection closed (both CLOCK_MONOTONIC).",
            "",
        ]
        out += _table(
            ["server", "client", "closed", "p50 ms", "p99 ms", "max ms", "still open", "failed"],
            [
                [
                    labels[key.split("/")[0]],
                    key.split("/")[1],
                    f"{d['n']} of {d['samples']}",
                    _ms(d["p50"]),
                    _ms(d["p99"]),
                    _ms(d["max"]),
                    str(d["still_open"]),
                    str(d.get("failed", 0)),
                ]
                for key, d in disc.items()
            ],
        ) + [""]
    ft = fig.get("first_token") or {}
    if ft:
        out += ["### First byte and first token, by server", ""]
        for n in names:
            out += [f"**{labels[n]}**", ""] + _vs_floor_table(ft[n]) + [""]
    return out


def sections(res: Results) -> list[str]:
    return target_section(res) + peers_section(res)
