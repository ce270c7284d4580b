"""The task state machine, without HTTP: queued → running → exactly one terminal state,
the reason decided once, admission and its refusals, and the terminal write's guarantees.

The runner is a function of the test's, driven by events; the backend is a real one, the
memory backend or the Redis backend on a real redis-server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import trio
import trio.testing

from server.config import Settings
from server.events import Event
from server.metrics import Metrics
from server.record import TaskRecord
from server.schemas import ChatRequest, TaskFailure, parse_chat_request
from server.tasks.errors import ShuttingDown, TooManyTasks
from server.tasks.manager import TaskEmitter, TaskManager
from server.tasks.memory import MemoryBackend, MemoryStore
from server.tasks.redis import redis_backend

WAIT = 10

Runner = Callable[[ChatRequest, TaskEmitter], Awaitable[None]]


def _request() -> ChatRequest:
    return parse_chat_request(
        {"messages": [{"role": "user", "content": "hi"}], "background": True}, default_model="m"
    )


class Script:
    """A runner the test steers: it reports, then waits until released or cancelled."""

    def __init__(self, fail: Exception | None = None) -> None:
        self.release = trio.Event()
        self.running = trio.Event()
        self.fail = fail

    async def __call__(self, request: ChatRequest, emit: TaskEmitter) -> None:
        await emit.set_phase("generating")
        await emit.delta({"content": "part"})
        self.running.set()
        await self.release.wait()
        if self.fail is not None:
            raise self.fail
        await emit.delta({"content": "ial"})
        await emit.set_result(usage={"total_tokens": 2}, finish_reason="stop")


pytestmark = pytest.mark.both_backends


@pytest.fixture
def make_backend(backend_settings: dict[str, Any]) -> Callable[[], Any]:
    """The backend of the module's run (memory or Redis), fresh for each manager."""

    def make() -> Any:
        if not backend_settings:
            return MemoryBackend()
        return redis_backend(backend_settings["redis_url"], prefix=backend_settings["redis_prefix"])

    return make


@asynccontextmanager
async def running_manager(
    runner: Runner, backend: Any, **overrides: Any
) -> AsyncIterator[TaskManager]:
    settings = Settings().with_overrides(**overrides)
    manager = TaskManager(settings, backend, runner, Metrics())
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        yield manager
        await manager.shutdown()


async def _events(manager: TaskManager, task_id: str) -> list[Event]:
    return await manager.store.read(task_id, 0)


def _terminals(events: list[Event]) -> list[Event]:
    return [e for e in events if e.terminal]


async def test_a_task_goes_queued_running_completed_with_one_terminal_event(
    make_backend: Callable[[], Any],
) -> None:
    script = Script()
    async with running_manager(script, make_backend()) as manager:
        record = await manager.spawn("u", _request())
        assert record.status == "queued" and record.last_seq == 1
        with trio.fail_after(WAIT):
            await script.running.wait()
            # Readable once the store has taken it (on Redis, once Redis has).
            assert await manager.store.wait_beyond(record.id, 2)
        running = await manager.store.get(record.id)
        assert running is not None
        assert (running.status, running.phase, running.content) == ("running", "generating", "part")
        script.release.set()
        ended = await manager.wait_ended(record.id)
    assert ended is not None and ended.status == "completed" and ended.phase == "done"
    events = await _events(manager, record.id)
    assert [e.type for e in events] == [
        "task:queued",
        "task:started",
        "delta",
        "delta",
        "task:completed",
    ]
    assert [e.seq for e in events] == [1, 2, 3, 4, 5]
    terminal = events[-1].data
    assert terminal["content"] == "partial" and terminal["last_seq"] == 5
    assert terminal["usage"] == {"total_tokens": 2} and terminal["finish_reason"] == "stop"
    stored = await manager.store.get(record.id)
    assert stored is not None and stored.to_dict() == terminal


async def test_the_first_stop_reason_wins_and_a_stop_after_the_end_changes_nothing(
    make_backend: Callable[[], Any],
) -> None:
    script = Script()
    async with running_manager(script, make_backend()) as manager:
        record = await manager.spawn("u", _request())
        with trio.fail_after(WAIT):
            await script.running.wait()
        assert manager.cancel(record.id, "stop")
        assert manager.cancel(record.id, "disconnect")  # still running until it unwinds
        with trio.fail_after(WAIT):
            ended = await manager.wait_ended(record.id)
        assert not manager.cancel(record.id, "shutdown")
    assert ended is not None
    assert (ended.status, ended.cancel_reason, ended.phase, ended.content) == (
        "cancelled",
        "stop",
        "generating",
        "part",
    )
    events = await _events(manager, record.id)
    assert [e.type for e in _terminals(events)] == ["task:cancelled"]
    assert events[-1].data["cancel_reason"] == "stop"


async def test_a_failure_ends_the_task_failed_in_its_phase(
    make_backend: Callable[[], Any],
) -> None:
    script = Script(fail=TaskFailure("upstream_error", "model said no"))
    async with running_manager(script, make_backend()) as manager:
        record = await manager.spawn("u", _request())
        script.release.set()
        with trio.fail_after(WAIT):
            ended = await manager.wait_ended(record.id)
    assert ended is not None and ended.status == "failed"
    assert ended.error == {
        "phase": "generating",
        "type": "upstream_error",
        "message": "model said no",
    }
    assert ended.content == "part"
    assert len(_terminals(await _events(manager, record.id))) == 1


async def test_the_task_deadline_ends_it_completed_with_the_text_it_has(
    make_backend: Callable[[], Any],
) -> None:
    script = Script()
    async with running_manager(script, make_backend(), task_timeout_s=0.2) as manager:
        record = await manager.spawn("u", _request())
        with trio.fail_after(WAIT):
            ended = await manager.wait_ended(record.id)
    assert ended is not None
    assert (ended.status, ended.deadline, ended.finish_reason) == ("completed", "task", "length")
    assert ended.content == "part" and ended.cancel_reason is None


async def test_shutdown_ends_running_tasks_and_refuses_new_ones(
    make_backend: Callable[[], Any],
) -> None:
    script = Script()
    async with running_manager(script, make_backend()) as manager:
        record = await manager.spawn("u", _request())
        with trio.fail_after(WAIT):
            await script.running.wait()
        with trio.fail_after(WAIT):
            await manager.shutdown()
        with pytest.raises(ShuttingDown):
            await manager.spawn("u", _request())
    ended = await manager.store.get(record.id)
    assert ended is not None and (ended.status, ended.cancel_reason) == ("cancelled", "shutdown")


async def test_admission_refuses_past_the_limits_and_frees_a_place_when_a_task_ends(
    make_backend: Callable[[], Any],
) -> None:
    script = Script()
    async with running_manager(
        script, make_backend(), max_active_tasks=2, max_active_tasks_per_user=1
    ) as manager:
        first = await manager.spawn("a", _request())
        with pytest.raises(TooManyTasks):
            await manager.spawn("a", _request())
        await manager.spawn("b", _request())
        with pytest.raises(TooManyTasks):
            await manager.spawn("c", _request())
        manager.cancel(first.id, "stop")
        with trio.fail_after(WAIT):
            await manager.wait_ended(first.id)
        await manager.spawn("c", _request())
        manager.begin_shutdown()


async def test_a_caller_cancelled_during_spawn_still_gets_a_started_task(
    make_backend: Callable[[], Any],
) -> None:
    """Admission is shielded: no reservation is ever left without its task."""
    script = Script()
    async with running_manager(script, make_backend()) as manager:
        with trio.CancelScope() as caller:
            caller.cancel()
            record = await manager.spawn("u", _request())
        assert not caller.cancelled_caught  # spawn itself did not checkpoint unshielded
        stored = await manager.store.get(record.id)
        assert stored is not None and stored.active
        with trio.fail_after(WAIT):
            await script.running.wait()
        manager.cancel(record.id, "disconnect")


class _SlowFinish(MemoryStore):
    """The memory store, with its terminal write held until the test lets it through,
    as a remote store's round trip would hold it."""

    def __init__(self) -> None:
        super().__init__()
        self.finishing = trio.Event()
        self.let_through = trio.Event()

    async def finish(self, record: TaskRecord) -> Event | None:
        self.finishing.set()
        await self.let_through.wait()
        return await super().finish(record)


async def test_the_terminal_write_survives_the_nursery_being_cancelled() -> None:
    backend = _SlowFinish()
    script = Script()
    manager = TaskManager(Settings(), MemoryBackend(store=backend), script, Metrics())
    async with trio.open_nursery() as nursery:
        await nursery.start(manager.run)
        record = await manager.spawn("u", _request())
        with trio.fail_after(WAIT):
            await script.running.wait()
        # No grace: the nursery is cancelled while the terminal write is under way.
        nursery.start_soon(manager.shutdown, 0)
        with trio.fail_after(WAIT):
            await backend.finishing.wait()
        await trio.testing.wait_all_tasks_blocked()
        backend.let_through.set()
    events = await _events(manager, record.id)
    assert events[-1].type == "task:cancelled"
    assert events[-1].data["cancel_reason"] == "shutdown"
    assert events[-1].data["content"] == "part"


async def test_a_terminal_write_that_never_returns_is_given_up_and_the_task_let_go() -> None:
    backend = _SlowFinish()
    script = Script()
    async with running_manager(
        script, MemoryBackend(store=backend), backend_timeout_s=0.2
    ) as manager:
        record = await manager.spawn("u", _request())
        with trio.fail_after(WAIT):
            await script.running.wait()
        manager.cancel(record.id, "stop")
        with trio.fail_after(WAIT):
            await manager.wait_ended(record.id)
        assert manager.running_count == 0
    assert _terminals(await _events(manager, record.id)) == []


async def test_reports_from_steps_running_side_by_side_all_reach_the_log_in_order(
    make_backend: Callable[[], Any],
) -> None:
    """Page reads and tool calls run side by side and each reports as it ends; on a shared
    store every append is a round trip, and none may take another's seq."""

    async def side_by_side(request: ChatRequest, emit: TaskEmitter) -> None:
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(emit.status, {"description": f"step {i}"})
                nursery.start_soon(emit.delta, {"content": f"<{i}>"})

    async with running_manager(side_by_side, make_backend()) as manager:
        record = await manager.spawn("u", _request())
        with trio.fail_after(WAIT):
            ended = await manager.wait_ended(record.id)
    assert ended is not None and ended.status == "completed", ended
    events = await _events(manager, record.id)
    assert [e.seq for e in events] == list(range(1, 44))  # queued, started, 40, the end
    steps = [e.data["description"] for e in events if e.type == "status"]
    assert sorted(steps) == sorted(f"step {i}" for i in range(20))
    parts = "".join(e.data["content"] for e in events if e.type == "delta")
    assert parts == ended.content and sorted(parts.split("<")[1:]) == sorted(
        f"{i}>" for i in range(20)
    )


async def test_an_answer_past_its_bound_ends_the_task_failed_with_what_it_had(
    make_backend: Callable[[], Any],
) -> None:
    async def endless(request: ChatRequest, emit: TaskEmitter) -> None:
        while True:
            await emit.delta({"content": "0123456789"})

    async with running_manager(endless, make_backend(), max_content_chars=55) as manager:
        record = await manager.spawn("u", _request())
        with trio.fail_after(WAIT):
            ended = await manager.wait_ended(record.id)
    assert ended is not None and ended.status == "failed"
    assert ended.error is not None and ended.error["type"] == "task_too_large"
    assert ended.content == "0123456789" * 5
    assert (await _events(manager, record.id))[-1].data["content"] == ended.content


async def test_a_log_past_its_bound_ends_the_task_with_its_terminal_event_last(
    make_backend: Callable[[], Any],
) -> None:
    async def chatty(request: ChatRequest, emit: TaskEmitter) -> None:
        while True:
            await emit.status({"description": "still here"})

    async with running_manager(chatty, make_backend(), max_task_events=10) as manager:
        record = await manager.spawn("u", _request())
        with trio.fail_after(WAIT):
            ended = await manager.wait_ended(record.id)
    assert ended is not None and ended.error is not None
    assert ended.error["type"] == "task_too_large"
    events = await _events(manager, record.id)
    assert [e.seq for e in events] == list(range(1, 11))
    assert events[-1].type == "task:failed"
