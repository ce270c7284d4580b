"""``python3 bench/guidellm/summary.py BENCHMARKS.json [--check]``.

Prints one Markdown table row per benchmark of a guidellm JSON report (``--output
kind=json``): requests completed, errored and cut off at the end of the run (in flight when
its time was up, which guidellm counts as incomplete, not as errors), completed requests per
second, time to first token and inter-token latency (mean, median, p99 over the completed
requests), and output tokens per second. Standard library only: it runs under any Python 3.

With ``--check`` it exits 1 unless every benchmark completed at least one request and none
errored; CI runs it so after a short guidellm run against Tether's ``local`` model.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HEADER = (
    "| load | completed | errored | cut off | req/s | TTFT ms mean / p50 / p99 "
    "| ITL ms mean / p50 / p99 | output tok/s |\n"
    "|---|---|---|---|---|---|---|---|"
)


def load_name(benchmark: dict[str, Any]) -> str:
    """``constant 10/s``, ``concurrent 8`` or the strategy's bare type."""
    strategy = benchmark["config"]["strategy"]
    kind = strategy["type_"]
    if strategy.get("rate") is not None:
        return f"{kind} {strategy['rate']:g}/s"
    if strategy.get("streams") is not None:
        return f"{kind} {strategy['streams']}"
    return str(kind)


def _three(metric: dict[str, Any]) -> str:
    done = metric["successful"]
    return (
        f"{done['mean']:.1f} / {done['percentiles']['p50']:.1f} / {done['percentiles']['p99']:.1f}"
    )


def row(benchmark: dict[str, Any]) -> str:
    made = benchmark["metrics"]["request_totals"]
    metrics = benchmark["metrics"]
    return (
        f"| {load_name(benchmark)} | {made['successful']} | {made['errored']} "
        f"| {made['incomplete']} | {metrics['requests_per_second']['successful']['mean']:.2f} "
        f"| {_three(metrics['time_to_first_token_ms'])} "
        f"| {_three(metrics['inter_token_latency_ms'])} "
        f"| {metrics['output_tokens_per_second']['successful']['mean']:.0f} |"
    )


def problems(benchmark: dict[str, Any]) -> list[str]:
    made = benchmark["metrics"]["request_totals"]
    found = []
    if made["successful"] < 1:
        found.append(f"{load_name(benchmark)}: no request completed")
    if made["errored"]:
        found.append(f"{load_name(benchmark)}: {made['errored']} requests errored")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="summary.py", description=__doc__.split("\n\n")[1])
    parser.add_argument("report", type=Path, help="guidellm's JSON output")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 unless every benchmark completed requests, none errored",
    )
    args = parser.parse_args(argv)
    benchmarks = json.loads(args.report.read_text())["benchmarks"]
    print(HEADER)
    for benchmark in benchmarks:
        print(row(benchmark))
    if not args.check:
        return 0
    found = [p for b in benchmarks for p in problems(b)] or ([] if benchmarks else ["no benchmark"])
    for problem in found:
        print(f"guidellm: {problem}", file=sys.stderr)
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
