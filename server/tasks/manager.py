"""The task runtime: admission, one cancel scope per task, stop, and the terminal event.

The manager owns a nursery for the server's lifetime. Each admitted request becomes a task
that runs the pipeline inside its own ``trio.CancelScope``; ``stop()`` cancels that scope
synchronously and records why, so a caller that is itself being cancelled (its client went
away) can stop its task from a ``finally`` without awaiting anything. The runner catches the
outcome after the scope has exited and writes exactly one terminal event with whatever
content was produced, so nothing needs shielding and a cancel never loses the partial answer.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from server.config import Settings
from server.metrics import Metrics
from server.schemas import (
    CancelReason,
    ChatRequest,
    Phase,
    RequestError,
    TaskFailure,
    TaskRecord,
)
from server.tasks.backend import TaskBackend

log = logging.getLogger("tether.tasks")


class TaskEmitter:
    """The pipeline's ``emit``: turns reports into events and keeps the task's state current."""

    def __init__(self, manager: TaskManager, record: TaskRecord) -> None:
        self._manager = manager
        self._record = record

    async def __call__(self, type_: str, data: dict[str, Any]) -> None:
        record = self._record
        if type_ == "delta":
            record.content += data.get("content", "")
            record.reasoning += data.get("reasoning", "")
        elif type_ == "source":
            record.sources.append(data)
        elif type_ == "status" and data.get("error"):
            # A step that failed while the task went on: count it by what failed.
            kind = _STEP_KINDS.get(str(data.get("action")), "other")
            self._manager.metrics.upstream_errors.labels(kind).inc()
        await self._manager.backend.append(record, type_, data)

    async def set_phase(self, phase: Phase) -> None:
        record = self._record
        if record.phase != phase:
            self._manager.metrics.tasks_active.labels(record.phase).dec()
            self._manager.metrics.tasks_active.labels(phase).inc()
            record.phase = phase
            await self._manager.backend.save(record)

    def set_result(
        self,
        *,
        usage: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
    ) -> None:
        if usage is not None:
            self._record.usage = usage
        if finish_reason is not None:
            self._record.finish_reason = finish_reason
        if tool_calls is not None:
            self._record.tool_calls.extend(tool_calls)


Runner = Callable[[ChatRequest, TaskEmitter], Awaitable[None]]
_STEP_KINDS = {"queries": "query_model", "search": "search", "fetch": "page", "tool_call": "tool"}
SpawnListener = Callable[[TaskRecord], None]


@dataclass
class RunningTask:
    record: TaskRecord
    request: ChatRequest
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    ended: trio.Event = field(default_factory=trio.Event)
    cancel_reason: CancelReason | None = None


def new_task_id() -> str:
    return "task_" + secrets.token_hex(12)


class TaskManager:
    def __init__(
        self, settings: Settings, backend: TaskBackend, runner: Runner, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.backend = backend
        self.metrics = metrics
        self._runner = runner
        self._running: dict[str, RunningTask] = {}
        self._nursery: trio.Nursery | None = None
        self._closing = trio.Event()
        self._swept = trio.Event()
        self._spawn_listeners: list[SpawnListener] = []
        self.accepting = False

    # -- lifetime -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the task nursery until ``shutdown()``. Cancelling it cancels every task, and
        each still writes its terminal event (reason ``shutdown``)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            nursery.start_soon(self._expire_loop)
            self.accepting = True
            task_status.started()
            await self._closing.wait()
            nursery.cancel_scope.cancel()
        self._nursery = None

    def begin_shutdown(self) -> None:
        """Refuse new tasks and stop the running ones with reason ``shutdown``, so that
        their streams end before the server closes its connections. Synchronous."""
        self.accepting = False
        for task_id in list(self._running):
            self.stop(task_id, "shutdown")

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """``begin_shutdown``, wait for the terminal events (at most ``grace_s``), then
        close the nursery."""
        self.begin_shutdown()
        with trio.move_on_after(grace_s):
            for rt in list(self._running.values()):
                await rt.ended.wait()
        self._closing.set()

    async def _expire_loop(self) -> None:
        period = max(0.05, min(self.settings.task_retention_s / 4, 30.0))
        while True:
            await trio.sleep(period)
            await self.backend.expire(time.time(), self.settings.task_retention_s)
            swept, self._swept = self._swept, trio.Event()
            swept.set()

    async def wait_sweep(self) -> None:
        """Wait until the next retention sweep has run."""
        await self._swept.wait()

    # -- spawning -------------------------------------------------------------------------

    def add_spawn_listener(self, listener: SpawnListener) -> None:
        """Called synchronously with each new task's record (WebSocket sessions use it)."""
        self._spawn_listeners.append(listener)

    async def spawn(self, user: str, request: ChatRequest) -> TaskRecord:
        """Admit a task and start it. Awaits nothing but admission; raises ``RequestError``
        (429 past the limits, 503 while shutting down).

    Cancelling it before it returns leaves no task behind: it does not
        checkpoint between admission and start.
    """
        nursery = self._nursery
        if nursery is None or not self.accepting:
            raise RequestError(503, "shutting_down", "The server is shutting down.")
        record = TaskRecord(
            id=new_task_id(),
            user=user,
            model=request.model,
            mode=request.mode,
            chat_id=request.chat_id,
            message_id=request.message_id,
            session_id=request.session_id,
            session_bound=request.session_id is not None and not request.background,
        )
        admitted = await self.backend.admit(
            record,
            max_total=self.settings.max_active_tasks,
            max_per_user=self.settings.max_active_tasks_per_user,
        )
        if not admitted:
            self.metrics.rejected.labels("too_many_tasks").inc()
            raise RequestError(
                429,
                "too_many_tasks",
                "Too many active tasks; retry after some have ended.",
                headers={"Retry-After": "1"},
            )
        await self.backend.append(record, "task:queued", {})
        rt = RunningTask(record=record, request=request)
        if self.settings.task_timeout_s > 0:
            rt.scope.relative_deadline = self.settings.task_timeout_s
        self._running[record.id] = rt
        self.metrics.tasks_active.labels("queued").inc()
        nursery.start_soon(self._run_task, rt, name=f"task {record.id}")
        for listener in self._spawn_listeners:
            try:
                listener(record)
            except Exception:  # a listener's bug must not orphan the task
                log.exception("spawn listener failed for %s", record.id)
        return record

    async def _run_task(self, rt: RunningTask) -> None:
        record = rt.record
        emitter = TaskEmitter(self, record)
        completed = False
        failure: BaseException | None = None
        try:
            with rt.scope:
                record.status = "running"
                record.started_at = time.time()
                log.info("task=%s started mode=%s model=%s user=%s", record.id, record.mode,
                         record.model, record.user)
                await self.backend.save(record)
                await emitter("task:started", {})
                await self._runner(rt.request, emitter)
                completed = True
        except Exception as exc:  # caught here: escaping, it would close the task nursery
            failure = exc
        finally:
            # Reached with the task's scope already exited. Only a shutdown cancels from
            # outside it, and the writes below do not block on the in-memory backend.
            timed_out = rt.scope.cancelled_caught and rt.cancel_reason is None
            await self._finish(rt, emitter, completed=completed, failure=failure,
                               timed_out=timed_out)

    async def _finish(
        self,
        rt: RunningTask,
        emitter: TaskEmitter,
        *,
        completed: bool,
        failure: BaseException | None,
        timed_out: bool,
    ) -> None:
        record = rt.record
        record.ended_at = time.time()
        if failure is not None:
            record.status = "failed"
            record.error = describe_failure(failure, record.phase)
            kind = "model" if record.error["type"] == "upstream_error" else "internal"
            self.metrics.upstream_errors.labels(kind).inc()
        elif completed:
            record.status = "completed"
            await emitter.set_phase("done")
        else:
            record.status = "cancelled"
            record.cancel_reason = "timeout" if timed_out else (rt.cancel_reason or "shutdown")
            self.metrics.cancels.labels(record.cancel_reason, record.phase).inc()
        self.metrics.tasks_active.labels(record.phase).dec()
        self.metrics.tasks_total.labels(record.mode, record.status).inc()
        started = record.started_at or record.ended_at
        log.info("task=%s %s mode=%s phase=%s reason=%s error=%s queued_s=%.3f run_s=%.3f "
                 "chars=%d", record.id, record.status, record.mode, record.phase,
                 record.cancel_reason, record.error["type"] if record.error else None,
                 started - record.created_at, record.ended_at - started, len(record.content))
        await self.backend.save(record)
        # The terminal event carries the task as it ends, its own seq included.
        record.last_seq += 1
        try:
            await self.backend.append(record, "task:" + record.status, record.to_dict())
        finally:
            self._running.pop(record.id, None)
            rt.ended.set()

    # -- control --------------------------------------------------------------------------

    def stop(self, task_id: str, reason: CancelReason) -> bool:
        """Cancel a running task's scope and record why. Synchronous; returns whether the
        task was still running. The first reason given wins."""
        rt = self._running.get(task_id)
        if rt is None:
            return False
        if rt.cancel_reason is None:
            rt.cancel_reason = reason
        rt.scope.cancel()
        return True

    async def wait_ended(self, task_id: str) -> None:
        """Wait for the task's terminal event to be written. Cancelling it only stops the
        wait; the task goes on."""
        rt = self._running.get(task_id)
        if rt is not None:
            await rt.ended.wait()

    def is_running(self, task_id: str) -> bool:
        return task_id in self._running

    async def get(self, user: str, task_id: str) -> TaskRecord | None:
        """The task if it exists and belongs to ``user``; another user's task is unknown."""
        record = await self.backend.get(task_id)
        if record is None or record.user != user:
            return None
        return record

    async def stop_and_wait(
        self, user: str, task_id: str, reason: CancelReason
    ) -> TaskRecord | None:
        """Stop the user's task and return it once it has ended (idempotent).

    Cancelling it stops only the wait.
    """
        record = await self.get(user, task_id)
        if record is None:
            return None
        self.stop(task_id, reason)
        await self.wait_ended(task_id)
        return record

    def session_tasks(self, session_id: str) -> list[str]:
        """Running tasks bound to a WebSocket session (``background: true`` never is)."""
        return [
            task_id
            for task_id, rt in self._running.items()
            if rt.record.session_id == session_id and rt.record.session_bound
        ]

    @property
    def running_count(self) -> int:
        return len(self._running)


def describe_failure(failure: BaseException, phase: str) -> dict[str, Any]:
    """The task's ``error`` for an exception, without a traceback for the client."""
    leaf = _first_leaf(failure)
    if isinstance(leaf, TaskFailure):
        return {"phase": phase, "type": leaf.type, "message": leaf.message}
    log.error("task failed in phase %s", phase, exc_info=failure)
    return {"phase": phase, "type": "internal_error", "message": "Internal error in the task."}


def _first_leaf(exc: BaseException) -> BaseException:
    while isinstance(exc, BaseExceptionGroup):
        real = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (real or list(exc.exceptions))[0]
    return exc
