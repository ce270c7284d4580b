"""The bench's side of its WebSocket client workers (``bench/wsworker.py``).

``WorkerPool`` starts the worker processes through the bench's ``ProcessSet`` (so they are
ended by pid with everything else), sends each one JSON commands on its stdin and reads its
JSON answers from its stdout.
"""

from __future__ import annotations

import json
import os
from typing import Any

import trio

from bench.procs import Proc, ProcessError, ProcessSet


class WorkerHandle:
    def __init__(self, proc: Proc) -> None:
        self.proc = proc
        assert proc.popen.stdin is not None and proc.popen.stdout is not None
        self._in = trio.lowlevel.FdStream(os.dup(proc.popen.stdin.fileno()))
        self._out = trio.lowlevel.FdStream(os.dup(proc.popen.stdout.fileno()))
        self._buf = b""
        self.lock = trio.Lock()

    @property
    def name(self) -> str:
        return self.proc.name

    async def _line(self) -> dict[str, Any]:
        while b"\n" not in self._buf:
            data = await self._out.receive_some(1 << 20)
            if not data:
                raise ProcessError(f"{self.name} exited:\n{self.proc.log_tail()}")
            self._buf += data
        line, _, self._buf = self._buf.partition(b"\n")
        answer: dict[str, Any] = json.loads(line)
        return answer

    async def call(self, cmd: dict[str, Any]) -> dict[str, Any]:
        async with self.lock:
            await self._in.send_all(json.dumps(cmd).encode() + b"\n")
            answer = await self._line()
        if "error" in answer:
            raise ProcessError(f"{self.name} {cmd.get('cmd')}: {answer['error']}")
        return answer

    async def aclose(self) -> None:
        await self._in.aclose()
        await self._out.aclose()


class WorkerPool:
    """``count`` client worker processes, started once and reused level after level."""

    def __init__(self, procs: ProcessSet, count: int) -> None:
        self.procs = procs
        self.count = count
        self.workers: list[WorkerHandle] = []

    async def start(self) -> None:
        async def one(i: int) -> None:
            proc = self.procs.spawn_piped(f"client{i}", ["-m", "bench.wsworker"])
            handle = WorkerHandle(proc)
            with trio.fail_after(30):
                hello = await handle._line()
            if not hello.get("ready"):
                raise ProcessError(f"client{i} said {hello!r}")
            self.workers.append(handle)

        async with trio.open_nursery() as nursery:
            for i in range(self.count):
                nursery.start_soon(one, i)
        self.workers.sort(key=lambda w: w.name)

    async def each(self, cmds: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
        """Send cmds[i] to worker i (None: skip), all at once; their answers in order."""
        answers: list[dict[str, Any]] = [{} for _ in cmds]

        async def one(i: int, cmd: dict[str, Any]) -> None:
            answers[i] = await self.workers[i].call(cmd)

        async with trio.open_nursery() as nursery:
            for i, cmd in enumerate(cmds):
                if cmd is not None:
                    nursery.start_soon(one, i, cmd)
        return answers

    async def all(self, cmd: dict[str, Any], used: int | None = None) -> list[dict[str, Any]]:
        n = self.count if used is None else used
        return await self.each([cmd] * n)

    async def stop(self) -> None:
        for worker in self.workers:
            if worker.proc.alive():
                with trio.move_on_after(5):
                    await worker._in.send_all(b'{"cmd": "quit"}\n')
            await worker.aclose()
            self.procs.kill(worker.proc, grace=2.0)
        self.workers = []


def split(n: int, parts: int) -> list[int]:
    """n clients over ``parts`` workers, as evenly as possible."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]
