"""Appends written behind: from every task of the process they go out together, one
pipeline per round trip, and a task does not wait for Redis to answer; its end waits for
its writes."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import coredis.exceptions
import trio

from server.tasks.errors import BackendUnavailable
from server.tasks.log import LogClosed
from server.tasks.redis import scripts
from server.tasks.redis.connection import PRIMARY_MOVED, RESEND_PAUSE_S, RedisConnection
from server.tasks.redis.errors import TRANSIENT

log = logging.getLogger("tether.redis")

# Appends queued for Redis at most, from all tasks of the process: past it, Redis is too far
# behind and a task waits before it appends.
MAX_QUEUED_WRITES = 10_000


@dataclass(eq=False)
class _Write:
    """One append waiting for the next pipeline."""

    task_id: str
    keys: list[str]
    args: list[str]
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None


class WriteBehind:
    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn
        self._writes: list[_Write] = []
        self._wanted = trio.Event()
        self._room = trio.Event()  # set when the queue has room again
        # Each running task's latest write (its end waits for it), and the first write of
        # a task that Redis refused (its next append raises it).
        self._last: dict[str, _Write] = {}
        self._failures: dict[str, Exception] = {}

    def failure(self, task_id: str) -> Exception | None:
        """Why Redis refused a write of the task, if it did."""
        return self._failures.get(task_id)

    async def wait_for_room(self) -> None:
        """Wait while Redis is too far behind (``MAX_QUEUED_WRITES``); cancelling it only
        stops the wait."""
        while len(self._writes) >= MAX_QUEUED_WRITES:
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()

    def queue(self, task_id: str, keys: list[str], args: list[str]) -> None:
        """Queue an append script's call for the next pipeline. Synchronous."""
        write = _Write(task_id, keys, args)
        self._writes.append(write)
        self._last[task_id] = write
        self._wanted.set()

    async def flushed(self, task_id: str) -> None:
        """Wait until the task's queued writes have had Redis's answer (bounded), and
        forget its refusal: the task is ending."""
        write = self._last.pop(task_id, None)
        if write is not None:
            with trio.move_on_after(self._conn.timeout_s):
                await write.done.wait()
        self._failures.pop(task_id, None)

    @staticmethod
    def _refused(task_id: str, result: Any) -> Exception | None:
        """Why Redis did not take a write (None: it did)."""
        if result in (1, 2):  # 2: written already, by a retried send
            return None
        if result == 0:
            return LogClosed(f"task {task_id} was ended elsewhere")
        if result == -1:
            return BackendUnavailable(f"Redis no longer holds task {task_id}")
        if result == -2:
            return BackendUnavailable(f"the log of task {task_id} moved on without it")
        return BackendUnavailable(f"Redis failed: {result}")

    async def run(self) -> None:
        """Send what piled up meanwhile in one pipeline, and repeat: appends of every task
        of this process share the round trips, and one pipeline at a time keeps each
        task's writes in order. Runs until cancelled."""
        while True:
            await self._wanted.wait()
            self._wanted = trio.Event()
            batch, self._writes = self._writes, []
            self._room.set()
            if not batch:
                continue
            try:
                results = await self._send(batch)
            except Exception as exc:  # noqa: BLE001 - every write of the batch failed
                results = [exc] * len(batch)
            for write, result in zip(batch, results, strict=True):
                write.result = result
                write.done.set()
                refusal = self._refused(write.task_id, result)
                if refusal is not None:
                    self._failures.setdefault(write.task_id, refusal)

    async def _send(self, batch: list[_Write]) -> list[Any]:
        """Send the batch; while Redis cannot be reached, or a demoted primary refuses the
        writes (a failover under way), send it again, for ``timeout_s`` at most: the
        tasks go on through a short failover. Each task's later writes wait behind it, so
        their order holds. Raises what the last send raised once that time is up."""
        deadline = trio.current_time() + self._conn.timeout_s
        loaded = False
        while True:
            results = await self._conn.through_failover(partial(self._pipeline, batch))
            if not loaded and any(isinstance(r, coredis.exceptions.NoScriptError) for r in results):
                # Redis restarted (or a replica took over) and does not know the script:
                # load it and send again (the script is idempotent: a write already made
                # answers 2).
                await self._conn.commands.script_load(scripts.APPEND)
                loaded = True
                continue
            if any(isinstance(r, PRIMARY_MOVED) for r in results):
                self._conn.primary_moved()
            if trio.current_time() < deadline and any(isinstance(r, TRANSIENT) for r in results):
                await trio.sleep(RESEND_PAUSE_S)
                continue
            return results

    async def _pipeline(self, batch: list[_Write]) -> list[Any]:
        async with self._conn.commands.pipeline(transaction=False, raise_on_error=False) as pipe:
            for write in batch:
                pipe.evalsha(self._conn.append.sha, keys=write.keys, args=write.args)
        return list(pipe.results or ())
