"""Appends written behind: from every task of the process they go out together, one
pipeline per round trip, and a task does not wait for Redis to answer; its end waits for
its writes. Each write's ``on_written`` runs once Redis has taken it (the store shows the
event to readers here then, never before)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import coredis.exceptions
import trio

from server.tasks.errors import BackendUnavailable
from server.tasks.log import LogClosed
from server.tasks.redis import scripts
from server.tasks.redis.connection import RedisConnection
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
    on_written: Callable[[], None]
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

    def queue(
        self, task_id: str, keys: list[str], args: list[str], on_written: Callable[[], None]
    ) -> None:
        """Queue an append script's call for the next pipeline; ``on_written`` is called
        when Redis has taken it. Synchronous. Raises ``CrossSlot`` if the keys span hash
        slots."""
        self._conn.append.check(keys)
        write = _Write(task_id, keys, args, on_written)
        self._writes.append(write)
        self._last[task_id] = write
        self._wanted.set()

    async def flushed(self, task_id: str, within_s: float) -> None:
        """Wait until the task's queued writes have had Redis's answer (at most
        ``within_s``), and forget its refusal: the task is ending."""
        write = self._last.pop(task_id, None)
        if write is not None:
            with trio.move_on_after(within_s):
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
        if result == -3:
            return LogClosed(f"task {task_id} is no longer this replica's")
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
            results = await self._send(batch)
            for write, result in zip(batch, results, strict=True):
                write.result = result
                write.done.set()
                refusal = self._refused(write.task_id, result)
                if refusal is None:
                    write.on_written()
                elif write.task_id in self._last:  # still running: its next append fails
                    self._failures.setdefault(write.task_id, refusal)

    async def _send(self, batch: list[_Write]) -> list[Any]:
        """Each write's answer (or what it failed with). Writes that failed in a way a
        moment may cure (a Redis Cluster failing over or moving a slot, see
        ``TRANSIENT``) are sent again, with every later write of their task, until they
        are answered or ``timeout_s`` has passed: the task waits through a failover
        rather than fail. Sending again is safe: the append script answers 2 for a write
        it has made, and the writes of a task stay in order."""
        results = await self._send_once(batch)
        pause = 0.05
        with trio.move_on_after(self._conn.timeout_s):
            while again := self._to_send_again(batch, results):
                self._conn.noticed(results[again[0]])
                await trio.sleep(pause)
                pause = min(2 * pause, 0.5)
                answers = await self._send_once([batch[i] for i in again])
                for i, answer in zip(again, answers, strict=True):
                    results[i] = answer
        return results

    @staticmethod
    def _to_send_again(batch: list[_Write], results: list[Any]) -> list[int]:
        """The writes to send again: from a task's first transient failure, all of its
        writes (a later one was answered out of step, or failed the same way)."""
        failed: set[str] = set()
        out: list[int] = []
        for i, (write, result) in enumerate(zip(batch, results, strict=True)):
            if write.task_id in failed or isinstance(result, TRANSIENT):
                failed.add(write.task_id)
                out.append(i)
        return out

    async def _send_once(self, batch: list[_Write]) -> list[Any]:
        try:
            return await self._pipeline(batch)
        except Exception as exc:  # noqa: BLE001 - every write of the batch failed
            return [exc] * len(batch)

    async def _pipeline(self, batch: list[_Write]) -> list[Any]:
        commands = self._conn.commands
        for attempt in (1, 2):
            async with commands.pipeline(transaction=False, raise_on_error=False) as pipe:
                for write in batch:
                    pipe.evalsha(self._conn.append.sha, keys=write.keys, args=write.args)
            results = list(pipe.results or ())
            if attempt == 1 and any(
                isinstance(r, coredis.exceptions.NoScriptError) for r in results
            ):
                # Redis restarted and forgot the script: load it and send again (the
                # script is idempotent: a write already made answers 2).
                await commands.script_load(scripts.APPEND)
                continue
            return results
        return results
