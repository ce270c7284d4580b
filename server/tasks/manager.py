"""The task runtime: admission, one cancel scope per task, stop, and the terminal event.

The manager owns a nursery for the server's lifetime. Each admitted request becomes a task
that runs the pipeline inside its own ``trio.CancelScope``; ``stop()`` cancels that scope
synchronously and records why, so a caller that is itself being cancelled (its client went
away) can stop its task from a ``finally`` without awaiting anything. The runner catches the
outcome after the scope has exited and writes exactly one terminal event with whatever
content was produced (a shielded step with a deadline), so a cancel never loses the partial
answer.

The manager owns the tasks' lifecycle (admission, running, stopping, ending); readers of
the state (records, logs, watches) use its ``store`` directly, and WebSocket sessions its
``cluster``.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, cast

import trio
from opentelemetry.trace import Span

from server.config import Settings
from server.events import (
    DeltaData,
    EventType,
    SourceData,
    StatusData,
    choice_changes,
    record_changes,
)
from server.exception_groups import first_leaf
from server.metrics import Metrics
from server.record import CancelReason, Phase, TaskError, TaskRecord, Usage
from server.schemas import ChatRequest, TaskFailure
from server.tasks.backend import Backend, TaskStore, next_events
from server.tasks.errors import BackendUnavailable, ShuttingDown, TooManyTasks
from server.tasks.log import LogClosed
from server.tasks.steps import Step, StepKind, Steps, StepState, state_in_log
from server.tracing import Attributes, ResumeVia, Tracing, now_ns

log = logging.getLogger("tether.tasks")


class TaskEmitter:
    """The pipeline's ``emit``: turns reports into events and keeps the task's record
    current, here and in the store."""

    def __init__(
        self,
        metrics: Metrics,
        store: TaskStore,
        record: TaskRecord,
        *,
        max_events: int,
        max_content_chars: int,
        steps: Steps | None = None,
    ) -> None:
        self.steps = steps or Steps()
        self._metrics = metrics
        self._store = store
        self._record = record
        self._max_events = max_events
        self._max_content_chars = max_content_chars
        # A task's steps run side by side (page reads, tool calls) and each reports as it
        # goes; an append takes the next seq, which on a shared store is a round trip
        # away. One append at a time per task, in the order they came.
        self._appending = trio.StrictFIFOLock()
        # The text of the choices after the first (n > 1): it counts against the bound on
        # the answer's size as choice 0's does.
        self._other_chars = 0

    async def delta(self, data: DeltaData) -> None:
        """A piece of the answer (see ``_append`` for cancellation)."""
        await self._append("delta", cast(dict[str, Any], data))

    async def status(self, data: StatusData) -> None:
        """A step began, progressed or ended (see ``_append`` for cancellation)."""
        if data.get("error"):
            # A step that failed while the task went on: count it by what failed.
            self._metrics.upstream_errors.labels(_STEP_KINDS[data["action"]]).inc()
        await self._append("status", cast(dict[str, Any], data))

    async def source(self, data: SourceData) -> None:
        """A cited source (see ``_append`` for cancellation)."""
        await self._append("source", cast(dict[str, Any], data))

    async def started(self) -> None:
        await self._append("task:started", {})

    async def _append(self, type_: EventType, data: dict[str, Any]) -> None:
        """Append an event to the task's log. Cancelled while waiting for an earlier
        append of the task, it writes nothing; once its own append has begun, that append
        completes (the store shields it)."""
        async with self._appending:
            self._check_bounds(type_, data)
            # The store applies the event to its copy of the record; this is ours.
            await self._store.append(self._record, type_, data)
            content, reasoning, source = record_changes(type_, data)
            record = self._record
            if content:
                record.content += content
            if reasoning:
                record.reasoning += reasoning
            if source is not None:
                record.sources.append(source)
            choice = choice_changes(type_, data)
            if choice is not None:
                record.add_to_choice(*choice)
                self._other_chars += len(choice[1])

    def _check_bounds(self, type_: EventType, data: dict[str, Any]) -> None:
        """Raise ``TaskFailure`` (``task_too_large``) before an event that would take the
        task past its bounds; the task then ends failed with what it has so far, its
        terminal event the one place left in its log."""
        record = self._record
        if record.last_seq + 2 > self._max_events:
            raise TaskFailure(
                "task_too_large", f"The task reached its limit of {self._max_events} events."
            )
        if type_ == "delta":
            grown = (
                len(record.content)
                + len(data.get("content", ""))
                + len(record.reasoning)
                + len(data.get("reasoning", ""))
                + self._other_chars
            )
            if grown > self._max_content_chars:
                raise TaskFailure(
                    "task_too_large",
                    f"The answer reached its limit of {self._max_content_chars} characters.",
                )

    async def set_phase(self, phase: Phase) -> None:
        if self._record.phase != phase:
            enter_phase(self._metrics, self._record, phase)
            await self._store.save(self._record)

    async def set_result(
        self,
        *,
        usage: dict[str, Any] | None = None,
        finish_reason: str | None = None,
        tool_calls: list[dict[str, Any]] | None = None,
        other_finish_reasons: dict[int, str] | None = None,
    ) -> None:
        if usage is not None:
            self._record.usage = cast(Usage, usage)
        if finish_reason is not None:
            self._record.finish_reason = finish_reason
        if tool_calls is not None:
            self._record.tool_calls.extend(tool_calls)
        for index, reason in (other_finish_reasons or {}).items():
            self._record.other_choice(index)["finish_reason"] = reason
        await self._store.save(self._record)

    def keep_usage(self, usage: dict[str, Any] | None) -> None:
        if usage is not None:
            self._record.usage = cast(Usage, usage)

    def step(
        self,
        step_id: str,
        kind: StepKind,
        *,
        deadline_s: float | None = None,
        attributes: Attributes | None = None,
    ) -> AbstractContextManager[Step]:
        """Run a block as a step that a skip can cut, for ``deadline_s`` at most (see
        ``Steps.step``)."""
        deadline = math.inf if deadline_s is None else trio.current_time() + deadline_s
        return self.steps.step(step_id, kind, deadline=deadline, attributes=attributes)


Runner = Callable[[ChatRequest, TaskEmitter], Awaitable[None]]
_STEP_KINDS = {"queries": "query_model", "search": "search", "fetch": "page", "tool_call": "tool"}
SpawnListener = Callable[[TaskRecord], None]
FollowListener = Callable[[str, str], None]


@dataclass
class RunningTask:
    record: TaskRecord
    request: ChatRequest
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    ended: trio.Event = field(default_factory=trio.Event)
    cancel_reason: CancelReason | None = None
    steps: Steps = field(default_factory=Steps)
    # When the stop was received (trio's clock), and the step it found running.
    stop_received: float | None = None
    cancel_step: dict[str, Any] | None = None
    # Traced: the caller's ``traceparent``, and the admission's time (epoch ns), when the
    # task's root span and its ``queued`` child begin.
    trace_parent: str | None = None
    admitted_ns: int = 0
    # Ended by another process, which took this one for dead (``TaskManager.lost``): the
    # task stops with this failure and writes nothing more.
    lost: LogClosed | None = None


# How long a skip's answer waits for its step to end (its connections closed): a step
# ends within a millisecond, unless its clean-up waits on a server.
SKIP_ANSWER_WAIT_S = 1.0


def new_task_id(prefix: str = "task_") -> str:
    return prefix + secrets.token_hex(12)


class TaskManager:
    def __init__(
        self,
        settings: Settings,
        backend: Backend,
        runner: Runner,
        metrics: Metrics,
        tracing: Tracing | None = None,
    ) -> None:
        self.settings = settings
        self.tracing = tracing or Tracing(None)
        # Readers use the store directly; sessions use the cluster.
        self.store = backend.store
        self.cluster = backend.cluster
        self._admission = backend.admission
        self.metrics = metrics
        self._runner = runner
        self._running: dict[str, RunningTask] = {}
        self._nursery: trio.Nursery | None = None
        self._closing = trio.Event()
        self._spawn_listeners: list[SpawnListener] = []
        self._reach_listeners: list[Callable[[bool], None]] = []
        self._follow_listeners: list[FollowListener] = []
        self.accepting = False

    # -- lifetime -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Own the task nursery until ``shutdown()``. Cancelling it cancels every task, and
        each still writes its terminal event (reason ``shutdown``)."""
        cluster_done = trio.Event()
        async with trio.open_nursery() as outer:
            await outer.start(self._serve_cluster, cluster_done)
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._expire_loop)
                    self.accepting = True
                    task_status.started()
                    await self._closing.wait()
                    nursery.cancel_scope.cancel()
            finally:
                self._nursery = None
                # Every task has written its terminal event (or given up): the backend
                # may go.
                cluster_done.set()

    async def _serve_cluster(
        self, done: trio.Event, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        # Shielded: even when the manager is cancelled from outside, the backend's
        # connections must outlive the tasks' terminal writes. It ends on ``done``.
        with trio.CancelScope(shield=True):
            await self.cluster.serve(self, done, task_status=task_status)

    def begin_shutdown(self) -> None:
        """Refuse new tasks and stop the running ones with reason ``shutdown``, so that
        their streams end before the server closes its connections. Synchronous."""
        self.accepting = False
        for task_id in list(self._running):
            self.cancel(task_id, "shutdown")

    async def shutdown(self, grace_s: float = 5.0) -> None:
        """``begin_shutdown``, wait for the terminal events (at most ``grace_s``), then
        close the nursery."""
        self.begin_shutdown()
        with trio.move_on_after(grace_s):
            await self.wait_all_ended()
        self._closing.set()

    async def wait_all_ended(self) -> None:
        """Wait until every task running now has written its terminal event."""
        for running in list(self._running.values()):
            await running.ended.wait()

    async def _expire_loop(self) -> None:
        period = max(0.05, min(self.settings.task_retention_s / 4, 30.0))
        while True:
            await trio.sleep(period)
            await self.store.expire(
                time.time(), self.settings.task_retention_s, self.settings.max_retained_tasks
            )

    # -- spawning -------------------------------------------------------------------------

    def add_spawn_listener(self, listener: SpawnListener) -> None:
        """Called synchronously with each new task's record (WebSocket sessions use it)."""
        self._spawn_listeners.append(listener)

    def add_reach_listener(self, listener: Callable[[bool], None]) -> None:
        """Called with False when the backend finds this process cut off from the task
        store (its readers are let go), and with True when it is back."""
        self._reach_listeners.append(listener)

    def reach_changed(self, reachable: bool) -> None:
        """``Control``'s: the backend's news of this process's reach to the task store."""
        for listener in self._reach_listeners:
            try:
                listener(reachable)
            except Exception:
                log.exception("reach listener failed")

    def add_follow_listener(self, listener: FollowListener) -> None:
        """Called with ``(session_id, task_id)`` for each task of a session that another
        process started (WebSocket sessions use it, as ``add_spawn_listener``)."""
        self._follow_listeners.append(listener)

    def follow(self, session_id: str, task_id: str) -> None:
        """The cluster's news of a task started elsewhere in a session."""
        for listener in self._follow_listeners:
            try:
                listener(session_id, task_id)
            except Exception:
                log.exception("follow listener failed for %s", task_id)

    async def spawn(
        self, user: str, request: ChatRequest, *, trace_parent: str | None = None
    ) -> TaskRecord:
        """Admit a task and start it; return a copy of its record. Awaits nothing but
        admission: ``TooManyTasks`` past the limits, ``ShuttingDown`` while shutting
        down, ``BackendUnavailable`` if the backend fails or does not answer in time.
        Traced, the task's trace is a child of ``trace_parent`` (a W3C ``traceparent``).

        Admission (a place, then the record and its first event) is shielded: a caller
        cancelled meanwhile gets its task started all the same (and its own clean-up
        stops it, as for any task of a connection that went away), never a place without
        a task. From there to the start there is no checkpoint.
        """
        nursery = self._nursery
        if nursery is None or not self.accepting:
            raise ShuttingDown("The server is shutting down.")
        record = TaskRecord(
            id=new_task_id("resp_" if request.response is not None else "task_"),
            user=user,
            model=request.model,
            mode=request.mode,
            chat_id=request.chat_id,
            message_id=request.message_id,
            session_id=request.session_id,
            session_bound=request.session_id is not None and not request.background,
            response=request.response,
        )
        with trio.CancelScope(shield=True) as step:
            step.relative_deadline = self.settings.backend_timeout_s
            admitted = await self._admit(record)
        if step.cancelled_caught:
            await self._release_quietly(record)
            raise BackendUnavailable("The task store did not answer in time; retry.")
        if not admitted:
            self.metrics.rejected.labels("too_many_tasks").inc()
            raise TooManyTasks("Too many active tasks; retry after some have ended.")
        running = RunningTask(record=record, request=request, trace_parent=trace_parent)
        if self.tracing.enabled:
            running.admitted_ns = now_ns()
        task_s = request.deadlines.get("task_s", self.settings.task_timeout_s)
        if task_s > 0:
            running.scope.relative_deadline = task_s
        self._running[record.id] = running
        self.metrics.tasks_active.labels("queued").inc()
        nursery.start_soon(self._run_task, running, name=f"task {record.id}")
        snapshot = record.copy()
        for listener in self._spawn_listeners:
            try:
                listener(snapshot)
            except Exception:  # a listener's bug must not orphan the task
                log.exception("spawn listener failed for %s", record.id)
        return snapshot

    async def _admit(self, record: TaskRecord) -> bool:
        """Reserve a place, then create the record; a record that could not be created
        gives its place back."""
        try:
            if not await self._admission.reserve(
                record,
                max_total=self.settings.max_active_tasks,
                max_per_user=self.settings.max_active_tasks_per_user,
            ):
                return False
            await self.store.create(record)
        except BackendUnavailable:
            await self._release_quietly(record)
            raise
        except Exception as exc:
            log.error("admission of %s failed", record.id, exc_info=exc)
            await self._release_quietly(record)
            raise BackendUnavailable("The task store failed; retry.") from exc
        return True

    async def _release_quietly(self, record: TaskRecord) -> None:
        with trio.CancelScope(shield=True) as step:
            step.relative_deadline = self.settings.backend_timeout_s
            try:
                await self._admission.release(record)
            except Exception as exc:  # noqa: BLE001 - logged; the place is the store's now
                log.warning("task=%s: its place was not released: %s", record.id, exc)

    async def _run_task(self, running: RunningTask) -> None:
        record = running.record
        emitter = TaskEmitter(
            self.metrics,
            self.store,
            record,
            max_events=self.settings.max_task_events,
            max_content_chars=self.settings.max_content_chars,
            steps=running.steps,
        )
        completed = False
        failure: BaseException | None = None
        # The root span is begun and ended here, in the task's own trio task, and is the
        # current span of everything the runner starts (trio copies the context).
        task_span = self.tracing.start_task(
            task_id=record.id,
            user=record.user,
            mode=record.mode,
            model=record.model,
            parent=running.trace_parent,
            admitted_ns=running.admitted_ns,
            stops=running,
        )
        if task_span is not None:
            record.trace = task_span.traceparent
        traced = task_span.activate() if task_span is not None else nullcontext()
        try:
            with traced, running.scope:
                record.status = "running"
                record.started_at = time.time()
                log.info(
                    "task=%s started mode=%s model=%s user=%s",
                    record.id,
                    record.mode,
                    record.model,
                    record.user,
                )
                await self.store.save(record)
                await emitter.started()
                await self._runner(running.request, emitter)
                completed = True
        except Exception as exc:  # caught here: escaping, it would close the task nursery
            failure = exc
        finally:
            if running.lost is not None and not completed:
                failure = running.lost
            # The task's scope has exited; what is left is the terminal write. It is
            # shielded, so that a shutdown cancelling the nursery meanwhile cannot cut it,
            # and bounded, so that a backend that does not answer cannot hold it.
            timed_out = (
                running.scope.cancelled_caught
                and running.cancel_reason is None
                and running.lost is None
            )
            with trio.CancelScope(shield=True) as step:
                step.relative_deadline = self.settings.backend_timeout_s
                await self._finish(
                    running, completed=completed, failure=failure, timed_out=timed_out
                )
            if step.cancelled_caught:
                log.error(
                    "task=%s: the terminal event was not written in %.1f s",
                    record.id,
                    self.settings.backend_timeout_s,
                )
            if task_span is not None:
                task_span.end(
                    status=record.status,
                    cancel_reason=record.cancel_reason,
                    finish_reason=record.finish_reason,
                    stop_ms=record.stop_ms,
                    error_type=record.error["type"] if record.error else None,
                )

    async def _finish(
        self,
        running: RunningTask,
        *,
        completed: bool,
        failure: BaseException | None,
        timed_out: bool,
    ) -> None:
        """Decide how the task ended, once, and write it: the store writes the terminal
        event, with the record as it ends, in the same step as the record itself; then
        the task's place is released."""
        record = running.record
        record.ended_at = time.time()
        if failure is not None:
            record.status = "failed"
            record.error = describe_failure(failure, record.phase)
            kind = "model" if record.error["type"] == "upstream_error" else "internal"
            self.metrics.upstream_errors.labels(kind).inc()
        elif completed:
            record.status = "completed"
            enter_phase(self.metrics, record, "done")
        elif timed_out:
            # The task's deadline: an answer cut short, not a failure; the text it has is
            # the answer.
            record.status = "completed"
            record.finish_reason = "length"
            record.deadline = "task"
        else:
            record.status = "cancelled"
            record.cancel_reason = running.cancel_reason or "shutdown"
            record.cancel_step = running.cancel_step
            if running.stop_received is not None:
                stop_s = trio.current_time() - running.stop_received
                record.stop_ms = round(stop_s * 1000, 3)
                self.metrics.stop_seconds.observe(stop_s)
            self.metrics.cancels.labels(record.cancel_reason, record.phase).inc()
        self.metrics.tasks_active.labels(record.phase).dec()
        self.metrics.tasks_total.labels(record.mode, record.status).inc()
        started = record.started_at or record.ended_at
        log.info(
            "task=%s %s mode=%s phase=%s reason=%s error=%s queued_s=%.3f run_s=%.3f chars=%d",
            record.id,
            record.status,
            record.mode,
            record.phase,
            record.cancel_reason,
            record.error["type"] if record.error else None,
            started - record.created_at,
            record.ended_at - started,
            len(record.content),
        )
        try:
            if await self.store.finish(record) is None:
                log.warning("task=%s had already been ended elsewhere", record.id)
        except Exception:
            log.exception("task=%s: the terminal event was not written", record.id)
        finally:
            self._running.pop(record.id, None)
            await self._release_quietly(record)
            running.ended.set()

    # -- control --------------------------------------------------------------------------

    def cancel(self, task_id: str, reason: CancelReason) -> bool:
        """Cancel the scope of a task run by this process and record why. Synchronous;
        returns whether the task was running here. The first reason given wins."""
        running = self._running.get(task_id)
        if running is None:
            return False
        if running.cancel_reason is None:
            running.cancel_reason = reason
            running.stop_received = trio.current_time()
            running.cancel_step = _landing(running.steps.running())
        running.scope.cancel()
        return True

    def skip(self, task_id: str, step: str, by: str) -> object:
        """``Control``'s skip: one sent from another process for a task run here."""
        running = self._running.get(task_id)
        return None if running is None else running.steps.skip(step, by)

    def running_here(self) -> list[str]:
        """``Control``'s: the tasks this process runs."""
        return list(self._running)

    def lost(self, task_id: str, why: str) -> bool:
        """``Control``'s: another process ended a task run here, taking this one for dead
        (its heartbeat lapsed). Its scope is cancelled at once, whatever it waits on, and
        it ends ``failed`` (``ended_elsewhere``) here; the store keeps the other's end."""
        running = self._running.get(task_id)
        if running is None:
            return False
        if running.lost is None:
            log.warning("task=%s was ended elsewhere: %s", task_id, why)
            running.lost = LogClosed(why)
        running.scope.cancel()
        return True

    async def skip_step(self, task_id: str, step_id: str, by: str) -> tuple[StepState, bool] | None:
        """Skip a step of a task wherever it runs: its state after and whether it was
        running (see ``Steps.skip``); None if the task has no such step. A task run here is
        reached synchronously, and this returns once the step has ended (its connections
        closed), or after ``SKIP_ANSWER_WAIT_S`` if its clean-up takes longer (an MCP
        call's cancel notification to a server that does not answer); one run elsewhere
        through the cluster, its steps read from its log, and this returns once the skip
        is sent. Shielded, as a stop is: a caller that goes
        away has still given it (here, cancelling it only ends the wait)."""
        running = self._running.get(task_id)
        if running is not None:
            outcome = running.steps.skip(step_id, by)
            # Cancelling the step's scope only makes its trio tasks runnable: they close
            # the step's connections when they next run, and the caller would go on
            # first, to its answer (a few hundred microseconds of the event loop to build
            # and write it, before its next checkpoint), so a skip closed its step's
            # connection about twice as late as a stop, whose caller waits for the task's
            # end at once. Waiting for the step's end gives the loop to its unwinding
            # straight away, and the answer then says the step has ended.
            # Bounded: a step whose clean-up is slow (an MCP call's cancel notification to
            # a stuck server) does not hold the answer, nor a WebSocket's next command.
            with trio.move_on_after(SKIP_ANSWER_WAIT_S):
                await running.steps.wait_ended(step_id)
            return outcome
        with trio.CancelScope(shield=True) as step:
            step.relative_deadline = self.settings.backend_timeout_s
            events = await self.store.read(task_id, 0)
            state = state_in_log(events, step_id)
            if state != "running":
                return None if state is None else (state, False)
            if await self.cluster.send_skip(task_id, step_id, by):
                return "skipped", True
            return "cancelled", False  # the task ended meanwhile
        raise BackendUnavailable("The task store did not answer in time; retry.")

    async def stop(self, task_id: str, reason: CancelReason) -> bool:
        """Stop a task wherever it runs: ``cancel`` here, or a stop sent through the
        cluster to the process that runs it; returns whether it was running. Shielded
        like ``cancel`` is synchronous: a caller that goes away meanwhile (the client of
        an HTTP stop) has still given the stop."""
        if self.cancel(task_id, reason):
            return True
        with trio.CancelScope(shield=True) as step:
            step.relative_deadline = self.settings.backend_timeout_s
            if not self.tracing.enabled:
                return await self.cluster.send_stop(task_id, reason)
            # Traced: this replica's part of the stop is a span of its own, linked to the
            # task's trace (its root span, as the task's record carries it).
            record = await self.store.get(task_id)
            with self.tracing.linked_span(
                "tether.stop.send",
                record.trace if record is not None else None,
                {"tether.task.id": task_id, "tether.cancel_reason": reason},
            ):
                return await self.cluster.send_stop(task_id, reason)
        raise BackendUnavailable("The task store did not answer in time; retry.")

    def resume_span(
        self, record: TaskRecord, via: ResumeVia, after: int
    ) -> AbstractContextManager[Span | None]:
        """With tracing on, a span for a reader resuming a task that this process does not
        run (an SSE events stream, a Responses stream, a WebSocket subscribe), linked to the
        task's trace as a stop sent from here is; nothing for a task run here, whose own
        trace is this process's."""
        if not self.tracing.enabled or record.id in self._running:
            return nullcontext()
        return self.tracing.linked_span(
            "tether.resume",
            record.trace,
            {"tether.task.id": record.id, "tether.resume.via": via, "tether.resume.after": after},
        )

    async def resume_span_of(
        self, task_id: str, via: ResumeVia, after: int
    ) -> AbstractContextManager[Span | None]:
        """``resume_span`` for a task known by its id: its record is read only when there
        is a span to make (tracing on, the task run elsewhere)."""
        if not self.tracing.enabled or task_id in self._running:
            return nullcontext()
        record = await self.store.get(task_id)
        return nullcontext() if record is None else self.resume_span(record, via, after)

    async def wait_ended(self, task_id: str) -> TaskRecord | None:
        """Wait until the task has ended and return its record as it ended (None if it is
        unknown or expired). Cancelling it only stops the wait; the task goes on."""
        running = self._running.get(task_id)
        if running is not None:
            await running.ended.wait()
            return running.record.copy()  # the runner's own record is the one that ended
        # Not run here: its terminal event, which carries the record, is the sign.
        record = await self.store.get(task_id)
        if record is None or not record.active:
            return record
        cursor = record.last_seq
        while (events := await next_events(self.store, task_id, cursor)) is not None:
            if events and events[-1].terminal:
                return TaskRecord.from_dict(events[-1].data, session_bound=record.session_bound)
            cursor = events[-1].seq if events else cursor
        return await self.store.get(task_id)

    async def owns(self, user: str, task_id: str) -> bool:
        """Whether the task exists and belongs to ``user`` (its record is not read)."""
        return await self.store.user_of(task_id) == user

    async def get(self, user: str, task_id: str) -> TaskRecord | None:
        """The task if it exists and belongs to ``user``; another user's task is unknown."""
        record = await self.store.get(task_id)
        if record is None or record.user != user:
            return None
        return record

    @property
    def running_count(self) -> int:
        return len(self._running)


def _landing(running: list[Step]) -> dict[str, Any] | None:
    """The step a stop landed in: the most specific one running (a page read or a tool call
    over the search phase that holds it)."""
    if not running:
        return None
    order: dict[StepKind, int] = {"web_search": 0, "page": 1, "tool": 1}
    step = max(running, key=lambda s: order[s.kind])
    landed: dict[str, Any] = {"step": step.id, "kind": step.kind}
    if step.kind == "page":
        landed["url"] = step.id.removeprefix("page:")
    return landed


def enter_phase(metrics: Metrics, record: TaskRecord, phase: Phase) -> None:
    metrics.tasks_active.labels(record.phase).dec()
    metrics.tasks_active.labels(phase).inc()
    record.phase = phase


def describe_failure(failure: BaseException, phase: str) -> TaskError:
    """The task's ``error`` for an exception, without a traceback for the client."""
    leaf = first_leaf(failure)
    if isinstance(leaf, TaskFailure):
        return {"phase": phase, "type": leaf.type, "message": leaf.message}
    if isinstance(leaf, LogClosed):
        log.warning("task ended elsewhere in phase %s: %s", phase, leaf)
        return {"phase": phase, "type": "ended_elsewhere", "message": str(leaf)}
    if isinstance(leaf, BackendUnavailable):
        log.warning("task failed in phase %s: %s", phase, leaf.message)
        return {"phase": phase, "type": "backend_unavailable", "message": leaf.message}
    log.error("task failed in phase %s", phase, exc_info=failure)
    return {"phase": phase, "type": "internal_error", "message": "Internal error in the task."}
