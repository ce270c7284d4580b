"""What a ``/ws`` connection sends next: the delivery scheduler, with no I/O.

Like wsproto's connection object, ``Delivery`` never touches a socket or a log. Inputs go
in as calls (a task followed, an append marked, a reply queued, a read's result, a send
done), and ``next_step()`` hands out the next piece of I/O to do: send these texts, read
this log, look this task up, wait for a wake, or stop. The caller (``ws.WsWriter``) does
that I/O and feeds the outcome back before it asks again.

The order it keeps is control before data: replies (``task``, ``pong``, errors) first,
then tasks whose log just ended (a stop's ``task:cancelled`` does not wait behind other
tasks' deltas), then the rest in the order they became ready. Order within a task is seq
order. Each followed task is a cursor, not a buffer: an append only marks the task ready,
and when the scheduler comes back to it, it reads everything that piled up since, as one
``events`` message to a client that asked for batches and as consecutive ``event``
messages otherwise.

Invariants it relies on (the caller keeps them):

- One task sends all the connection's messages, replies included, and it is the task that
  drives ``next_step()``: the order of ``Send`` steps is the order on the wire.
- A step's outcome is fed back (``receive_events``, ``receive_log_state``, ``sent`` or
  ``abandon``) before the next ``next_step()``: one step is in flight at a time.
- ``Wait`` means nothing is ready: the caller waits for ``wake`` and asks again. Between
  ``next_step()`` returning ``Wait`` and the wait, and between the wait returning and its
  reset (``ws.WsWriter._wake``), there is no checkpoint; otherwise a mark that lands in
  the gap would wake nobody, and the connection would sit on ready events.
- ``wake`` and the watches' append callbacks run synchronously and never re-enter
  ``next_step()``.
- The log's ``seq``s are consecutive and start at 1: a cursor is the last ``seq`` sent,
  and a read past it returns events in seq order.
- A log whose state is not ``active`` gets no more events (the terminal event is its
  last), so a cursor at its ``last_seq`` has nothing left to wait for.
- The append callback of a closed watch is not called again. A follower is told apart by
  its object, not its task id: a turn whose follower was replaced (resubscribe) or dropped
  meanwhile stops at its next outcome, so the old cursor sends nothing more.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

# Events taken from one log at a time: bounds one batch message and lets other tasks'
# events interleave when one task has a long backlog (a replay).
READ_LIMIT = 256


class LogEvent(Protocol):
    """What the scheduler needs of an event of a task's log."""

    @property
    def seq(self) -> int: ...

    @property
    def terminal(self) -> bool: ...

    @property
    def json(self) -> str: ...


class Watch(Protocol):
    """The subscription that marks a followed task ready (``TaskManager.watch``)."""

    def close(self) -> None: ...


@dataclass(frozen=True, slots=True)
class LogState:
    """Where a task's log is: still growing (``active``) or not, and its last ``seq``."""

    active: bool
    last_seq: int


# -- steps: the I/O the caller does next ---------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    """Send these texts as messages, in order, then call ``sent()``. ``replies``: they are
    replies, taken off the reply queue (room for more)."""

    texts: tuple[str, ...]
    replies: bool


@dataclass(frozen=True, slots=True)
class ReadLog:
    """Read at most ``limit`` events past ``after`` from the task's log, then call
    ``receive_events()``."""

    task_id: str
    after: int
    limit: int


@dataclass(frozen=True, slots=True)
class FindTask:
    """Look the task up, then call ``receive_log_state()`` (None: unknown or expired)."""

    task_id: str


@dataclass(frozen=True, slots=True)
class Wait:
    """Nothing to send: wait for ``wake``, then ask again."""


@dataclass(frozen=True, slots=True)
class Done:
    """Stop sending: the client fell too far behind (``too_slow``), or the server restarts
    (``restarting``) and nothing is left to send."""


Step = Send | ReadLog | FindTask | Wait | Done


@dataclass(eq=False)
class _Follower:
    """One followed task: where its reader is, and the watch that marks it ready."""

    cursor: int
    watch: Watch
    # The log's length when this follower first found a full read waiting: lag is counted
    # from there, so that replaying a long log is never mistaken for falling behind.
    live_from: int | None = None


@dataclass(eq=False)
class _Turn:
    """One turn of one follower: what was read, and how far the sending got."""

    task_id: str
    ended: bool
    follower: _Follower
    events: Sequence[LogEvent] = ()
    sending: int = 0  # index of the next event to send (one message per event)
    find: bool = False  # the next step is a look-up of the task, not a send


class Delivery:
    """The scheduler of one connection: followers with cursors, replies, and what next."""

    def __init__(
        self,
        *,
        batch: bool,
        max_lag_events: int,
        wake: Callable[[], None],
        read_limit: int = READ_LIMIT,
    ) -> None:
        self.batch = batch
        self._max_lag_events = max_lag_events
        self._read_limit = read_limit
        self._wake = wake
        self._followers: dict[str, _Follower] = {}
        # Followed tasks with events past their cursor, as ordered sets: ``_ended`` holds
        # those whose log just ended, served first.
        self._ready: dict[str, None] = {}
        self._ended: dict[str, None] = {}
        # A list, not a deque: it is emptied whole, and an empty deque keeps a block of
        # 64 slots (about 0.7 KiB) for every idle connection.
        self._replies: list[str] = []
        self._turn: _Turn | None = None
        # The kind of step handed out whose outcome is due (one at a time).
        self._due: type[Send] | type[ReadLog] | type[FindTask] | None = None
        self.too_slow = False
        self.restarting = False

    # -- inputs ---------------------------------------------------------------------------

    def follow(self, task_id: str, after: int, watch: Watch) -> None:
        """Follow a task from ``after`` with ``watch`` (replacing any follower of it); the
        replay of what is already in the log goes out with the next turns."""
        self.unfollow(task_id)
        self._followers[task_id] = _Follower(after, watch)
        self.mark(task_id, False)

    def unfollow(self, task_id: str) -> bool:
        """Stop following a task (its watch is closed); whether it was followed."""
        follower = self._followers.pop(task_id, None)
        if follower is not None:
            follower.watch.close()
        return follower is not None

    def unfollow_all(self) -> None:
        for follower in self._followers.values():
            follower.watch.close()
        self._followers.clear()

    def is_following(self, task_id: str) -> bool:
        return task_id in self._followers

    def cursor(self, task_id: str) -> int | None:
        """The last ``seq`` sent of a followed task (None: not followed)."""
        follower = self._followers.get(task_id)
        return None if follower is None else follower.cursor

    def mark(self, task_id: str, ended: bool) -> None:
        """Events were appended past the cursor of a task (``ended``: the last was its
        terminal event)."""
        if ended:
            self._ended[task_id] = None
        elif task_id not in self._ended:
            self._ready[task_id] = None
        self._wake()

    def reply(self, text: str) -> None:
        """Queue a reply: it goes out before the next turn of any follower, and before
        the rest of an unbatched backlog being sent."""
        self._replies.append(text)
        self._wake()

    @property
    def pending_replies(self) -> int:
        return len(self._replies)

    def give_up(self) -> None:
        """The client fell too far behind: stop (4008) after the message in flight."""
        self.too_slow = True
        self._wake()

    def restart(self) -> None:
        """Stop (1012) once nothing is ready to send."""
        self.restarting = True
        self._wake()

    # -- the steps ------------------------------------------------------------------------

    def next_step(self) -> Step:
        """The next I/O to do. Raises RuntimeError while a step's outcome is due."""
        if self._due is not None:
            raise RuntimeError(f"the outcome of a {self._due.__name__} step is due")
        step = self._step()
        if isinstance(step, Send | ReadLog | FindTask):
            self._due = type(step)
        return step

    def _step(self) -> Step:
        turn = self._turn
        if turn is not None:
            if turn.find:
                turn.find = False
                return FindTask(turn.task_id)
            return self._message(turn)
        while not self.too_slow:
            if self._replies:
                texts = tuple(self._replies)
                self._replies.clear()
                return Send(texts, replies=True)
            ready = self._next_ready()
            if ready is None:
                return Done() if self.restarting else Wait()
            task_id, ended = ready
            follower = self._followers.get(task_id)
            if follower is None:
                continue
            self._turn = _Turn(task_id, ended, follower)
            return ReadLog(task_id, follower.cursor, self._read_limit)
        return Done()

    def receive_events(self, events: Sequence[LogEvent]) -> None:
        """The outcome of ``ReadLog``: the events past the cursor, in seq order."""
        turn = self._outcome(ReadLog)
        if turn is None or not self._serving(turn):
            self._turn = None
            return
        turn.events = events
        # Nothing: has the log ended at the cursor? A full read: how far behind is it?
        turn.find = not events or len(events) == self._read_limit

    def receive_log_state(self, state: LogState | None) -> None:
        """The outcome of ``FindTask``: the task's log state (None: unknown or expired)."""
        turn = self._outcome(FindTask)
        assert turn is not None
        follower, task_id = turn.follower, turn.task_id
        if not turn.events:
            # Nothing past the cursor: if the log has ended there, nothing ever will be.
            if state is None or (not state.active and state.last_seq <= follower.cursor):
                if self._followers.get(task_id) is follower:
                    self.unfollow(task_id)
            self._turn = None
            return
        if not self._serving(turn):
            self._turn = None
            return
        if state is not None and state.active:
            if follower.live_from is None:
                follower.live_from = state.last_seq
            lag = state.last_seq - max(follower.cursor, follower.live_from)
            if lag > self._max_lag_events:
                self._turn = None
                self.give_up()
                return
        # More to come, after other tasks have had a turn (an ended log stays ahead).
        (self._ended if turn.ended else self._ready)[task_id] = None

    def sent(self) -> None:
        """The outcome of ``Send``: every text of it went out."""
        turn = self._outcome(Send)
        if turn is None:  # replies
            return
        follower, task_id, events = turn.follower, turn.task_id, turn.events
        if self.batch:
            follower.cursor = events[-1].seq
        else:
            event = events[turn.sending]
            follower.cursor = event.seq
            if event.seq != events[-1].seq:
                if not self._serving(turn):
                    self._turn = None
                    return
                # One event per message costs a frame each, and a frame costs the
                # scheduler turns of hypercorn's send path; under load a backlog of frames
                # takes a while. So unless this task's log has ended, the backlog yields to
                # a reply or an ended task that came meanwhile, and its rest goes out after
                # them.
                if not turn.ended and (self._replies or self._ended):
                    self._ready[task_id] = None
                    self._turn = None
                    return
                turn.sending += 1
                return
        self._turn = None
        if events[-1].terminal and self._followers.get(task_id) is follower:
            self.unfollow(task_id)

    def abandon(self) -> None:
        """The step in flight failed (a bug or a backend failure). In a follower's turn
        that costs the follower, not the connection: it is unfollowed."""
        self._due = None
        turn, self._turn = self._turn, None
        if turn is not None:
            self.unfollow(turn.task_id)

    @property
    def delivering(self) -> str | None:
        """The task whose turn is under way, if any (for the caller's log lines)."""
        return None if self._turn is None else self._turn.task_id

    # -- internals ------------------------------------------------------------------------

    def _message(self, turn: _Turn) -> Send:
        """The next message of a turn whose events are read. A follower that was replaced
        or dropped meanwhile (resubscribe, unsubscribe, the client too slow) gets no more:
        each outcome but that of the last send checks that it is still served."""
        if self.batch:
            return Send(
                ('{"type":"events","events":[' + ",".join(e.json for e in turn.events) + "]}",),
                replies=False,
            )
        return Send(
            ('{"type":"event","event":' + turn.events[turn.sending].json + "}",), replies=False
        )

    def _outcome(self, step: type[Send] | type[ReadLog] | type[FindTask]) -> _Turn | None:
        """The turn an outcome belongs to (None: replies), checking that it is the one due."""
        if self._due is not step:
            raise RuntimeError(f"no {step.__name__} step is in flight")
        self._due = None
        return self._turn

    def _serving(self, turn: _Turn) -> bool:
        return not self.too_slow and self._followers.get(turn.task_id) is turn.follower

    def _next_ready(self) -> tuple[str, bool] | None:
        """The next task to serve, and whether its log has just ended."""
        for queue, ended in ((self._ended, True), (self._ready, False)):
            if queue:
                task_id = next(iter(queue))
                del queue[task_id]
                return task_id, ended
        return None
