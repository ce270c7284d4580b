"""The replicas sharing a task space: heartbeats, the control streams, reaping, sessions.

``P:replica:<id>`` lives while its replica heartbeats; ``P:{adm}:replicas`` lists them. A
replica whose heartbeat expired is reaped by the first survivor to notice: its running
tasks end ``failed`` with ``replica_lost`` (the terminal script writes once, whoever calls
it). Stops for a task run elsewhere, and news of a session's task started elsewhere, go to
the owner's control stream ``P:control:<replica>``, read through a consumer group so that a
message survives a dropped connection.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

import coredis.exceptions
import trio

from server.record import CancelReason
from server.tasks.backend import Control
from server.tasks.errors import BackendUnavailable
from server.tasks.redis.admission import RedisAdmission
from server.tasks.redis.connection import RedisConnection
from server.tasks.redis.errors import RedisError, redis_errors
from server.tasks.redis.store import RedisStore

log = logging.getLogger("tether.redis")

# The pause between two tries of the terminal events Redis did not answer.
SETTLE_PAUSE_S = 0.25


class RedisCluster:
    def __init__(
        self,
        conn: RedisConnection,
        store: RedisStore,
        admission: RedisAdmission,
        replica_id: str,
        *,
        replica_ttl_s: float,
        retention_s: float,
    ) -> None:
        self.replica_id = replica_id
        self._conn = conn
        self._keys = conn.keys
        self._store = store
        self._admission = admission
        self._ttl_s = replica_ttl_s
        self._retention_ms = max(1, int(retention_s * 1000))
        # When the heartbeat was last written (trio's clock), and whether it ever was.
        self._heard_at = 0.0
        self._heard = False
        # Whether the readers here were let go (``_reach``).
        self._cut_off = False
        # Looks still to take, after a lapse, for tasks ended elsewhere.
        self._looks_left = 0

    @property
    def reachable(self) -> bool:
        """Whether the heartbeat is surely still in Redis (it lives 0.8 TTL from when it
        was written): past that, a survivor may take this replica for dead."""
        return self._heard and trio.current_time() - self._heard_at < self._ttl_s * 0.8

    # -- lifetime ------------------------------------------------------------------------

    async def serve(
        self,
        control: Control,
        done: trio.Event,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Connect, announce this replica, and run its background work until ``done``:
        the append pipeline, the watches of logs written elsewhere, the heartbeat, the
        control stream, the reaping of dead replicas and the ends Redis did not answer
        (``RedisStore.settle``); then sign off. Raises
        ``BackendUnavailable`` if Redis cannot be used at start.

        The client's connections live in a task group inside this call, so it ends on
        ``done`` rather than by cancellation: cancelled, they would die with it, and the
        last terminal writes and the sign-off would have nothing to go through."""
        conn = self._conn
        failure: RedisError | None = None
        try:
            await conn.open()
        except (RedisError, trio.TooSlowError) as exc:
            raise BackendUnavailable(f"Redis at {conn.url} cannot be used: {exc}") from exc
        async with conn:
            try:
                await self._heartbeat_once()
                await self._ensure_control_group()
            except RedisError as exc:
                failure = exc
            if failure is None:
                async with trio.open_nursery() as nursery:
                    self._store.tailer.nursery = nursery
                    nursery.start_soon(self._store.writer.run)
                    nursery.start_soon(conn.follow_primary)
                    nursery.start_soon(self._store.tailer.run)
                    nursery.start_soon(self._heartbeat_loop, control)
                    nursery.start_soon(self._watch_reach, control)
                    nursery.start_soon(self._control_loop, control)
                    nursery.start_soon(self._reap_loop)
                    nursery.start_soon(self._store.settle, SETTLE_PAUSE_S)
                    task_status.started()
                    await done.wait()
                    self._store.tailer.nursery = None
                    nursery.cancel_scope.cancel()
                # The ends Redis did not answer are tried once more; if some stay so, the
                # replica stays listed (its heartbeat gone), so that a survivor reaps those
                # tasks rather than leave them running with no owner. Readers here are
                # given the ends as this process knows them.
                unwritten = 1
                with trio.move_on_after(conn.timeout_s):
                    unwritten = await self._store.settle_once()
                await self._store.close_unsettled()
                with trio.move_on_after(conn.timeout_s):
                    try:
                        await conn.commands.delete([self._keys.heartbeat(self.replica_id)])
                        if not unwritten:
                            await conn.commands.srem(self._keys.adm("replicas"), [self.replica_id])
                    except RedisError:
                        log.warning("could not sign replica %s off", self.replica_id)
        if failure is not None:
            raise BackendUnavailable(f"Redis at {conn.url} cannot be used: {failure}")

    async def _heartbeat_once(self) -> bool:
        """Write the heartbeat; whether it had lapsed since the last one (never the first
        time). The replica list is renewed too: a Redis that restarted has forgotten it."""
        async with self._conn.commands.pipeline(transaction=False) as pipe:
            pipe.set(
                self._keys.heartbeat(self.replica_id),
                str(time.time()),
                px=int(self._ttl_s * 800),
                get=True,
            )
            pipe.sadd(self._keys.adm("replicas"), [self.replica_id])
        lapsed = self._heard and (pipe.results or (None,))[0] is None
        self._heard, self._heard_at = True, trio.current_time()
        return lapsed

    async def _heartbeat_loop(self, control: Control) -> None:
        # The key lives 0.8 TTL and is renewed four times in that: a replica that stops
        # is gone from Redis within 0.8 TTL, and noticed within the TTL.
        while True:
            await trio.sleep(self._ttl_s / 5)
            try:
                if await self._heartbeat_once():
                    log.warning("heartbeat lapsed: looking for tasks ended elsewhere")
                    # Twice: a reaper that found the heartbeat gone may end the tasks
                    # just after the first look. A look that fails is made again.
                    self._looks_left = 2
                self._reach(control, True)
                if self._looks_left:
                    await self._stop_tasks_ended_elsewhere(control)
                    self._looks_left -= 1
            except RedisError as exc:
                log.warning("heartbeat failed: %s", exc)
                self._conn.noticed(exc)

    async def _watch_reach(self, control: Control) -> None:
        """Notice, within TTL / 10, that the heartbeat may have lapsed (it is not written
        while Redis cannot be reached, and a write may hang as long as a partition does):
        the readers here are let go, and the process told. The heartbeat tells the
        return (``_reach``), as soon as it is written."""
        while True:
            await trio.sleep(self._ttl_s / 10)
            if self._cut_off is False and not self.reachable:
                self._reach(control, False)

    def _reach(self, control: Control, reachable: bool) -> None:
        if self._cut_off is (not reachable):
            return
        self._cut_off = not reachable
        if reachable:
            log.warning("replica %s reaches Redis again", self.replica_id)
        else:
            log.warning("replica %s cannot reach Redis: letting its readers go", self.replica_id)
        self._store.let_readers_go(not reachable)
        control.reach_changed(reachable)

    async def _stop_tasks_ended_elsewhere(self, control: Control) -> None:
        """After a lapse of the heartbeat, a survivor may have reaped this replica: the
        tasks it runs that Redis shows ended, or owned by another, are stopped at once,
        rather than at their next append (which the fence would refuse). A task whose
        record Redis lost (a restart) is left to its own end, which writes it anew."""
        running = control.running_here()
        if not running:
            return
        async with self._conn.commands.pipeline(transaction=False) as pipe:
            for task_id in running:
                pipe.hmget(self._keys.task(task_id).rec, ["owner", "closed"])
        for task_id, (owner, closed) in zip(running, pipe.results or (), strict=True):
            if owner is not None and (closed is not None or owner != self.replica_id):
                control.lost(
                    task_id,
                    f"task {task_id} was ended by another replica while this one "
                    f"({self.replica_id}) could not reach Redis",
                )

    # -- sessions ---------------------------------------------------------------------------

    async def claim_session(self, session_id: str, user: str) -> bool:
        return await self._session_step(session_id, user, 0)

    async def session_presence(self, session_id: str, user: str, delta: int) -> None:
        await self._session_step(session_id, user, delta)

    async def _session_step(self, session_id: str, user: str, delta: int) -> bool:
        with redis_errors():
            result: Any = await self._conn.session(
                keys=[self._keys.session(session_id)],
                args=[user, self.replica_id, str(delta), str(self._retention_ms)],
            )
        return bool(result == 1)

    async def announce_task(self, session_id: str, task_id: str) -> None:
        with redis_errors():
            for replica in await self._session_replicas(session_id):
                await self._conn.commands.xadd(
                    self._keys.control(replica), {"task": task_id, "session": session_id}
                )

    async def _session_replicas(self, session_id: str) -> list[str]:
        """The other live replicas with a connection to the session (a dead one's count
        is dropped as it is met)."""
        commands = self._conn.commands
        key = self._keys.session(session_id)
        out: list[str] = []
        for name, count in (await commands.hgetall(key)).items():
            replica = name[2:]
            if not name.startswith("c:") or replica == self.replica_id or int(count) <= 0:
                continue
            if await commands.exists([self._keys.heartbeat(replica)]):
                out.append(replica)
            else:
                await commands.hdel(key, [name])
        return out

    async def session_connected_elsewhere(self, session_id: str) -> bool:
        with redis_errors():
            return bool(await self._session_replicas(session_id))

    # -- stops from anywhere -----------------------------------------------------------------

    async def send_stop(self, task_id: str, reason: CancelReason) -> bool:
        """Send a stop to the replica that runs the task; False if it runs nowhere."""
        return await self._to_owner(task_id, {"task": task_id, "reason": reason})

    async def send_skip(self, task_id: str, step: str, by: str) -> bool:
        """Send a skip to the replica that runs the task; False if it runs nowhere."""
        return await self._to_owner(task_id, {"task": task_id, "skip": step, "by": by})

    async def _to_owner(self, task_id: str, message: dict[str, str]) -> bool:
        commands = self._conn.commands
        with redis_errors():
            raw = await commands.hmget(self._keys.task(task_id).rec, ["owner", "closed"])
            owner, closed = raw[0], raw[1]
            if owner is None or closed is not None:
                return False
            await commands.xadd(self._keys.control(owner), dict(message))
            return True

    async def _ensure_control_group(self) -> None:
        try:
            await self._conn.commands.xgroup_create(
                self._keys.control(self.replica_id), "owner", "0", mkstream=True
            )
        except coredis.exceptions.StreamDuplicateConsumerGroupError:
            pass

    async def _control_loop(self, control: Control) -> None:
        """Apply what was sent to this replica. What was read and not acknowledged (a
        connection dropped in between) is read again first."""
        key = self._keys.control(self.replica_id)
        pending = True
        while True:
            try:
                found = await self._conn.waiting.xreadgroup(
                    "owner",
                    self.replica_id,
                    {key: "0" if pending else ">"},
                    count=100,
                    block=None if pending else 5000,
                )
                entries = (found or {}).get(key, ())
                if pending and not entries:
                    pending = False
                    continue
                for entry in entries:
                    values = entry.field_values
                    if "session" in values:
                        control.follow(str(values["session"]), str(values["task"]))
                    elif "skip" in values:
                        control.skip(
                            str(values["task"]), str(values["skip"]), str(values.get("by", ""))
                        )
                    else:
                        control.cancel(str(values["task"]), cast(CancelReason, values["reason"]))
                if entries:
                    await self._conn.commands.xack(key, "owner", [e.identifier for e in entries])
            except RedisError as exc:
                log.warning("reading the control stream failed: %s", exc)
                self._conn.noticed(exc)
                pending = True
                try:
                    await self._ensure_control_group()
                except RedisError:
                    pass
                await trio.sleep(min(1.0, self._ttl_s / 10))

    # -- dead replicas -----------------------------------------------------------------------

    async def _reap_loop(self) -> None:
        while True:
            await trio.sleep(self._ttl_s / 10)
            try:
                await self.reap_dead_replicas()
            except (RedisError, BackendUnavailable) as exc:
                log.warning("looking for dead replicas failed: %s", exc)
                self._conn.noticed(exc)

    async def reap_dead_replicas(self) -> list[str]:
        """End the running tasks of replicas whose heartbeat has expired (``failed``,
        ``replica_lost``, partial content kept) and free their places. Returns the
        tasks ended here. Raises ``RedisError``."""
        commands = self._conn.commands
        ended: list[str] = []
        for replica in await commands.smembers(self._keys.adm("replicas")):
            if replica == self.replica_id:
                continue
            if await commands.exists([self._keys.heartbeat(replica)]):
                continue
            owned = await commands.hgetall(self._keys.adm(f"owned:{replica}"))
            for task_id, user in owned.items():
                record = (await self._store.load([task_id]))[0]
                if record is None or not record.active:
                    await self._store.release_place(task_id, user, replica)
                    continue
                record.status = "failed"
                record.ended_at = time.time()
                record.error = {
                    "phase": record.phase,
                    "type": "replica_lost",
                    "message": f"The replica running the task ({replica}) stopped answering.",
                }
                if await self._store.end(record, replica) is not None:
                    ended.append(task_id)
                    log.warning("task=%s failed: replica %s lost", task_id, replica)
            await commands.srem(self._keys.adm("replicas"), [replica])
            await commands.delete([self._keys.control(replica)])
        return ended
