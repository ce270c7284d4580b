"""Memory per idle WebSocket connection, and where it goes.

``python -m bench.ws_memory --clients 500``: a Tether server in this process (built-in model
and search, no upstream) and, in a child process, ``--clients`` raw WebSocket clients that
open ``/ws``, read their session message and then stay idle. Between a snapshot taken
before they connect and one taken once all are idle, this prints the traced Python memory
per connection, where it goes (tracemalloc, each allocation put to the innermost frame of
Tether's own code in its traceback, else to the library that made it), and the process's
RSS growth per connection. With tracemalloc on, RSS includes tracemalloc's own bookkeeping:
``--rss-only`` measures RSS with tracemalloc off.

``--compare DIR --out NAME``: the same measurements, RSS with tracemalloc off and traced
bytes with it on, each in a fresh process, for the server code in ``DIR`` (a checkout of an
earlier commit: the baseline) and for this tree's, alternately for ``--rounds`` rounds; the
medians and their ratios (this tree / baseline) go to ``bench/results/NAME-before.md`` and
``NAME-after.md`` (with ``.json``).
"""

from __future__ import annotations

import argparse
import base64
import gc
import json
import linecache
import os
import statistics
import subprocess
import sys
import tracemalloc
from collections import Counter
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import trio

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def hold_clients(port: int, clients: int) -> None:
    """Child: open ``clients`` WebSockets, say ``ready`` on stdout, stay idle until stdin
    closes."""
    key = base64.b64encode(os.urandom(16)).decode()
    request = (
        f"GET /ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    ).encode()
    streams = []
    for _ in range(clients):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.send_all(request)
        received = b""
        while b'"session"' not in received:  # the 101, then the session message
            received += await stream.receive_some(65536)
        streams.append(stream)
    print("ready", flush=True)
    await trio.to_thread.run_sync(sys.stdin.read)


def owner(traceback: tracemalloc.Traceback) -> str:
    """Who an allocation is put to: the innermost frame of Tether's own code (``server/``)
    in its traceback, else the library (or file) of its innermost frame."""
    frames = list(traceback)  # oldest first (tracemalloc.start keeps that order here)
    frames.sort(key=lambda _: 0)
    for frame in reversed(frames):
        name = frame.filename
        if "site-packages" not in name and "/server/" in name:
            return f"server/{name.rsplit('/server/', 1)[1]}:{frame.lineno}"
    innermost = frames[-1].filename
    if "site-packages/" in innermost:
        return innermost.split("site-packages/", 1)[1].split("/", 1)[0]
    return Path(innermost).name


async def measure(clients: int, top: int, *, traced: bool) -> dict[str, Any]:
    """One measurement in this process; returns its figures (and prints them)."""
    from server.app import create_app
    from server.cli import serve_app
    from server.config import Settings

    settings = Settings(host="127.0.0.1", port=0, ws_ping_interval_s=0)
    app = create_app(settings)
    stop = trio.Event()
    result: dict[str, Any] = {"clients": clients, "traced": traced}
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve_app, app, settings, shutdown_trigger=stop.wait))
        port = int(binds[0].rsplit(":", 1)[1])
        await run_clients(port, 5)  # warm up: imports and first-use caches
        gc.collect()
        if traced:
            tracemalloc.start(25)
            before = tracemalloc.take_snapshot()
        rss_before = rss_bytes()
        child = await trio.lowlevel.open_process(
            hold_command(port, clients),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=ROOT,
        )
        assert child.stdout is not None and child.stdin is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await child.stdout.receive_some(64)
        gc.collect()
        result["rss_per_ws"] = (rss_bytes() - rss_before) / clients
        print(f"{clients} idle WebSockets")
        print(f"RSS growth per connection: {result['rss_per_ws'] / 1024:.1f} KiB", end="")
        print(" (tracemalloc on)" if traced else " (tracemalloc off)")
        if traced:
            stats = tracemalloc.take_snapshot().compare_to(before, "traceback")
            tracemalloc.stop()
            owners: Counter[str] = Counter()
            for stat in stats:
                owners[owner(stat.traceback)] += stat.size_diff
            result["traced_per_ws"] = sum(owners.values()) / clients
            result["owners"] = {k: round(v / clients) for k, v in owners.most_common(top)}
            print(f"traced Python memory per connection: {result['traced_per_ws'] / 1024:.1f} KiB")
            print("where it goes (bytes per connection):")
            for name, size in result["owners"].items():
                print(f"  {size:8d} B  {name}")
        await child.stdin.aclose()
        await child.wait()
        stop.set()
    return result


def hold_command(port: int, clients: int) -> list[str]:
    return [sys.executable, "-m", "bench.ws_memory", "--hold", str(port), "--clients", str(clients)]


async def run_clients(port: int, clients: int) -> None:
    child = await trio.run_process(
        hold_command(port, clients),
        stdin=b"",
        capture_stdout=True,
        cwd=ROOT,
    )
    assert child.stdout.startswith(b"ready")


def one_run(tree: Path, clients: int, top: int, traced: bool) -> dict[str, Any]:
    """A measurement in a fresh process serving the server code of ``tree``."""
    args = [sys.executable, "-m", "bench.ws_memory", "--clients", str(clients)]
    args += ["--top", str(top), "--server-tree", str(tree), "--json-stdout"]
    if not traced:
        args.append("--rss-only")
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def compare(baseline: Path, clients: int, rounds: int, top: int, out: str) -> None:
    """Baseline and this tree alternately, ``rounds`` times each way; medians and ratios."""
    trees = {"before": baseline.resolve(), "after": ROOT}
    runs: dict[str, dict[str, list[dict[str, Any]]]] = {k: {"rss": [], "traced": []} for k in trees}
    for number in range(rounds):
        for name, tree in trees.items():
            for kind in ("rss", "traced"):
                run = one_run(tree, clients, top, kind == "traced")
                runs[name][kind].append(run)
                figure = run["rss_per_ws" if kind == "rss" else "traced_per_ws"]
                print(f"round {number + 1} {name} {kind}: {figure / 1024:.1f} KiB per WebSocket")
    summary: dict[str, dict[str, Any]] = {}
    for name in trees:
        summary[name] = {
            "rss_per_ws": statistics.median(r["rss_per_ws"] for r in runs[name]["rss"]),
            "traced_per_ws": statistics.median(r["traced_per_ws"] for r in runs[name]["traced"]),
            # Where it goes: the run with the median traced figure.
            "owners": sorted(runs[name]["traced"], key=lambda r: r["traced_per_ws"])[
                len(runs[name]["traced"]) // 2
            ]["owners"],
        }
    keys = ("rss_per_ws", "traced_per_ws")
    ratios = {key: summary["after"][key] / summary["before"][key] for key in keys}
    meta = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "clients": clients,
        "rounds": rounds,
        "python": sys.version.split()[0],
        "cpus": os.cpu_count(),
    }
    for name in trees:
        data = {**meta, "tree": name, **summary[name], "runs": runs[name]}
        if name == "after":
            data["ratio_to_before"] = ratios
        (RESULTS / f"{out}-{name}.json").write_text(json.dumps(data, indent=2) + "\n")
        (RESULTS / f"{out}-{name}.md").write_text(report(name, meta, summary, ratios, trees[name]))
    print(report("after", meta, summary, ratios, ROOT))


def report(
    name: str,
    meta: dict[str, Any],
    summary: dict[str, dict[str, Any]],
    ratios: dict[str, float],
    tree: Path,
) -> str:
    mine = summary[name]
    lines = [
        f"# Memory per idle WebSocket: {name}",
        "",
        f"`python -m bench.ws_memory --compare <baseline checkout> --clients {meta['clients']}"
        f" --rounds {meta['rounds']}`, {meta['date']}, Python {meta['python']}, "
        f"{meta['cpus']} cores. {meta['clients']} idle `/ws` connections (session message "
        "read, nothing followed) against a real server; each figure the median of the rounds, "
        "each round a fresh process, the baseline's code and this tree's alternately.",
        "",
        "| per idle WebSocket | before | after | **after / before** |",
        "|---|---|---|---|",
    ]
    for key, label in (
        ("rss_per_ws", "RSS growth (tracemalloc off)"),
        ("traced_per_ws", "traced Python memory (tracemalloc)"),
    ):
        before, after = summary["before"][key], summary["after"][key]
        lines.append(
            f"| {label} | {before / 1024:.1f} KiB | {after / 1024:.1f} KiB "
            f"| **{ratios[key]:.2f}x** |"
        )
    lines += [
        "",
        f"Where the traced memory goes ({name}; bytes per connection, each allocation put to "
        "the innermost frame of Tether's own code in its traceback, else to the library that "
        "made it):",
        "",
        "| bytes | where | the line |",
        "|---|---|---|",
    ]
    for where, size in mine["owners"].items():
        path, _, number = where.partition(":")
        code = linecache.getline(str(tree / path), int(number)).strip() if number else ""
        code = "`" + code.replace("|", "\\|") + "`" if code else ""
        lines.append(f"| {size} | `{where}` | {code} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--rss-only", action="store_true", help="RSS with tracemalloc off")
    parser.add_argument("--compare", type=Path, help="a checkout of the baseline commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", default="ws-memory", help="results file stem (--compare)")
    parser.add_argument("--server-tree", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json-stdout", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--hold", type=int, help=argparse.SUPPRESS)  # the child's port
    args = parser.parse_args()
    if args.hold:
        trio.run(hold_clients, args.hold, args.clients)
    elif args.compare:
        compare(args.compare, args.clients, args.rounds, args.top, args.out)
    else:
        if args.server_tree:
            sys.path.insert(0, str(args.server_tree))
        result = trio.run(partial(measure, args.clients, args.top, traced=not args.rss_only))
        if args.json_stdout:
            print(json.dumps(result))


if __name__ == "__main__":
    main()
