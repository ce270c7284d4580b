"""Memory per idle WebSocket connection, and where it goes.

``python -m bench.ws_memory --clients 500``: a Tether server in this process (built-in model
and search, no upstream) and, in a child process, ``--clients`` raw WebSocket clients that
open ``/ws``, read their session message and then stay idle. Between a snapshot taken
before they connect and one taken once all are idle, this prints the traced Python memory
per connection, the top allocation sites (tracemalloc, grouped by line), and the process's
RSS growth per connection (measured with tracemalloc on, which adds its own bookkeeping: the
traced figure is the one to compare between versions).
"""

from __future__ import annotations

import argparse
import base64
import gc
import os
import subprocess
import sys
import tracemalloc
from functools import partial

import trio

from server.app import create_app
from server.cli import serve_app
from server.config import Settings


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


async def measure(clients: int, top: int) -> None:
    settings = Settings(host="127.0.0.1", port=0, ws_ping_interval_s=0)
    app = create_app(settings)
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve_app, app, settings, shutdown_trigger=stop.wait))
        port = int(binds[0].rsplit(":", 1)[1])
        await run_clients(port, 5)  # warm up: imports and first-use caches
        gc.collect()
        tracemalloc.start(10)
        before, rss_before = tracemalloc.take_snapshot(), rss_bytes()
        child = await trio.lowlevel.open_process(
            [
                sys.executable,
                "-m",
                "bench.ws_memory",
                "--hold",
                str(port),
                "--clients",
                str(clients),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        assert child.stdout is not None and child.stdin is not None
        line = b""
        while not line.endswith(b"\n"):
            line += await child.stdout.receive_some(64)
        gc.collect()
        after, rss_after = tracemalloc.take_snapshot(), rss_bytes()
        traced = sum(s.size_diff for s in after.compare_to(before, "filename"))
        print(f"{clients} idle WebSockets")
        print(f"traced Python memory per connection: {traced / clients / 1024:.1f} KiB")
        print(f"RSS growth per connection: {(rss_after - rss_before) / clients / 1024:.1f} KiB")
        print("top allocation sites (per connection):")
        for stat in after.compare_to(before, "lineno")[:top]:
            frame = stat.traceback[0]
            print(f"  {stat.size_diff / clients:8.0f} B  {frame.filename}:{frame.lineno}")
        await child.stdin.aclose()
        await child.wait()
        stop.set()


async def run_clients(port: int, clients: int) -> None:
    child = await trio.run_process(
        [sys.executable, "-m", "bench.ws_memory", "--hold", str(port), "--clients", str(clients)],
        stdin=b"",
        capture_stdout=True,
    )
    assert child.stdout.startswith(b"ready")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--clients", type=int, default=500)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--hold", type=int, help=argparse.SUPPRESS)  # the child's port
    args = parser.parse_args()
    if args.hold:
        trio.run(hold_clients, args.hold, args.clients)
    else:
        trio.run(measure, args.clients, args.top)


if __name__ == "__main__":
    main()
