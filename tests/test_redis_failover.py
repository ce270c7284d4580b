"""Redis going away under running tasks, with real processes: a Sentinel failover (the
primary killed while 50 tasks stream on two Tether replicas), a demoted primary that answers
READONLY, and a terminal write that Redis could not take when the task ended."""

from __future__ import annotations

import json
import os
import secrets
import signal
from collections.abc import AsyncIterator
from typing import Any

import coredis
import pytest
import trio

from fakes.model import TextReply
from fakes.redis_sentinel import SERVICE, SentinelSet, ask
from fakes.redis_server import RedisServer
from server.config import Settings, SettingsError
from server.exception_groups import first_leaf
from server.runtime import redis_target
from server.tasks.redis.connection import RedisConnection
from tests.conftest import WAIT, Fakes, StartTether, base_settings
from tests.helpers import TERMINAL, assert_log_well_formed, chat_body, until
from tests.replicas import Replica

TASKS = 50
# Each task streams this many deltas this far apart (about 4 s): the failover (about 1.5 s)
# comes in the middle of every one.
DELTAS, INTERVAL = 200, 0.02


@pytest.fixture
async def fresh_sentinels() -> AsyncIterator[SentinelSet]:
    """A Sentinel set-up of this test's own (it fails over), its sentinels in agreement."""
    sentinels = SentinelSet()
    await trio.to_thread.run_sync(sentinels.start)
    try:
        yield sentinels
    finally:
        await trio.to_thread.run_sync(sentinels.stop)


async def _log(replica: Replica, task_id: str) -> list[dict[str, Any]]:
    """The task's whole log as ``replica`` serves it (SSE), to its terminal event."""
    out: list[dict[str, Any]] = []
    async with replica.client.stream("GET", f"/api/tasks/{task_id}/events") as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                out.append(json.loads(line[6:]))
    return out


async def _streaming(replica: Replica, task_id: str) -> None:
    """Return once the task has streamed a delta (read on its own replica)."""
    async with replica.client.stream("GET", f"/api/tasks/{task_id}/events") as response:
        async for line in response.aiter_lines():
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "delta":
                return
    raise AssertionError(f"task {task_id} ended before its first delta")


def _deltas(events: list[dict[str, Any]]) -> str:
    return "".join(e["data"]["content"] for e in events if e["type"] == "delta")


async def test_a_primary_killed_while_50_tasks_stream_loses_no_task(
    fakes: Fakes, fresh_sentinels: SentinelSet
) -> None:
    """Each task goes on through the failover or ends in one terminal state with its
    partial content, and every replica serves the same end; new tasks are taken after."""
    settings = base_settings(
        fakes, **fresh_sentinels.settings(), redis_prefix="f" + secrets.token_hex(6)
    )
    a, b = Replica(settings, name="A"), Replica(settings, name="B")
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(a.start)
            nursery.start_soon(b.start)
        for _ in range(TASKS):
            fakes.model.push(TextReply([f"w{i} " for i in range(DELTAS)], interval=INTERVAL))
        owners = [a, b] * (TASKS // 2)
        task_ids = [await owner.background(chat_body()) for owner in owners]
        with trio.fail_after(WAIT):
            async with trio.open_nursery() as nursery:
                for owner, task_id in zip(owners, task_ids, strict=True):
                    nursery.start_soon(_streaming, owner, task_id)

        fresh_sentinels.kill_primary()
        await trio.to_thread.run_sync(fresh_sentinels.wait_for_failover)

        ends: dict[str, int] = {}

        async def check(owner: Replica, task_id: str) -> None:
            other = b if owner is a else a
            mine, theirs = await _log(owner, task_id), await _log(other, task_id)
            terminal = assert_log_well_formed(theirs)
            assert assert_log_well_formed(mine)["type"] == terminal["type"]
            ended = terminal["data"]
            assert ended["status"] in ("completed", "failed"), ended
            if ended["status"] == "failed":
                assert ended["error"]["type"] == "backend_unavailable", ended["error"]
            # The partial content is kept, the same from both replicas: what Redis holds.
            assert ended["content"] == _deltas(theirs) and ended["content"]
            assert _deltas(mine).startswith(ended["content"])
            for replica in (a, b):
                record = (await replica.client.get(f"/api/tasks/{task_id}")).json()
                assert record["status"] == ended["status"]
                assert record["content"] == ended["content"]
            ends[ended["status"]] = ends.get(ended["status"], 0) + 1

        with trio.fail_after(3 * WAIT):
            async with trio.open_nursery() as nursery:
                for owner, task_id in zip(owners, task_ids, strict=True):
                    nursery.start_soon(check, owner, task_id)
        assert sum(ends.values()) == TASKS, ends

        for replica in (a, b):
            fakes.model.push(TextReply(["after ", "failover"]))
            answer = await replica.chat(chat_body())
            assert answer.status_code == 200, answer.text
            assert answer.json()["choices"][0]["message"]["content"] == "after failover"
    finally:
        await a.close()
        await b.close()


def _tether_clients(port: int, held: int) -> int:
    """Connections to the Redis on ``port`` other than the sentinels', the test's own
    (client id ``held``) and this listing's."""
    listing = str(ask(port, "CLIENT", "LIST"))
    return sum(
        1
        for line in listing.splitlines()
        if "name=sentinel-" not in line
        and not line.startswith(f"id={held} ")
        and "cmd=client" not in line
    )


async def test_a_demoted_primary_answering_readonly_sends_writes_to_the_new_one(
    fakes: Fakes, fresh_sentinels: SentinelSet, start_tether: StartTether
) -> None:
    """``SENTINEL FAILOVER`` replaces a live primary, which goes on answering as one until
    the sentinels demote it to a replica, seconds later: the Tethers drop their
    connections to it as soon as the sentinels name the new one. Once demoted, it answers
    READONLY to every write: a client that still holds a connection to it (here one of
    Tether's own, that does not ask the sentinels meanwhile) sends the write again to the
    new primary. Tether's tasks are written there, and read back from another Tether."""
    target = redis_target(Settings(**fresh_sentinels.settings()))
    overrides = {**fresh_sentinels.settings(), "redis_prefix": "d" + secrets.token_hex(6)}
    a = await start_tether(**overrides)
    b = await start_tether(**overrides)
    old = fresh_sentinels.first_primary.port
    async with RedisConnection(target, prefix="", timeout_s=WAIT, max_connections=1) as held:
        assert await held.commands.set("written", "before")
        mine = await held.commands.client_id()
        assert _tether_clients(old, mine) > 0

        assert ask(fresh_sentinels.sentinels[0].port, "SENTINEL", "FAILOVER", SERVICE) == "OK"
        new = await trio.to_thread.run_sync(fresh_sentinels.wait_for_failover)
        # The old primary still answers as one (the sentinels demote it seconds later), and
        # the Tethers leave it as soon as the sentinels name the new one.
        await until(lambda: trio.to_thread.run_sync(lambda: _tether_clients(old, mine) == 0))
        # What the sentinels do to the old primary when they see it next, done at once.
        assert ask(old, "REPLICAOF", "127.0.0.1", str(new)) == "OK"

        assert await held.commands.set("written", "after")
        assert ask(new, "GET", "written") == "after"

    fakes.model.push(TextReply(["after ", "demotion"]))
    task_id = await a.background(chat_body())
    with trio.fail_after(WAIT):
        events = await b.events(task_id)
    terminal = assert_log_well_formed(events)
    assert terminal["type"] == "task:completed"
    assert terminal["data"]["content"] == "after demotion"
    assert ask(new, "KEYS", f"*{task_id}*")


async def test_a_terminal_write_redis_did_not_take_is_written_once_it_answers(
    fakes: Fakes, start_tether: StartTether
) -> None:
    """Redis stops answering (SIGSTOP) while a task streams; the task is stopped then,
    and its terminal write times out. It is written once Redis answers again: another
    replica reads the task ``cancelled`` with its partial content, not ``running``, and
    readers on the owner read the same log."""
    redis = RedisServer()
    redis.start()
    try:
        overrides = {
            "backend": "redis",
            "redis_url": redis.url,
            "redis_prefix": "p" + secrets.token_hex(6),
            "backend_timeout_s": 1.0,
        }
        a = await start_tether(**overrides)
        b = await start_tether(**overrides)
        fakes.model.push(TextReply([f"w{i} " for i in range(5000)], interval=0.01))
        task_id = await a.background(chat_body())
        request = await fakes.model.wait_for_request("/v1/chat/completions")
        await a.wait_phase(task_id, "generating")
        with trio.fail_after(WAIT):
            async with a.client.stream("GET", f"/api/tasks/{task_id}/events") as response:
                async for line in response.aiter_lines():
                    if line.startswith("data: ") and json.loads(line[6:])["type"] == "delta":
                        break

        assert redis.process is not None
        os.kill(redis.process.pid, signal.SIGSTOP)
        try:
            stopped = await a.client.post(f"/api/tasks/{task_id}/stop")
            assert stopped.status_code == 200
            with trio.fail_after(WAIT):
                await fakes.model.wait_connection_closed(request.conn_id)
        finally:
            os.kill(redis.process.pid, signal.SIGCONT)

        # Readers here were shown only what Redis holds: they get the end once Redis has
        # it, the same log as another replica's readers.
        with trio.fail_after(WAIT):
            events = await b.events(task_id)
            local = await a.events(task_id)
        assert local == events
        terminal = assert_log_well_formed(events)
        assert terminal["type"] == "task:cancelled"
        assert terminal["data"]["cancel_reason"] == "stop"
        assert terminal["data"]["content"] == _deltas(events) and terminal["data"]["content"]
        assert sum(e["type"] in TERMINAL for e in await a.events(task_id)) == 1
    finally:
        redis.stop()


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        (
            {"TETHER_REDIS_SENTINELS": "127.0.0.1:26379"},
            "TETHER_REDIS_SENTINELS needs TETHER_REDIS_SENTINEL_SERVICE",
        ),
        (
            {"TETHER_REDIS_SENTINEL_SERVICE": "tether"},
            "TETHER_REDIS_SENTINEL_SERVICE needs TETHER_REDIS_SENTINELS",
        ),
        (
            {"TETHER_REDIS_SENTINELS": "127.0.0.1", "TETHER_REDIS_SENTINEL_SERVICE": "t"},
            "TETHER_REDIS_SENTINELS entry '127.0.0.1' is not host:port",
        ),
        (
            {
                "TETHER_REDIS_SENTINELS": "127.0.0.1:26379",
                "TETHER_REDIS_SENTINEL_SERVICE": "t",
                "TETHER_REDIS_URL": "redis://127.0.0.1:6379/0",
            },
            "TETHER_REDIS_URL and TETHER_REDIS_SENTINELS both name a Redis",
        ),
        (
            {"TETHER_REDIS_URL": "redis://127.0.0.1:6379/0", "TETHER_REDIS_PASSWORD": "p"},
            "with TETHER_REDIS_URL, put them in the URL",
        ),
    ],
)
def test_sentinel_settings_that_cannot_work_are_a_clear_error(
    environ: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError, match=message):
        Settings.from_env({"TETHER_BACKEND": "redis", **environ})


async def test_the_sentinel_db_setting_puts_the_tasks_in_that_database(
    fakes: Fakes, redis_sentinels: SentinelSet, start_tether: StartTether
) -> None:
    tether = await start_tether(
        **redis_sentinels.settings(),
        redis_prefix="db" + secrets.token_hex(6),
        redis_sentinel_db=3,
    )
    fakes.model.push(TextReply(["in ", "three"]))
    task_id = await tether.background(chat_body())
    with trio.fail_after(WAIT):
        events = await tether.events(task_id)
    assert assert_log_well_formed(events)["data"]["content"] == "in three"
    primary = redis_sentinels.first_primary.port
    async with coredis.Redis("127.0.0.1", primary, db=3, decode_responses=True) as three:
        assert await three.keys(f"*{task_id}*")
    async with coredis.Redis("127.0.0.1", primary, db=0, decode_responses=True) as zero:
        assert not await zero.keys(f"*{task_id}*")


async def test_sentinels_and_a_primary_with_passwords_are_reached_with_them(
    fakes: Fakes, start_tether: StartTether
) -> None:
    """Sentinels with a password of their own (``requirepass``, used among them too) in
    front of a primary and replica with another: Tether, given both
    (``TETHER_REDIS_SENTINEL_PASSWORD``, ``TETHER_REDIS_PASSWORD``), runs a task whose keys
    are on the primary; a client missing either password is refused."""
    sentinels = SentinelSet(password="primary-secret", sentinel_password="sentinel-secret")
    await trio.to_thread.run_sync(sentinels.start)
    try:
        tether = await start_tether(
            **sentinels.settings(), redis_prefix="pw" + secrets.token_hex(6)
        )
        fakes.model.push(TextReply(["behind ", "passwords"]))
        task_id = await tether.background(chat_body())
        with trio.fail_after(WAIT):
            events = await tether.events(task_id)
        assert assert_log_well_formed(events)["data"]["content"] == "behind passwords"
        primary = sentinels.first_primary.port
        assert isinstance(ask(primary, "KEYS", "*"), RuntimeError)  # NOAUTH
        assert ask(primary, "KEYS", f"*{task_id}*", password="primary-secret")
        for missing in ("redis_sentinel_password", "redis_password"):
            target = redis_target(Settings(**{**sentinels.settings(), missing: None}))
            connection = RedisConnection(target, prefix="", timeout_s=WAIT, max_connections=1)
            with trio.fail_after(WAIT), pytest.raises(Exception) as refused:
                async with connection:
                    await connection.commands.ping()
            leaf = first_leaf(refused.value)
            assert "auth" in str(leaf).lower(), leaf
    finally:
        await trio.to_thread.run_sync(sentinels.stop)
