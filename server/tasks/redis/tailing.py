"""Reading the logs of tasks run by other processes: reads, waits and watches, multiplexed.

A reader here of a task run elsewhere reads its stream. Waiting for more used to be a
blocking ``XREAD`` per reader, each holding a Redis connection until it returned: a
thousand followers of remote tasks held a thousand connections. Here one task, the
multiplexer (``run``), holds one blocking ``XREAD`` over the streams of every followed task
at once and hands each entry to the watches and waiters of its task. A follower costs a slot
in a table, not a connection.

When a follower of a new task arrives (or one that starts from an earlier cursor), the
multiplexer's ``XREAD`` must take one more stream: the read in flight is cancelled and
started again with it (a cancelled blocking read costs its connection, which the pool
replaces; arrivals meanwhile join the same restart). The new read returns at once with what
the new follower has not seen yet.

The streams of one task share its hash tag, but the streams of many tasks do not: on a
Redis Cluster one ``XREAD`` can only cover keys of one hash slot (a node refuses keys of two
slots with CROSSSLOT even when it serves both). There the followed tasks are grouped by
slot and each group has a read of its own (``_ReadGroup``), on a connection to the node
that serves the slot: a follower still costs a slot in a table, and the connections held
are one per slot that has followed tasks, not one per follower. On one server there is one
group, and one read.
"""

from __future__ import annotations

import logging
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import trio

from server import fastjson
from server.events import Event
from server.tasks.backend import LogPosition
from server.tasks.redis.connection import RedisConnection
from server.tasks.redis.errors import RedisError, redis_errors
from server.tasks.redis.keys import decode_event

log = logging.getLogger("tether.redis")

_MAX_IDENTITIES = 10_000
# The latest events the multiplexer read, kept per task (at most so many tasks and events
# each): a follower marked by an event reads it from here, not with a round trip of its own.
_RECENT_TASKS = 512
_RECENT_EVENTS = 128
# Entries taken per stream in one read, and how long one blocking read waits for any.
_READ_COUNT = 256
_BLOCK_MS = 5000
# How long a group's read waits while more groups than ``follow_reads`` take turns.
_TURN_BLOCK_MS = 50


@dataclass(eq=False)
class RemoteWatch:
    """One watch of a remote task's log: ``on_append`` gets each event past ``cursor``."""

    tailer: Tailer
    task_id: str
    on_append: Callable[[Event], None]
    cursor: int
    closed: bool = False

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.tailer._drop(self)


@dataclass(eq=False)
class _Waiter:
    after: int
    done: trio.Event = field(default_factory=trio.Event)
    result: bool = False


@dataclass(eq=False)
class _Followed:
    """A followed task: where the multiplexer reads its stream from, and who waits on it."""

    cursor: int
    group: int | None
    watches: list[RemoteWatch] = field(default_factory=list)
    waiters: list[_Waiter] = field(default_factory=list)

    @property
    def idle(self) -> bool:
        return not self.watches and not self.waiters


@dataclass(eq=False)
class _ReadGroup:
    """Followed tasks whose streams one ``XREAD`` may take together (all of them on one
    server; those of one hash slot on a cluster), and the read that takes them."""

    tasks: set[str] = field(default_factory=set)
    # Set when the read must start again (a task joined, or a cursor moved back).
    wake: trio.Event = field(default_factory=trio.Event)
    # The read in flight, cancelled by a wake.
    reading: trio.CancelScope | None = None
    running: bool = False
    # When its followed logs were last checked for an end that no read showed.
    checked: float = float("-inf")


class Tailer:
    def __init__(self, conn: RedisConnection) -> None:
        self._conn = conn
        # chat_id and message_id of tasks read from Redis, which every event carries.
        self._identities: dict[str, tuple[str | None, str | None]] = {}
        self._users: dict[str, str] = {}  # the users of tasks followed (``user_of``)
        self._followed: dict[str, _Followed] = {}
        self._groups: dict[int | None, _ReadGroup] = {}
        self._recent: OrderedDict[str, deque[Event]] = OrderedDict()
        # Where the groups' reads run, while the multiplexer runs.
        self._readers: trio.Nursery | None = None
        # The blocking reads held at once (on a cluster, more groups than this take turns),
        # those in flight now, and the most there ever were (for the tests and the bench).
        self._read_places = trio.CapacityLimiter(conn.follow_reads)
        self.blocking = 0
        self.peak_blocking = 0
        # Whether the cluster serves (watches are refused before and after).
        self.nursery: trio.Nursery | None = None
        # This replica is cut off from Redis (``RedisStore.let_readers_go``).
        self.cut_off = False

    def forget(self, task_id: str) -> None:
        self._identities.pop(task_id, None)
        self._users.pop(task_id, None)
        self._recent.pop(task_id, None)

    async def user_of(self, task_id: str) -> str | None:
        """The user of a task run elsewhere (None: unknown or expired). A task the
        multiplexer follows exists (it stops following a log that ends), so its user,
        once read, is not read again: a crowd of followers subscribing to one task costs
        one small read, not a record each. Raises ``BackendUnavailable``."""
        if task_id in self._followed and (known := self._users.get(task_id)) is not None:
            return known
        with redis_errors():
            raw = await self._conn.commands.hmget(
                self._conn.keys.task(task_id).rec, ["user", "chat_id", "message_id"]
            )
        if raw[0] is None:
            return None
        user = str(fastjson.loads(raw[0]))
        if len(self._users) > _MAX_IDENTITIES:
            self._users.clear()
        self._users[task_id] = user
        self._remember(task_id, raw[1], raw[2])
        return user

    async def position(self, task_id: str) -> LogPosition | None:
        """Where the log of a task run elsewhere is (None: unknown or expired), read
        without its record; for a task the multiplexer follows, where it has read to.
        Raises ``BackendUnavailable``."""
        followed = self._followed.get(task_id)
        if followed is not None:  # open, as far as the multiplexer has read it
            return LogPosition(True, followed.cursor)
        with redis_errors():
            exists, closed, last = await self._log_state(task_id)
        return LogPosition(not closed, last) if exists else None

    @property
    def followed(self) -> int:
        """Tasks the multiplexer reads now (for the bench and the metrics)."""
        return len(self._followed)

    @property
    def reads(self) -> int:
        """Blocking reads the multiplexer holds now: one, or on a cluster one per hash
        slot of the followed tasks."""
        return sum(group.running for group in self._groups.values())

    async def read(self, task_id: str, after: int, limit: int | None = None) -> list[Event]:
        """The task's events past ``after``: from the multiplexer's latest ones when they
        hold the next one (a follower it has just marked), none when ``after`` is where
        the multiplexer has read to (the next come through it), else from Redis."""
        recent = self._recent.get(task_id)
        if recent and recent[0].seq <= after + 1 <= recent[-1].seq:
            out = [e for e in recent if e.seq > after]
            return out if limit is None else out[:limit]
        followed = self._followed.get(task_id)
        if followed is not None and after >= followed.cursor:
            # A follower that has all the multiplexer has read: what comes next, the
            # multiplexer hands out. Read from Redis, it would run ahead of the multiplexer
            # and miss its latest events from then on, a round trip per event.
            return []
        start = f"(0-{after}" if after > 0 else "-"
        key = self._conn.keys.task(task_id).log
        with redis_errors():
            entries = await self._conn.through_failover(
                partial(self._conn.commands.xrange, key, start, "+", count=limit)
            )
            if not entries:
                return []
            chat_id, message_id = await self._conn.through_failover(
                partial(self._identity, task_id)
            )
        return [decode_event(task_id, chat_id, message_id, e) for e in entries]

    async def _identity(self, task_id: str) -> tuple[str | None, str | None]:
        known = self._identities.get(task_id)
        if known is None:
            raw = await self._conn.commands.hmget(
                self._conn.keys.task(task_id).rec, ["chat_id", "message_id"]
            )
            known = self._remember(task_id, raw[0], raw[1])
        return known

    def _remember(
        self, task_id: str, chat_id: str | None, message_id: str | None
    ) -> tuple[str | None, str | None]:
        known = (
            fastjson.loads(chat_id) if chat_id else None,
            fastjson.loads(message_id) if message_id else None,
        )
        if len(self._identities) > _MAX_IDENTITIES:
            self._identities.clear()
        self._identities[task_id] = known
        return known

    async def _log_state(self, task_id: str) -> tuple[bool, bool, int]:
        """Whether the task exists, whether its log is closed, and its last seq."""
        raw = await self._conn.commands.hmget(
            self._conn.keys.task(task_id).rec, ["id", "closed", "last_seq"]
        )
        return raw[0] is not None, raw[1] is not None, int(raw[2] or 0)

    # -- following -------------------------------------------------------------------------

    def _follow(self, task_id: str, cursor: int) -> _Followed:
        followed = self._followed.get(task_id)
        if followed is None:
            group = self._conn.slot_group(self._conn.keys.task(task_id).log)
            followed = self._followed[task_id] = _Followed(cursor, group)
            new_group = group not in self._groups
            self._group(group).tasks.add(task_id)
            self._restart(group)
            if new_group and self._taking_turns:
                # Past the places: every long read in flight gives way, to read again
                # with short waits and let the other groups have their turns.
                for key, other in self._groups.items():
                    if key != group and other.reading is not None:
                        other.wake.set()
                        other.reading.cancel()
        elif cursor < followed.cursor:
            followed.cursor = cursor
            self._restart(followed.group)
        return followed

    @property
    def _taking_turns(self) -> bool:
        """Whether there are more groups than blocking reads may be held at once."""
        return len(self._groups) > self._conn.follow_reads

    def _group(self, key: int | None) -> _ReadGroup:
        group = self._groups.get(key)
        if group is None:
            group = self._groups[key] = _ReadGroup()
        return group

    def _restart(self, key: int | None) -> None:
        """Have the group's read take its table anew (synchronous): its read in flight is
        cancelled, or a read is started for a new group."""
        group = self._group(key)
        group.wake.set()
        if group.reading is not None:
            group.reading.cancel()
        if not group.running and self._readers is not None:
            group.running = True
            self._readers.start_soon(self._read_group, key, group)

    def _unfollow(self, task_id: str, followed: _Followed) -> None:
        if self._followed.get(task_id) is followed:
            del self._followed[task_id]
            group = self._groups.get(followed.group)
            if group is not None:
                group.tasks.discard(task_id)

    def _drop(self, watch: RemoteWatch) -> None:
        followed = self._followed.get(watch.task_id)
        if followed is not None and watch in followed.watches:
            followed.watches.remove(watch)
            if followed.idle:
                self._unfollow(watch.task_id, followed)

    async def wait_beyond(self, task_id: str, after: int) -> bool:
        """See ``TaskStore.wait_beyond``: a slot in the multiplexer's table, no connection
        of its own. Cancelling it only stops the wait."""
        followed = self._followed.get(task_id)
        if followed is not None and followed.cursor > after:
            return True
        if followed is None:
            # Not followed yet: what Redis holds decides. (A followed log is open as far
            # as the multiplexer has read, and the multiplexer wakes the waiter.)
            with redis_errors():
                exists, closed, last = await self._conn.through_failover(
                    partial(self._log_state, task_id)
                )
            if last > after:
                return True
            if not exists or closed:
                return False
        waiter = _Waiter(after)
        followed = self._follow(task_id, after)
        followed.waiters.append(waiter)
        try:
            if self.cut_off:  # let go while Redis was asked above: not woken by wake_all
                waiter.result = True
                waiter.done.set()
            await waiter.done.wait()
        finally:
            if waiter in followed.waiters:
                followed.waiters.remove(waiter)
            if followed.idle:
                self._unfollow(task_id, followed)
        return waiter.result

    def watch(
        self, task_id: str, on_append: Callable[[Event], None], after: int = 0
    ) -> RemoteWatch | None:
        """Report each event of the task's log past ``after`` to ``on_append`` until the
        watch is closed or the log ends; None while the cluster does not serve."""
        if self.nursery is None:
            return None
        watch = RemoteWatch(self, task_id, on_append, after)
        self._follow(task_id, after).watches.append(watch)
        return watch

    # -- the multiplexer -------------------------------------------------------------------

    async def run(self) -> None:
        """Read every followed stream, one blocking read per group at a time, and hand out
        what comes. Runs until cancelled (the cluster's end); a Redis failure is logged and
        the group's reading goes on after a pause, every follower still waiting."""
        try:
            async with trio.open_nursery() as readers:
                self._readers = readers
                for key in list(self._groups):
                    self._restart(key)
                await trio.sleep_forever()
        finally:
            self._readers = None
            for group in self._groups.values():
                group.running = False

    async def _read_group(self, key: int | None, group: _ReadGroup) -> None:
        """The reads of one group, until it has no task left (then it is dropped; a task
        followed later starts it anew)."""
        while group.tasks:
            group.wake = trio.Event()
            try:
                await self._read_once(group)
            except RedisError as exc:
                log.warning("following remote tasks failed: %s", exc)
                self._conn.noticed(exc)
                await trio.sleep(0.5)
        group.running = False
        if self._groups.get(key) is group:
            del self._groups[key]

    async def _read_once(self, group: _ReadGroup) -> None:
        keys = self._conn.keys
        streams = {keys.task(t).log: f"0-{self._followed[t].cursor}" for t in group.tasks}
        for task_id in list(group.tasks):
            await self._identity(task_id)
        found = None
        async with self._read_places:
            with trio.CancelScope() as reading:
                group.reading = reading
                if not group.wake.is_set():
                    block = _TURN_BLOCK_MS if self._taking_turns else _BLOCK_MS
                    self.blocking += 1
                    self.peak_blocking = max(self.peak_blocking, self.blocking)
                    try:
                        found = await self._conn.waiting.xread(
                            streams, count=_READ_COUNT, block=block
                        )
                    finally:
                        self.blocking -= 1
            group.reading = None
        if reading.cancelled_caught or group.wake.is_set():
            return  # a new task to follow: read again with it
        if not found:
            # Nothing came for a whole long wait: see whether a log ended or expired
            # meanwhile (taking turns, a wait is short: so at most once a long wait).
            now = trio.current_time()
            if now - group.checked >= _BLOCK_MS / 1000:
                group.checked = now
                await self._drop_ended(list(group.tasks))
            return
        by_key = {keys.task(t).log: t for t in group.tasks}
        for key, entries in found.items():
            followed_id = by_key.get(str(key))
            if followed_id is not None:
                self._deliver(followed_id, entries)

    def _deliver(self, task_id: str, entries: Sequence[Any]) -> None:
        followed = self._followed.get(task_id)
        if followed is None:
            return
        chat_id, message_id = self._identities.get(task_id, (None, None))
        ended = False
        for entry in entries:
            event = decode_event(task_id, chat_id, message_id, entry)
            self._keep(event)
            followed.cursor = max(followed.cursor, event.seq)
            for watch in list(followed.watches):
                if event.seq > watch.cursor and not watch.closed:
                    watch.cursor = event.seq
                    watch.on_append(event)
            for waiter in followed.waiters:
                if event.seq > waiter.after:
                    waiter.result = True
                    waiter.done.set()
            ended = ended or event.terminal
        if ended:
            self._end(task_id, followed)

    def _keep(self, event: Event) -> None:
        """Keep an event among the task's latest, which stay one run of seqs."""
        recent = self._recent.get(event.task_id)
        if recent is None:
            recent = self._recent[event.task_id] = deque(maxlen=_RECENT_EVENTS)
            if len(self._recent) > _RECENT_TASKS:
                self._recent.popitem(last=False)
        else:
            self._recent.move_to_end(event.task_id)
        if recent and event.seq <= recent[-1].seq:
            return  # read again for a follower from an earlier cursor
        if recent and event.seq != recent[-1].seq + 1:
            recent.clear()
        recent.append(event)

    def wake_all(self) -> None:
        """Let every waiter go, as if its event had come (the store has news for its
        readers: see ``RedisStore.let_readers_go``, which sets ``cut_off`` first); the
        watches are left alone."""
        for followed in self._followed.values():
            for waiter in followed.waiters:
                waiter.result = True
                waiter.done.set()

    def _end(self, task_id: str, followed: _Followed) -> None:
        """The log has ended (or is gone): nothing more will come to its followers."""
        for watch in followed.watches:
            watch.closed = True
        for waiter in followed.waiters:
            waiter.done.set()
        self._unfollow(task_id, followed)

    async def _drop_ended(self, task_ids: list[str]) -> None:
        """After a read that found nothing: the followed logs that ended or expired
        meanwhile end their followers."""
        for task_id in task_ids:
            followed = self._followed.get(task_id)
            if followed is None:
                continue
            exists, closed, last = await self._log_state(task_id)
            if not exists or (closed and last <= followed.cursor):
                self._end(task_id, followed)
