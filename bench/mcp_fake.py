"""The bench's MCP fakes: ``fakes/mcp_server.py`` over streamable HTTP in a child process,
and the recorder its stdio servers report to.

``python -m bench.mcp_fake --label http`` runs, in one process:

- the test fake's server over streamable HTTP (``McpHttpFake``) on a loopback port;
- a ``McpRecorder`` listening on another loopback port, where the stdio fakes that Tether
  starts (``python -m fakes.mcp_server --label NAME --record 127.0.0.1:PORT``) send
  their records as JSON lines.

Every record (of the HTTP server or of a stdio one) gets ``at``, ``time.monotonic()``
(CLOCK_MONOTONIC, the clock of every process on the machine, the bench's too): for the HTTP
server the moment the fake records it; for a stdio server the moment its line reaches this
process, whose loop has nothing else to do meanwhile (the stdio fake writes each record on a
blocking loopback socket before going on). It prints ``READY <endpoint URL> <record port>``,
then each record as one JSON line, on its stdout (a pipe to the bench); the writes are
asynchronous, so a bench that reads late never holds up the MCP server. Its start-up heap
is frozen (``gc.freeze``), so that a full garbage collection of this process does not pause
the MCP server for tens of milliseconds in the middle of a sample.

``McpFakeControl`` is the bench's side: it reads those lines and waits for records.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from typing import Any

import trio

from bench.procs import Proc, ProcessError, ProcessSet

__all__ = ["McpFakeControl", "start_mcp_fake"]


class McpFakeControl:
    """The ``bench.mcp_fake`` child: its HTTP endpoint, its recorder's port, its records."""

    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        assert proc.popen.stdout is not None
        self._out = trio.lowlevel.FdStream(os.dup(proc.popen.stdout.fileno()))
        self._buf = b""
        self.records: list[dict[str, Any]] = []
        self.http_url = ""
        self.record_port = 0

    async def _read(self) -> None:
        """Read what the child has written (at least one chunk) into ``records``."""
        data = await self._out.receive_some(1 << 16)
        if not data:
            raise ProcessError(f"{self.proc.name} exited:\n{self.proc.log_tail()}")
        self._buf += data
        *lines, self._buf = self._buf.split(b"\n")
        for line in lines:
            if line.startswith(b"READY "):
                _, url, record_port = line.decode().split()
                self.http_url = url
                self.record_port = int(record_port)
            elif line.strip():
                self.records.append(json.loads(line))

    async def wait_ready(self, timeout: float = 30.0) -> None:
        with trio.move_on_after(timeout):
            while not self.record_port:
                await self._read()
        if not self.record_port:
            raise ProcessError(
                f"{self.proc.name} printed no READY line in {timeout} s:\n{self.proc.log_tail()}"
            )

    def mark(self) -> int:
        """The index the next record will have (records after it are newer)."""
        return len(self.records)

    async def wait_for(
        self, event: str, *, after: int = 0, timeout: float = 10.0, **match: Any
    ) -> dict[str, Any] | None:
        """The first record of ``event`` with the given fields from index ``after`` on,
        once it is there; None after ``timeout``."""
        with trio.move_on_after(timeout):
            while True:
                for record in self.records[after:]:
                    if record.get("event") == event and all(
                        record.get(k) == v for k, v in match.items()
                    ):
                        return record
                await self._read()
        return None

    async def aclose(self) -> None:
        await self._out.aclose()


async def start_mcp_fake(
    procs: ProcessSet, name: str = "mcp_http", label: str = "http"
) -> McpFakeControl:
    proc = procs.spawn_piped(name, ["-m", "bench.mcp_fake", "--label", label])
    control = McpFakeControl(proc)
    await control.wait_ready()
    return control


# ---------------------------------------------------------------------------- the child


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--label", default="http", help="the HTTP server's record label")
    args = parser.parse_args(argv)

    from fakes.mcp_server import McpHttpFake, McpRecorder

    send, receive = trio.open_memory_channel[bytes](1 << 16)

    class StampingRecorder(McpRecorder):
        def record(self, event: dict[str, Any]) -> None:
            event = {**event, "at": event.get("at", time.monotonic())}
            super().record(event)
            send.send_nowait(json.dumps(event).encode() + b"\n")

    async def writer() -> None:
        out = trio.lowlevel.FdStream(os.dup(1))
        async with out:
            async for line in receive:
                await out.send_all(line)

    async def run() -> None:
        recorder = StampingRecorder()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(writer)
            await recorder.start(nursery)
            server = McpHttpFake(args.label, recorder)
            await server.start(nursery)
            # What start-up made (the SDK, pydantic, starlette: most of the heap) is kept out
            # of the collector's way: a full collection walking it paused this process for
            # ~40 ms, which showed as a cancel seen late (a pause of the fake, not Tether's).
            gc.collect()
            gc.freeze()
            send.send_nowait(f"READY {server.url} {recorder.port}\n".encode())

    trio.run(run)


if __name__ == "__main__":
    main()
