"""The Redis backend's own guarantees, on a real redis-server, with several backends (as
several replicas would hold) in one test: global admission under concurrency, exactly one
terminal event when two survivors reap a dead replica at once, and a connection pool that
survives blocking reads being cancelled."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import coredis
import pytest
import trio
import trio.testing

from fakes.redis_cluster import RedisCluster
from fakes.redis_server import RedisServer
from server.record import TaskRecord
from server.tasks.backend import NoControl
from server.tasks.log import LogClosed
from server.tasks.redis import RedisBackend, redis_backend
from tests.conftest import WAIT


def _record(user: str = "u") -> TaskRecord:
    return TaskRecord(id="task_" + secrets.token_hex(8), user=user, model="m", mode="background")


@asynccontextmanager
async def serving(*backends: RedisBackend) -> AsyncIterator[None]:
    done = trio.Event()
    async with trio.open_nursery() as nursery:
        for backend in backends:
            await nursery.start(backend.cluster.serve, NoControl(), done)
        try:
            yield
        finally:
            done.set()


def _backends(
    server: RedisServer | RedisCluster, count: int, prefix: str | None = None, **options: Any
) -> list[RedisBackend]:
    prefix = prefix or "b" + secrets.token_hex(6)
    return [redis_backend(server.url, prefix=prefix, **options) for _ in range(count)]


async def _admit(
    backend: RedisBackend, record: TaskRecord, *, max_total: int = 10, max_per_user: int = 10
) -> bool:
    """Admission as the task manager does it: a place, then the record."""
    if not await backend.admission.reserve(record, max_total=max_total, max_per_user=max_per_user):
        return False
    await backend.store.create(record)
    return True


async def test_admission_is_global_and_atomic_under_concurrency(
    redis_server: RedisServer,
) -> None:
    a, b = _backends(redis_server, 2)
    admitted: list[bool] = []

    async def admit(backend: RedisBackend) -> None:
        admitted.append(await _admit(backend, _record(), max_total=5, max_per_user=100))

    async with serving(a, b):
        async with trio.open_nursery() as nursery:
            for i in range(20):
                nursery.start_soon(admit, (a, b)[i % 2])
        assert admitted.count(True) == 5
        assert await a.admission.counts() == (5, {"u": 5})


async def test_two_survivors_reaping_a_dead_replica_write_one_terminal_event(
    redis_server: RedisServer,
) -> None:
    # The dead one heartbeats too rarely to come back by itself once its key is gone.
    prefix = "b" + secrets.token_hex(6)
    dead, *_ = _backends(redis_server, 1, prefix, replica_ttl_s=1000)
    b, c = _backends(redis_server, 2, prefix)
    record = _record()
    async with serving(dead, b, c):
        assert await _admit(dead, record)
        record.status = "running"
        await dead.store.save(record)
        await dead.store.append(record, "delta", {"content": "partial "})
        await dead.store.append(record, "delta", {"content": "answer"})
        raw = coredis.Redis.from_url(redis_server.url, decode_responses=True)
        async with raw:
            await raw.delete([f"{prefix}:replica:{dead.replica_id}"])
        reaped: list[list[str]] = []

        async def reap(backend: RedisBackend) -> None:
            reaped.append(await backend.cluster.reap_dead_replicas())

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reap, b)
            nursery.start_soon(reap, c)
        assert sorted(len(r) for r in reaped) == [0, 1]
        events = await b.store.read(record.id, 0)
        assert [e.type for e in events] == ["task:queued", "delta", "delta", "task:failed"]
        assert [e.seq for e in events] == [1, 2, 3, 4]
        terminal = events[-1].data
        assert terminal["error"]["type"] == "replica_lost"
        assert terminal["content"] == "partial answer" and terminal["last_seq"] == 4
        ended = await c.store.get(record.id)
        assert ended is not None and ended.status == "failed" and ended.content == "partial answer"
        assert await b.admission.counts() == (0, {})


@pytest.mark.parametrize("redis", ["redis_server", "redis_cluster"])
async def test_cancelled_blocking_reads_do_not_use_up_the_connection_pool(
    redis: str, request: pytest.FixtureRequest
) -> None:
    """Waiting on a log written elsewhere is a blocking read; each cancelled one costs its
    connection. The pool of waiting reads must make new ones rather than run dry (on a
    cluster, the pool of the node that serves the task's slot)."""
    owner, reader = _backends(request.getfixturevalue(redis), 2, max_connections=3)
    record = _record()
    async with serving(owner, reader):
        assert await _admit(owner, record)
        for _ in range(10):
            with trio.move_on_after(0.05) as waited:
                await reader.store.wait_beyond(record.id, 1)
            assert waited.cancelled_caught
        woke: list[bool] = []

        async def wait() -> None:
            woke.append(await reader.store.wait_beyond(record.id, 1))

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(wait)
                await owner.store.append(record, "delta", {"content": "x"})
        assert woke == [True]


async def test_an_owner_reaped_while_alive_ends_its_local_copy_as_redis_says(
    redis_server: RedisServer,
) -> None:
    """A replica cut off from Redis longer than its TTL is taken for dead and its task
    reaped. What it appends after that, Redis refuses; its end changes nothing in Redis,
    and its own readers see the end Redis holds."""
    prefix = "b" + secrets.token_hex(6)
    owner, *_ = _backends(redis_server, 1, prefix, replica_ttl_s=1000)
    reaper, *_ = _backends(redis_server, 1, prefix)
    record = _record()
    async with serving(owner, reaper):
        assert await _admit(owner, record)
        await owner.store.append(record, "delta", {"content": "partial"})
        raw = coredis.Redis.from_url(redis_server.url, decode_responses=True)
        async with raw:
            await raw.delete([f"{prefix}:replica:{owner.replica_id}"])
        assert await reaper.cluster.reap_dead_replicas() == [record.id]
        await owner.store.append(record, "delta", {"content": " more"})  # written behind
        record.status = "failed"
        assert await owner.store.finish(record) is None
        in_redis = await reaper.store.read(record.id, 0)
        assert [e.type for e in in_redis] == ["task:queued", "delta", "task:failed"]
        seen_here = await owner.store.read(record.id, 0)
        assert seen_here[-1].type == "task:failed"
        assert seen_here[-1].data["error"]["type"] == "replica_lost"
        assert seen_here[-1].data["content"] == in_redis[-1].data["content"] == "partial"
        with pytest.raises(LogClosed):
            await owner.store.append(record, "delta", {"content": " after the end"})


async def test_followers_of_remote_tasks_share_one_blocking_connection(
    redis_server: RedisServer,
) -> None:
    """Thirty watches and thirty waiters of tasks run by another replica: one blocking read
    serves them all, so the reader's connections to Redis do not grow with its followers."""
    owner, reader = _backends(redis_server, 2)
    records = [_record() for _ in range(30)]
    raw = coredis.Redis.from_url(redis_server.url, decode_responses=True)
    async with raw, serving(owner, reader):
        for record in records:
            assert await _admit(owner, record, max_total=100, max_per_user=100)
        before = len(await raw.client_list())
        seen: dict[str, list[int]] = {r.id: [] for r in records}
        all_seen = trio.Event()

        def on_append(task_id: str, seq: int) -> None:
            seen[task_id].append(seq)
            if all(seen.values()):
                all_seen.set()

        watches = [
            reader.store.watch(r.id, lambda e, tid=r.id: on_append(tid, e.seq), after=1)
            for r in records
        ]
        woke: list[bool] = []

        async def wait(task_id: str) -> None:
            woke.append(await reader.store.wait_beyond(task_id, 1))

        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for record in records:
                    nursery.start_soon(wait, record.id)
                await trio.testing.wait_all_tasks_blocked()
                for record in records:
                    await owner.store.append(record, "delta", {"content": "x"})
            await all_seen.wait()
        assert woke == [True] * 30
        assert all(s == [2] for s in seen.values())
        assert len(await raw.client_list()) - before <= 3
        # A follower marked by an event reads it from what the multiplexer read, with no
        # round trip of its own.
        reads = await _xrange_calls(raw)
        for record in records:
            (event,) = await reader.store.read(record.id, 1)
            assert event.seq == 2 and event.data == {"content": "x"}
        assert await _xrange_calls(raw) == reads
        for watch in watches:
            assert watch is not None
            watch.close()


async def _xrange_calls(raw: Any) -> int:
    return await _calls(raw, "xrange")


async def _calls(raw: Any, command: str) -> int:
    stats = await raw.info("commandstats")
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


async def test_followers_checking_a_remote_task_read_no_records(
    redis_server: RedisServer,
) -> None:
    """A subscriber's owner check and a follower's look at where the log is read a few
    fields, not the record: a crowd subscribing to a task followed here costs one small
    read. A session's listing reads the whole records of its own tasks only."""
    owner, reader = _backends(redis_server, 2)
    record = _record()
    mine = _record()
    mine.session_id = "sess_mine"
    raw = coredis.Redis.from_url(redis_server.url, decode_responses=True)
    async with raw, serving(owner, reader):
        assert await _admit(owner, record) and await _admit(owner, mine)
        queued = trio.Event()
        watch = reader.store.watch(record.id, lambda event: queued.set())
        assert watch is not None
        records_read, small_reads = await _calls(raw, "hgetall"), await _calls(raw, "hmget")
        for _ in range(20):
            assert await reader.store.user_of(record.id) == "u"
        # A followed task's position is where the multiplexer has read to: its first
        # read, of task:queued, is waited for.
        with trio.fail_after(WAIT):
            await queued.wait()
        position = await reader.store.position(record.id)
        assert position is not None and (position.active, position.last_seq) == (True, 1)
        assert await reader.store.user_of("task_unknown") is None
        assert await reader.store.position("task_unknown") is None
        assert await _calls(raw, "hgetall") == records_read
        assert await _calls(raw, "hmget") - small_reads <= 4
        listed = await reader.store.list_tasks("u", session_id="sess_mine")
        assert [r.id for r in listed] == [mine.id]
        assert await _calls(raw, "hgetall") == records_read + 1
        watch.close()


async def test_an_ended_task_expires_whole_with_its_retention_index_entries_included(
    redis_server: RedisServer,
) -> None:
    """Every key of an ended task, and its entries in its user's task index and in the
    retained tasks, expire with the retention, counted from the end."""
    prefix = "b" + secrets.token_hex(6)
    (backend,) = _backends(redis_server, 1, prefix, retention_s=1.0)
    record = _record(user="expiring")
    async with serving(backend):
        assert await _admit(backend, record)
        await backend.store.append(record, "source", {"url": "https://a.example", "title": "A"})
        await backend.store.append(record, "delta", {"content": "kept a while"})
        record.status = "completed"
        assert await backend.store.finish(record) is not None
        task_keys = backend.store._keys.task(record.id).all()
        index = f"{prefix}:{{adm}}:tasks:expiring"
        every_key = [*task_keys, index, f"{prefix}:{{adm}}:ended"]
        raw = coredis.Redis.from_url(redis_server.url, decode_responses=True)
        async with raw:
            present = [k for k in every_key if await raw.exists([k])]
            assert len(present) == len(every_key) - 1  # no reasoning: no key for it
            for key in present:
                assert 0 < await raw.pttl(key) <= 1000, key
            # The index entry's score is when the task expires, and the index goes with it.
            expires_at = round((await raw.pexpiretime(index)).timestamp() * 1000)
            assert await raw.zscore(index, record.id) == expires_at
            assert [r.id for r in await backend.store.list_tasks("expiring", include_finished=True)]
            with trio.fail_after(WAIT):
                while await raw.exists(every_key):  # noqa: ASYNC110 - Redis expires them
                    await trio.sleep(0.05)
        assert await backend.store.list_tasks("expiring", include_finished=True) == []


async def test_past_the_max_retained_tasks_the_oldest_ended_task_is_deleted(
    redis_server: RedisServer,
) -> None:
    (backend,) = _backends(redis_server, 1, max_retained=2)
    records = [_record() for _ in range(3)]
    async with serving(backend):
        for record in records:
            assert await _admit(backend, record)
            record.status = "completed"
            assert await backend.store.finish(record) is not None
        oldest, *kept = await backend.store.load([r.id for r in records])
        assert oldest is None and all(r is not None and r.status == "completed" for r in kept)
        listed = await backend.store.list_tasks("u", include_finished=True)
        assert [r.id for r in listed] == [r.id for r in records[1:]]
