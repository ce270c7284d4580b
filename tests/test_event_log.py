"""The event log, the in-memory store and admission, without sockets."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from server.record import TaskRecord
from server.tasks.log import EventLog, LogClosed
from server.tasks.memory import LocalAdmission, MemoryStore


def test_log_numbers_events_from_one_and_refuses_appends_after_the_terminal() -> None:
    log = EventLog("t", "c", "m")
    for kind in ("task:queued", "task:started", "delta", "task:completed"):
        log.append(kind, {})
    assert [e.seq for e in log.read(0)] == [1, 2, 3, 4]
    assert [e.seq for e in log.read(2, limit=1)] == [3]
    assert log.closed
    with pytest.raises(LogClosed):
        log.append("delta", {})


async def test_wait_beyond_wakes_on_append_and_says_when_nothing_will_come() -> None:
    log = EventLog("t", None, None)
    log.append("task:queued", {})
    woke: list[bool] = []

    async def waiter() -> None:
        woke.append(await log.wait_beyond(1))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(waiter)
        await trio.testing.wait_all_tasks_blocked()
        assert woke == []
        log.append("delta", {"content": "x"})
    assert woke == [True]
    log.append("task:completed", {})
    with trio.fail_after(1):
        assert await log.wait_beyond(3) is False


async def test_retention_keeps_a_log_while_someone_reads_it() -> None:
    backend = MemoryStore()
    record = TaskRecord(id="t", user="u", model="m", mode="background")
    await backend.create(record)
    record.status, record.ended_at = "completed", 100.0
    await backend.finish(record)
    with backend.reading("t"):
        assert await backend.expire(now=1000.0, retention_s=1.0) == []
        assert len(await backend.read("t", 0)) == 2
    assert await backend.expire(now=1000.0, retention_s=1.0) == ["t"]
    assert await backend.read("t", 0) == []
    assert await backend.wait_beyond("t", 0) is False


async def test_admission_counts_active_tasks_per_user_and_in_all() -> None:
    admission = LocalAdmission()
    records = [
        TaskRecord(id=f"t{i}", user="a" if i < 2 else "b", model="m", mode="sync") for i in range(4)
    ]
    assert await admission.reserve(records[0], max_total=3, max_per_user=2)
    assert await admission.reserve(records[1], max_total=3, max_per_user=2)
    assert not await admission.reserve(
        TaskRecord(id="x", user="a", model="m", mode="sync"), max_total=3, max_per_user=2
    )
    assert await admission.reserve(records[2], max_total=3, max_per_user=2)
    assert not await admission.reserve(records[3], max_total=3, max_per_user=2)
    # A reservation is idempotent, and so is its release.
    assert await admission.reserve(records[0], max_total=3, max_per_user=2)
    await admission.release(records[0])
    await admission.release(records[0])
    assert await admission.counts() == (2, {"a": 1, "b": 1})
    assert await admission.reserve(records[3], max_total=3, max_per_user=2)


async def test_retention_keeps_at_most_so_many_ended_tasks_oldest_unread_first() -> None:
    backend = MemoryStore()
    records = [TaskRecord(id=f"t{i}", user="u", model="m", mode="sync") for i in range(6)]
    for i, record in enumerate(records):
        await backend.create(record)
        if i < 5:  # t5 stays running
            record.status, record.ended_at = "completed", 100.0 + i
            await backend.finish(record)
    with backend.reading("t0"):
        expired = await backend.expire(now=200.0, retention_s=1000.0, max_retained=2)
    # Two ended tasks stay: t0, which is being read, and t4, the newest.
    assert sorted(expired) == ["t1", "t2", "t3"]
    assert [await backend.get(f"t{i}") is not None for i in range(6)] == [
        True,
        False,
        False,
        False,
        True,
        True,
    ]
