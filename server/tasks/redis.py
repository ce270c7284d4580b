"""The Redis task backend: one task space shared by every process and replica.

Layout (``P`` is ``TETHER_REDIS_PREFIX``). Each task's keys share the hash tag ``{<id>}``,
so that the scripts that touch them are cluster-safe:

- ``P:{id}:rec``: the record, a hash of JSON values, plus ``owner`` (the replica that
  runs it) and ``closed`` (set with the terminal event);
- ``P:{id}:log``: the event log, a stream whose entry ids are ``0-<seq>``: ``seq`` is the
  public cursor and the stream id at once, and an explicit id makes a doubled write fail;
- ``P:{id}:content``, ``P:{id}:reasoning`` (strings, APPENDed) and ``P:{id}:sources`` (a
  list): the fields the events carry, kept in step with the log by the append script.

Admission is global: ``P:{adm}:counts`` holds the active tasks in all and per user,
``P:{adm}:owned:<replica>`` the tasks each replica holds a place for (and whose), and
``P:{adm}:user:<user>`` every task of a user (for listing; expired ones are pruned as they
are met). A reservation and its release are idempotent scripts on those keys.

Replicas: ``P:replica:<id>`` lives while its replica heartbeats; ``P:{adm}:replicas``
lists them. A replica whose heartbeat expired is reaped by the first survivor to notice:
its running tasks end ``failed`` with ``replica_lost`` (the terminal script writes once,
whoever calls it). Stops for a task run elsewhere go to its owner's control stream
``P:control:<replica>``, read through a consumer group so that a stop survives a dropped
connection.

The tasks this process runs are also kept in a local in-memory backend: their readers and
watchers here are served from memory as soon as an event is appended, with no round trip,
and only readers of tasks run elsewhere read Redis. Appends are written behind: from every
task of the process they go out together, one pipeline per round trip, and a task does not
wait for Redis to answer; its end waits for its writes.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

import coredis
import coredis.exceptions
import trio

from server import fastjson
from server.exception_groups import first_leaf
from server.library_internals import SlotKeepingPool
from server.schemas import TERMINAL_EVENTS, CancelReason, Event, TaskRecord
from server.tasks.backend import Control, LogWatch, new_replica_id
from server.tasks.errors import BackendUnavailable
from server.tasks.log import LogClosed
from server.tasks.memory import MemoryBackend

log = logging.getLogger("tether.redis")

_UNLIMITED = 1 << 62
# Appends queued for Redis at most, from all tasks of the process: past it, Redis is too far
# behind and a task waits before it appends.
_MAX_QUEUED_WRITES = 10_000

# The record's own fields, stored as JSON values (content, reasoning and sources live in
# keys of their own).
_RECORD_FIELDS = (
    "id", "user", "model", "mode", "chat_id", "message_id", "session_id", "status", "phase",
    "created_at", "started_at", "ended_at", "tool_calls", "usage", "error", "cancel_reason",
    "last_seq", "finish_reason", "session_bound",
)

# KEYS: counts, owned (task -> user, of this replica), the user's index, replicas.
# ARGV: task, user, max total, max per user, replica. Idempotent: 1 once reserved.
_RESERVE = """
if redis.call('HEXISTS', KEYS[2], ARGV[1]) == 1 then return 1 end
local total = tonumber(redis.call('HGET', KEYS[1], '*') or '0')
local mine = tonumber(redis.call('HGET', KEYS[1], 'u:' .. ARGV[2]) or '0')
if total >= tonumber(ARGV[3]) or mine >= tonumber(ARGV[4]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('HINCRBY', KEYS[1], '*', 1)
redis.call('HINCRBY', KEYS[1], 'u:' .. ARGV[2], 1)
redis.call('SADD', KEYS[3], ARGV[1])
redis.call('SADD', KEYS[4], ARGV[5])
return 1
"""

# KEYS: counts, owned. ARGV: task. Idempotent: 0 if the place was freed already.
_RELEASE = """
local user = redis.call('HGET', KEYS[2], ARGV[1])
if not user then return 0 end
redis.call('HDEL', KEYS[2], ARGV[1])
if redis.call('HINCRBY', KEYS[1], '*', -1) <= 0 then redis.call('HDEL', KEYS[1], '*') end
local u = 'u:' .. user
if redis.call('HINCRBY', KEYS[1], u, -1) <= 0 then redis.call('HDEL', KEYS[1], u) end
return 1
"""

# KEYS: rec, log. ARGV: queued event data, then field/value pairs of the record.
_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('XADD', KEYS[2], '0-1', 't', 'task:queued', 'd', ARGV[1])
return 1
"""

# KEYS: rec, log, content, reasoning, sources. ARGV: seq, type, data, content, reasoning,
# source. 1 written; 2 written before (a retried call); 0 the log is closed; -1 the task
# is gone (expired, or Redis lost it); -2 a seq out of step.
_APPEND = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
if redis.call('HEXISTS', KEYS[1], 'closed') == 1 then return 0 end
local last = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0')
local seq = tonumber(ARGV[1])
if seq <= last then return 2 end
if seq ~= last + 1 then return -2 end
redis.call('XADD', KEYS[2], '0-' .. ARGV[1], 't', ARGV[2], 'd', ARGV[3])
if ARGV[4] ~= '' then redis.call('APPEND', KEYS[3], ARGV[4]) end
if ARGV[5] ~= '' then redis.call('APPEND', KEYS[4], ARGV[5]) end
if ARGV[6] ~= '' then redis.call('RPUSH', KEYS[5], ARGV[6]) end
redis.call('HSET', KEYS[1], 'last_seq', ARGV[1])
return 1
"""

# KEYS: rec, log, content, reasoning, sources. ARGV: seq, type, data, retention ms,
# content, reasoning, sources (a JSON list), then field/value pairs of the record.
# 1 written; 0 the log was closed already (someone else ended the task); -2 a seq out of
# step (the log moved on: read again). A task Redis lost is written anew, terminal only.
_FINISH = """
if redis.call('HEXISTS', KEYS[1], 'closed') == 1 then return 0 end
local last = tonumber(redis.call('HGET', KEYS[1], 'last_seq') or '0')
if redis.call('EXISTS', KEYS[1]) == 1 and tonumber(ARGV[1]) ~= last + 1 then return -2 end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5])
  if ARGV[5] ~= '' then redis.call('SET', KEYS[3], ARGV[5]) end
  if ARGV[6] ~= '' then redis.call('SET', KEYS[4], ARGV[6]) end
  local sources = cjson.decode(ARGV[7])
  for i = 1, #sources do redis.call('RPUSH', KEYS[5], cjson.encode(sources[i])) end
end
redis.call('XADD', KEYS[2], '0-' .. ARGV[1], 't', ARGV[2], 'd', ARGV[3])
redis.call('HSET', KEYS[1], 'closed', '1', unpack(ARGV, 8))
for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ARGV[4]) end
return 1
"""


# KEYS: the session. ARGV: user, replica, delta (0: claim only), idle lifetime ms.
# -1 the session is another user's. A session with no connection left expires after the
# lifetime; one with connections does not.
_SESSION = """
local owner = redis.call('HGET', KEYS[1], 'user')
if owner and owner ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], 'user', ARGV[1])
local field = 'c:' .. ARGV[2]
if tonumber(ARGV[3]) ~= 0 then
  if redis.call('HINCRBY', KEYS[1], field, ARGV[3]) <= 0 then
    redis.call('HDEL', KEYS[1], field)
  end
end
if redis.call('HLEN', KEYS[1]) <= 1 then
  redis.call('PEXPIRE', KEYS[1], ARGV[4])
else
  redis.call('PERSIST', KEYS[1])
end
return 1
"""


@contextmanager
def _store_errors() -> Iterator[None]:
    """Redis failing is ``BackendUnavailable`` to the callers (a 503, not a 500)."""
    try:
        yield
    except coredis.exceptions.RedisError as exc:
        raise BackendUnavailable(f"Redis failed: {exc}") from exc


@dataclass(eq=False)
class _Write:
    """One append waiting for the next pipeline."""

    task_id: str
    keys: list[str]
    args: list[str]
    done: trio.Event = field(default_factory=trio.Event)
    result: Any = None


class RedisBackend:
    def __init__(self, url: str, *, prefix: str = "tether", replica_id: str | None = None,
                 retention_s: float = 600.0, replica_ttl_s: float = 10.0,
                 timeout_s: float = 5.0, max_connections: int = 1000) -> None:
        self.url = url
        self.replica_id = replica_id or new_replica_id()
        self._prefix = prefix
        self._retention_ms = max(1, int(retention_s * 1000))
        self._ttl_s = replica_ttl_s
        self._timeout_s = timeout_s
        # Two clients. Commands share a few multiplexed connections; a blocking read (a
        # reader waiting on a log written elsewhere, the control stream) holds one of its
        # own until it returns. Apart, a crowd of waiting readers can never leave the
        # appends and the heartbeat without a connection.
        self._client = coredis.Redis(
            connection_pool=SlotKeepingPool.from_url(url, decode_responses=True,
                                                     max_connections=64),
            decode_responses=True)
        self._waiting = coredis.Redis(
            connection_pool=SlotKeepingPool.from_url(url, decode_responses=True,
                                                     max_connections=max_connections),
            decode_responses=True)
        self._reserve = self._client.register_script(_RESERVE)
        self._release = self._client.register_script(_RELEASE)
        self._create = self._client.register_script(_CREATE)
        self._append = self._client.register_script(_APPEND)
        self._finish = self._client.register_script(_FINISH)
        self._session = self._client.register_script(_SESSION)
        self._local = MemoryBackend()
        # chat_id and message_id of tasks read from Redis, which every event carries.
        self._identities: dict[str, tuple[str | None, str | None]] = {}
        self._writes: list[_Write] = []
        self._write_wanted = trio.Event()
        self._room = trio.Event()  # set when the queue has room again
        # Each running task's latest write (its end waits for it), and the first write of
        # a task that Redis refused (its next append raises it).
        self._last_write: dict[str, _Write] = {}
        self._write_failures: dict[str, Exception] = {}
        self._nursery: trio.Nursery | None = None

    # -- keys ------------------------------------------------------------------------------

    def _task_keys(self, task_id: str) -> list[str]:
        tag = f"{self._prefix}:{{{task_id}}}"
        return [f"{tag}:rec", f"{tag}:log", f"{tag}:content", f"{tag}:reasoning",
                f"{tag}:sources"]

    def _adm(self, name: str) -> str:
        return f"{self._prefix}:{{adm}}:{name}"

    def _heartbeat_key(self, replica: str) -> str:
        return f"{self._prefix}:replica:{replica}"

    def _control_key(self, replica: str) -> str:
        return f"{self._prefix}:control:{replica}"

    # -- lifetime ------------------------------------------------------------------------

    async def serve(self, control: Control, done: trio.Event, *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Connect, announce this replica, and run its background work until ``done``:
        the append pipeline, the heartbeat, the control stream (stops for tasks run
        here) and the reaping of dead replicas; then sign off. Raises
        ``BackendUnavailable`` if Redis cannot be used at start.

        The client's connections live in a task group inside this call, so it ends on
        ``done`` rather than by cancellation: cancelled, they would die with it, and the
        last terminal writes and the sign-off would have nothing to go through."""
        failure: coredis.exceptions.RedisError | None = None
        async with self._client, self._waiting:
            try:
                await self._heartbeat_once()
                await self._ensure_control_group()
            except coredis.exceptions.RedisError as exc:
                failure = exc
            if failure is None:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._write_loop)
                    nursery.start_soon(self._heartbeat_loop)
                    nursery.start_soon(self._control_loop, control)
                    nursery.start_soon(self._reap_loop)
                    task_status.started()
                    await done.wait()
                    self._nursery = None
                    nursery.cancel_scope.cancel()
                with trio.move_on_after(self._timeout_s):
                    try:
                        await self._client.delete([self._heartbeat_key(self.replica_id)])
                        await self._client.srem(self._adm("replicas"), [self.replica_id])
                    except coredis.exceptions.RedisError:
                        log.warning("could not sign replica %s off", self.replica_id)
        if failure is not None:
            raise BackendUnavailable(f"Redis at {self.url} cannot be used: {failure}")

    async def _heartbeat_once(self) -> None:
        # The replica list is renewed too: a Redis that restarted has forgotten it.
        async with self._client.pipeline(transaction=False) as pipe:
            pipe.set(self._heartbeat_key(self.replica_id), str(time.time()),
                     px=int(self._ttl_s * 800))
            pipe.sadd(self._adm("replicas"), [self.replica_id])

    async def _heartbeat_loop(self) -> None:
        # The key lives 0.8 TTL and is renewed four times in that: a replica that stops
        # is gone from Redis within 0.8 TTL, and noticed within the TTL.
        while True:
            await trio.sleep(self._ttl_s / 5)
            try:
                await self._heartbeat_once()
            except coredis.exceptions.RedisError as exc:
                log.warning("heartbeat failed: %s", exc)

    # -- admission and records -------------------------------------------------------------

    async def admit(self, record: TaskRecord, *, max_total: int, max_per_user: int) -> bool:
        rec, logkey, *_ = self._task_keys(record.id)
        record.last_seq = 1  # the task:queued event the create script writes
        try:
            reserved: Any = await self._reserve(
                keys=[self._adm("counts"), self._adm(f"owned:{self.replica_id}"),
                      self._adm(f"user:{record.user}"), self._adm("replicas")],
                args=[record.id, record.user, str(max_total), str(max_per_user),
                      self.replica_id])
            if not reserved:
                return False
        except coredis.exceptions.RedisError as exc:
            raise BackendUnavailable(f"Redis failed: {exc}") from exc
        try:
            await self._create(keys=[rec, logkey],
                               args=["{}", *self._fields(record, owner=self.replica_id)])
        except coredis.exceptions.RedisError as exc:
            await self._release_place(record.id, self.replica_id)  # no task, no place
            raise BackendUnavailable(f"Redis failed: {exc}") from exc
        await self._local.admit(record, max_total=_UNLIMITED, max_per_user=_UNLIMITED)
        return True

    def _fields(self, record: TaskRecord, **extra: str) -> list[str]:
        out: list[str] = []
        data = record.to_dict()
        data["session_bound"] = record.session_bound
        for name in _RECORD_FIELDS:
            out += [name, fastjson.dumps(data[name])]
        for name, value in extra.items():
            out += [name, value]
        return out

    async def save(self, record: TaskRecord) -> None:
        fields = self._fields(record)
        # last_seq is the append script's to move: a save racing an append must not
        # move it back.
        index = fields.index("last_seq")
        del fields[index:index + 2]
        try:
            await self._client.hset(self._task_keys(record.id)[0],
                                    dict(zip(fields[::2], fields[1::2], strict=True)))
        except coredis.exceptions.RedisError as exc:
            raise BackendUnavailable(f"Redis failed: {exc}") from exc
        await self._local.save(record)

    async def get(self, task_id: str) -> TaskRecord | None:
        local = await self._local.get(task_id)
        if local is not None:
            return local
        records = await self._load([task_id])
        return records[0]

    async def _load(self, task_ids: list[str]) -> list[TaskRecord | None]:
        with _store_errors():
            async with self._client.pipeline(transaction=False) as pipe:
                for task_id in task_ids:
                    rec, _, content, reasoning, sources = self._task_keys(task_id)
                    pipe.hgetall(rec)
                    pipe.get(content)
                    pipe.get(reasoning)
                    pipe.lrange(sources, 0, -1)
            results = list(pipe.results or ())
            out: list[TaskRecord | None] = []
            for i in range(len(task_ids)):
                raw, content, reasoning, sources = results[4 * i:4 * i + 4]
                out.append(self._decode(cast(dict[str, str], raw), content, reasoning, sources))
            return out

    @staticmethod
    def _decode(raw: dict[str, str], content: str | None, reasoning: str | None,
                sources: Any) -> TaskRecord | None:
        if not raw or "id" not in raw:
            return None
        data = {name: fastjson.loads(raw[name]) for name in _RECORD_FIELDS if name in raw}
        data["content"] = content or ""
        data["reasoning"] = reasoning or ""
        data["sources"] = [fastjson.loads(s) for s in sources or ()]
        return TaskRecord.from_dict(data, session_bound=bool(data.get("session_bound")))

    async def list_tasks(
        self,
        user: str,
        *,
        chat_id: str | None = None,
        session_id: str | None = None,
        include_finished: bool = False,
    ) -> list[TaskRecord]:
        with _store_errors():
            index = self._adm(f"user:{user}")
            task_ids = sorted(await self._client.smembers(index))
            records = await self._load(task_ids) if task_ids else []
            gone = [t for t, r in zip(task_ids, records, strict=True) if r is None]
            if gone:
                await self._client.srem(index, gone)
            return [
                r for r in records
                if r is not None and r.user == user
                and (include_finished or r.active)
                and (chat_id is None or r.chat_id == chat_id)
                and (session_id is None or r.session_id == session_id)
            ]

    # -- the log -----------------------------------------------------------------------------

    async def append(self, record: TaskRecord, type_: str, data: dict[str, Any]) -> Event:
        """Append to the local copy at once (readers here see the event as they would on
        the memory backend) and queue the write to Redis for the next pipeline; the task
        does not wait for Redis's answer. Each task's writes go out in order. A write that
        Redis refused (the log closed elsewhere, the task lost in a restart, Redis down)
        fails the task's next append, so the task ends at once; readers here may then have
        seen one event that Redis never got. Waits only while Redis is too far behind
        (``_MAX_QUEUED_WRITES``); cancelled then, it writes nothing."""
        if type_ in TERMINAL_EVENTS:
            raise ValueError("a terminal event is written by finish()")
        failure = self._write_failures.get(record.id)
        if failure is not None:
            raise failure
        while len(self._writes) >= _MAX_QUEUED_WRITES:
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()
        seq = record.last_seq + 1
        content = reasoning = source = ""
        if type_ == "delta":
            content = data.get("content", "")
            reasoning = data.get("reasoning", "")
        elif type_ == "source":
            source = fastjson.dumps(data)
        write = _Write(record.id, self._task_keys(record.id),
                       [str(seq), type_, fastjson.dumps(data), content, reasoning, source])
        self._writes.append(write)
        self._last_write[record.id] = write
        self._write_wanted.set()
        return await self._local.append(record, type_, data)

    def _refused(self, task_id: str, result: Any) -> Exception | None:
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

    async def _write_loop(self) -> None:
        """Send what piled up meanwhile in one pipeline, and repeat: appends of every task
        of this process share the round trips, and one pipeline at a time keeps each
        task's writes in order."""
        while True:
            await self._write_wanted.wait()
            self._write_wanted = trio.Event()
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
                    self._write_failures.setdefault(write.task_id, refusal)

    async def _flushed(self, task_id: str) -> None:
        """Wait until the task's queued writes have had Redis's answer (bounded)."""
        write = self._last_write.pop(task_id, None)
        if write is not None:
            with trio.move_on_after(self._timeout_s):
                await write.done.wait()

    async def _send(self, batch: list[_Write]) -> list[Any]:
        for attempt in (1, 2):
            async with self._client.pipeline(transaction=False, raise_on_error=False) as pipe:
                for write in batch:
                    pipe.evalsha(self._append.sha, keys=write.keys, args=write.args)
            results = list(pipe.results or ())
            if attempt == 1 and any(isinstance(r, coredis.exceptions.NoScriptError)
                                    for r in results):
                # Redis restarted and forgot the script: load it and send again (the
                # script is idempotent: a write already made answers 2).
                await self._client.script_load(_APPEND)
                continue
            return results
        return results

    async def finish(self, record: TaskRecord) -> Event | None:
        await self._flushed(record.id)  # the end goes after the task's last event
        self._write_failures.pop(record.id, None)
        try:
            written = await self._end(record, self.replica_id)
        except coredis.exceptions.RedisError as exc:
            # Readers here still see the task end; the record in Redis waits for a reaper.
            await self._finish_locally(record)
            raise BackendUnavailable(f"Redis failed: {exc}") from exc
        if written is None:
            # Ended elsewhere meanwhile (reaped while Redis could not hear from us): the
            # local copy ends as Redis says, so that readers here see that end too.
            ended = (await self._load([record.id]))[0]
            if ended is not None and not ended.active:
                await self._finish_locally(ended)
            return None
        return await self._finish_locally(record) or written

    async def _end(self, record: TaskRecord, replica: str) -> Event | None:
        """Write the terminal event as ``record`` says, then free the task's place. If
        the log moved on meanwhile (an append this process gave up waiting for, or an
        owner still writing while reaped), the record is brought up to Redis's log and
        the write tried again. None if the log was closed already."""
        keys = self._task_keys(record.id)
        for _ in range(10):
            seq = record.last_seq + 1
            ended = record.copy()
            ended.last_seq = seq
            data = ended.to_dict()
            result: Any = await self._finish(keys=keys, args=[
                str(seq), "task:" + record.status, fastjson.dumps(data),
                str(self._retention_ms), record.content, record.reasoning,
                fastjson.dumps(record.sources), *self._fields(ended)])
            if result == -2:
                current = (await self._load([record.id]))[0]
                if current is not None:
                    record.last_seq = current.last_seq
                    record.content, record.reasoning = current.content, current.reasoning
                    record.sources = current.sources
                continue
            await self._release_place(record.id, replica)
            if result != 1:
                return None
            return Event(record.id, record.chat_id, record.message_id, seq,
                         "task:" + record.status, data)
        raise BackendUnavailable(f"could not end task {record.id}: its log kept moving")

    async def _finish_locally(self, record: TaskRecord) -> Event | None:
        if not self._local.has(record.id):
            return None
        return await self._local.finish(record)

    async def _release_place(self, task_id: str, replica: str) -> None:
        try:
            await self._release(keys=[self._adm("counts"), self._adm(f"owned:{replica}")],
                                args=[task_id])
        except coredis.exceptions.RedisError as exc:
            log.warning("could not release the place of %s: %s", task_id, exc)

    async def read(self, task_id: str, after: int, limit: int | None = None) -> list[Event]:
        if self._local.has(task_id):
            return await self._local.read(task_id, after, limit)
        start = f"(0-{after}" if after > 0 else "-"
        with _store_errors():
            entries = await self._client.xrange(self._task_keys(task_id)[1], start, "+",
                                                count=limit)
            if not entries:
                return []
            chat_id, message_id = await self._identity(task_id)
        return [self._event(task_id, chat_id, message_id, e) for e in entries]

    @staticmethod
    def _event(task_id: str, chat_id: str | None, message_id: str | None,
               entry: Any) -> Event:
        values = entry.field_values
        seq = int(str(entry.identifier).partition("-")[2])
        return Event(task_id, chat_id, message_id, seq, values["t"],
                     fastjson.loads(values["d"]))

    async def _identity(self, task_id: str) -> tuple[str | None, str | None]:
        known = self._identities.get(task_id)
        if known is None:
            raw = await self._client.hmget(self._task_keys(task_id)[0],
                                           ["chat_id", "message_id"])
            known = (fastjson.loads(raw[0]) if raw[0] else None,
                     fastjson.loads(raw[1]) if raw[1] else None)
            if len(self._identities) > 10_000:
                self._identities.clear()
            self._identities[task_id] = known
        return known

    async def _log_state(self, task_id: str) -> tuple[bool, bool, int]:
        """Whether the task exists, whether its log is closed, and its last seq."""
        raw = await self._client.hmget(self._task_keys(task_id)[0],
                                       ["id", "closed", "last_seq"])
        return raw[0] is not None, raw[1] is not None, int(raw[2] or 0)

    async def wait_beyond(self, task_id: str, after: int) -> bool:
        if self._local.has(task_id):
            return await self._local.wait_beyond(task_id, after)
        log_key = self._task_keys(task_id)[1]
        with _store_errors():
            while True:
                exists, closed, last = await self._log_state(task_id)
                if last > after:
                    return True
                if not exists or closed:
                    return False
                found = await self._waiting.xread({log_key: f"0-{after}"}, count=1,
                                                  block=5000)
                if found:
                    return True

    @contextmanager
    def reading(self, task_id: str) -> Iterator[None]:
        # Redis keeps an ended log for the retention time whoever reads it; only the
        # local copy is held.
        with self._local.reading(task_id):
            yield

    def watch(self, task_id: str, on_append: Callable[[Event], None],
              after: int = 0) -> LogWatch | None:
        local = self._local.watch(task_id, on_append, after)
        if local is not None:
            return local
        if self._nursery is None:
            return None
        remote = _RemoteWatch()
        self._nursery.start_soon(self._tail, task_id, after, on_append, remote)
        return remote

    async def _tail(self, task_id: str, after: int, on_append: Callable[[Event], None],
                    watch: _RemoteWatch) -> None:
        """Follow a log written elsewhere with blocking reads, until it ends or the
        watch is closed."""
        log_key = self._task_keys(task_id)[1]
        cursor = after
        with watch.scope:
            try:
                chat_id, message_id = await self._identity(task_id)
                while True:
                    found = await self._waiting.xread({log_key: f"0-{cursor}"}, count=256,
                                                      block=5000)
                    if not found:
                        exists, closed, last = await self._log_state(task_id)
                        if not exists or (closed and last <= cursor):
                            return
                        continue
                    for entry in found[log_key]:
                        event = self._event(task_id, chat_id, message_id, entry)
                        cursor = event.seq
                        on_append(event)
                        if event.terminal:
                            return
            except coredis.exceptions.RedisError as exc:
                log.warning("following task %s failed: %s", task_id, exc)

    async def expire(self, now: float, retention_s: float,
                     max_retained: int | None = None) -> list[str]:
        # Redis expires its keys by itself (set with the terminal event); the local copies
        # go as the memory backend lets them go.
        expired = await self._local.expire(now, retention_s, max_retained)
        for task_id in expired:
            self._identities.pop(task_id, None)
        return expired

    async def counts(self) -> tuple[int, dict[str, int]]:
        with _store_errors():
            raw = await self._client.hgetall(self._adm("counts"))
            per_user = {k[2:]: int(v) for k, v in raw.items() if k.startswith("u:")}
            return int(raw.get("*", 0)), per_user

    # -- sessions ---------------------------------------------------------------------------

    def _session_key(self, session_id: str) -> str:
        return f"{self._prefix}:session:{session_id}"

    async def claim_session(self, session_id: str, user: str) -> bool:
        return await self._session_step(session_id, user, 0)

    async def session_presence(self, session_id: str, user: str, delta: int) -> None:
        await self._session_step(session_id, user, delta)

    async def _session_step(self, session_id: str, user: str, delta: int) -> bool:
        try:
            result: Any = await self._session(
                keys=[self._session_key(session_id)],
                args=[user, self.replica_id, str(delta), str(self._retention_ms)])
        except coredis.exceptions.RedisError as exc:
            raise BackendUnavailable(f"Redis failed: {exc}") from exc
        return bool(result == 1)

    async def announce_task(self, session_id: str, task_id: str) -> None:
        with _store_errors():
            for replica in await self._session_replicas(session_id):
                await self._client.xadd(self._control_key(replica),
                                        {"task": task_id, "session": session_id})

    async def _session_replicas(self, session_id: str) -> list[str]:
        """The other live replicas with a connection to the session (a dead one's count
        is dropped as it is met)."""
        key = self._session_key(session_id)
        out: list[str] = []
        for name, count in (await self._client.hgetall(key)).items():
            replica = name[2:]
            if not name.startswith("c:") or replica == self.replica_id or int(count) <= 0:
                continue
            if await self._client.exists([self._heartbeat_key(replica)]):
                out.append(replica)
            else:
                await self._client.hdel(key, [name])
        return out

    async def session_connected_elsewhere(self, session_id: str) -> bool:
        with _store_errors():
            return bool(await self._session_replicas(session_id))

    # -- stops from anywhere -----------------------------------------------------------------

    async def request_stop(self, task_id: str, reason: CancelReason) -> bool:
        """Send a stop to the replica that runs the task; False if it runs nowhere."""
        with _store_errors():
            raw = await self._client.hmget(self._task_keys(task_id)[0], ["owner", "closed"])
            owner, closed = raw[0], raw[1]
            if owner is None or closed is not None:
                return False
            await self._client.xadd(self._control_key(owner), {"task": task_id, "reason": reason})
            return True

    async def _ensure_control_group(self) -> None:
        try:
            await self._client.xgroup_create(self._control_key(self.replica_id), "owner", "0",
                                             mkstream=True)
        except coredis.exceptions.StreamDuplicateConsumerGroupError:
            pass

    async def _control_loop(self, control: Control) -> None:
        """Apply the stops sent to this replica. What was read and not acknowledged (a
        connection dropped in between) is read again first."""
        key = self._control_key(self.replica_id)
        pending = True
        while True:
            try:
                found = await self._waiting.xreadgroup(
                    "owner", self.replica_id, {key: "0" if pending else ">"}, count=100,
                    block=None if pending else 5000)
                entries = (found or {}).get(key, ())
                if pending and not entries:
                    pending = False
                    continue
                for entry in entries:
                    values = entry.field_values
                    if "session" in values:
                        control.follow(str(values["session"]), str(values["task"]))
                    else:
                        control.stop(str(values["task"]), cast(CancelReason, values["reason"]))
                if entries:
                    await self._client.xack(key, "owner", [e.identifier for e in entries])
            except coredis.exceptions.RedisError as exc:
                log.warning("reading stops failed: %s", exc)
                pending = True
                await self._ensure_control_group_quietly()
                await trio.sleep(min(1.0, self._ttl_s / 10))

    async def _ensure_control_group_quietly(self) -> None:
        try:
            await self._ensure_control_group()
        except coredis.exceptions.RedisError:
            pass

    # -- dead replicas -----------------------------------------------------------------------

    async def _reap_loop(self) -> None:
        while True:
            await trio.sleep(self._ttl_s / 10)
            try:
                await self.reap_dead_replicas()
            except coredis.exceptions.RedisError as exc:
                log.warning("looking for dead replicas failed: %s", exc)

    async def reap_dead_replicas(self) -> list[str]:
        """End the running tasks of replicas whose heartbeat has expired (``failed``,
        ``replica_lost``, partial content kept) and free their places. Returns the
        tasks ended here."""
        ended: list[str] = []
        replicas = await self._client.smembers(self._adm("replicas"))
        for replica in replicas:
            if replica == self.replica_id:
                continue
            if await self._client.exists([self._heartbeat_key(replica)]):
                continue
            owned_key = self._adm(f"owned:{replica}")
            for task_id in await self._client.hkeys(owned_key):
                record = (await self._load([task_id]))[0]
                if record is None:
                    await self._release_place(task_id, replica)
                    continue
                if record.active:
                    record.status = "failed"
                    record.ended_at = time.time()
                    record.error = {"phase": record.phase, "type": "replica_lost",
                                    "message": f"The replica running the task ({replica}) "
                                               "stopped answering."}
                    if await self._end(record, replica) is not None:
                        ended.append(task_id)
                        log.warning("task=%s failed: replica %s lost", task_id, replica)
                else:
                    await self._release_place(task_id, replica)
            await self._client.srem(self._adm("replicas"), [replica])
            await self._client.delete([self._control_key(replica)])
        return ended


async def ping(url: str, timeout_s: float = 5.0) -> str | None:
    """Why Redis at ``url`` cannot be used, or None if it answers a PING."""
    try:
        client = coredis.Redis.from_url(url, decode_responses=True)
        with trio.fail_after(timeout_s):
            async with client:
                await client.ping()
    except trio.TooSlowError:
        return f"no answer in {timeout_s:.0f} s"
    except Exception as exc:  # noqa: BLE001 - coredis wraps what it raises in groups
        leaf = first_leaf(exc)
        return str(leaf) or type(leaf).__name__
    return None


class _RemoteWatch:
    def __init__(self) -> None:
        self.scope = trio.CancelScope()

    def close(self) -> None:
        self.scope.cancel()

