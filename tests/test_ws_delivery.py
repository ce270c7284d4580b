"""The ``/ws`` delivery scheduler without sockets: what a connection sends next, and when.

``Delivery`` does no I/O, so most tests here drive it by hand against logs held in lists:
each ``ReadLog`` and ``FindTask`` step is answered from them, each ``Send`` is recorded.
The watchdog tests run the real writer (``WsWriter``) and ``WsHub`` on trio's
``MockClock`` with a socket whose sends take as long as a test says.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest
import trio
import trio.testing
from trio.testing import MockClock

from server.api.ws import WsHub, WsWriter
from server.api.ws_delivery import (
    Delivery,
    Done,
    FindTask,
    LogState,
    ReadLog,
    Send,
    Wait,
)


@dataclass(frozen=True)
class Ev:
    """An event as the scheduler sees one: ``seq``, ``terminal``, ``json`` (and ``type``)."""

    task_id: str
    seq: int
    type: str = "delta"

    @property
    def terminal(self) -> bool:
        return self.type == "task:completed"

    @property
    def json(self) -> str:
        return json.dumps({"task_id": self.task_id, "seq": self.seq, "type": self.type})


@dataclass
class Log:
    """One task's log: its events, and whether it can still grow."""

    task_id: str
    events: list[Ev] = field(default_factory=list)
    active: bool = True

    def append(self, count: int, *, end: bool = False) -> None:
        for _ in range(count):
            self.events.append(Ev(self.task_id, len(self.events) + 1))
        if end:
            self.events.append(Ev(self.task_id, len(self.events) + 1, "task:completed"))
            self.active = False

    def read(self, after: int, limit: int | None) -> list[Ev]:
        return self.events[after : None if limit is None else after + limit]

    def state(self) -> LogState:
        return LogState(self.active, len(self.events))


@dataclass(eq=False)
class Watch:
    closed: bool = False

    def close(self) -> None:
        self.closed = True


def make_log(task_id: str, count: int, *, end: bool = False) -> Log:
    log = Log(task_id)
    log.append(count, end=end)
    return log


def delivery(
    *,
    batch: bool = False,
    max_lag: int = 10_000,
    read_limit: int = 256,
    wake: Callable[[], None] = lambda: None,
) -> Delivery:
    return Delivery(batch=batch, max_lag_events=max_lag, wake=wake, read_limit=read_limit)


def drive(
    scheduler: Delivery, logs: dict[str, Log], during_send: Callable[[int], None] | None = None
) -> list[dict[str, Any]]:
    """Do the steps the scheduler asks for until it waits or is done; the messages sent,
    decoded. ``during_send(n)`` runs while the n-th message (from 0) is in flight."""
    sent: list[dict[str, Any]] = []
    while True:
        match scheduler.next_step():
            case Wait() | Done():
                return sent
            case Send(texts=texts):
                for text in texts:
                    if during_send is not None:
                        during_send(len(sent))
                    sent.append(json.loads(text))
                scheduler.sent()
            case ReadLog(task_id=task_id, after=after, limit=limit):
                scheduler.receive_events(logs[task_id].read(after, limit))
            case FindTask(task_id=task_id):
                log = logs.get(task_id)
                scheduler.receive_log_state(None if log is None else log.state())


def events_of(sent: Sequence[dict[str, Any]]) -> list[tuple[str, int]]:
    """(task_id, seq) of every event sent, in order, batches flattened."""
    flat: list[tuple[str, int]] = []
    for message in sent:
        if message["type"] == "event":
            flat.append((message["event"]["task_id"], message["event"]["seq"]))
        elif message["type"] == "events":
            flat.extend((e["task_id"], e["seq"]) for e in message["events"])
    return flat


def kinds(sent: Sequence[dict[str, Any]]) -> list[str]:
    """Each message's type, events as ``task_id:seq`` (batches as their first seq)."""
    out = []
    for message in sent:
        if message["type"] == "event":
            out.append(f"{message['event']['task_id']}:{message['event']['seq']}")
        elif message["type"] == "events":
            first = message["events"][0]
            out.append(f"{first['task_id']}:{first['seq']}+")
        else:
            out.append(message["type"])
    return out


# -- order ----------------------------------------------------------------------------------


def test_replies_go_out_before_events_already_ready() -> None:
    scheduler = delivery()
    scheduler.follow("a", 0, Watch())
    scheduler.reply('{"type":"pong"}')
    sent = drive(scheduler, {"a": make_log("a", 3)})
    assert kinds(sent) == ["pong", "a:1", "a:2", "a:3"]


def test_ended_task_is_served_before_other_backlogs() -> None:
    logs = {"a": make_log("a", 5), "b": make_log("b", 2, end=True)}
    scheduler = delivery()
    scheduler.follow("a", 0, Watch())
    scheduler.follow("b", 0, Watch())
    scheduler.mark("b", True)  # b's terminal event was appended
    sent = drive(scheduler, logs)
    assert events_of(sent)[:3] == [("b", 1), ("b", 2), ("b", 3)]
    assert events_of(sent)[3:] == [("a", s) for s in range(1, 6)]


def test_backlog_being_sent_yields_to_a_task_that_ends_meanwhile() -> None:
    logs = {"a": make_log("a", 6), "b": make_log("b", 1)}
    scheduler = delivery()
    scheduler.follow("a", 0, Watch())

    def b_ends(n: int) -> None:
        if n == 1:  # while a:2 is in flight
            scheduler.follow("b", 1, Watch())
            logs["b"].append(0, end=True)
            scheduler.mark("b", True)

    sent = drive(scheduler, logs, during_send=b_ends)
    assert kinds(sent) == ["a:1", "a:2", "b:2", "a:3", "a:4", "a:5", "a:6"]


def test_an_ended_tasks_own_backlog_does_not_yield_to_another_ended_task() -> None:
    logs = {"a": make_log("a", 3, end=True), "b": make_log("b", 0, end=True)}
    scheduler = delivery()
    scheduler.follow("a", 0, Watch())
    scheduler.mark("a", True)

    def b_ends(n: int) -> None:
        if n == 0:
            scheduler.follow("b", 0, Watch())
            scheduler.mark("b", True)

    sent = drive(scheduler, logs, during_send=b_ends)
    assert kinds(sent) == ["a:1", "a:2", "a:3", "a:4", "b:1"]


def test_events_of_a_task_go_out_in_seq_order_across_reads() -> None:
    log = make_log("a", 10, end=True)
    scheduler = delivery(read_limit=3)
    scheduler.follow("a", 0, Watch())
    sent = drive(scheduler, {"a": log})
    assert events_of(sent) == [("a", s) for s in range(1, 12)]


def test_tasks_that_became_ready_are_served_in_that_order() -> None:
    logs = {t: make_log(t, 1) for t in "cab"}
    scheduler = delivery()
    for task_id in "cab":
        scheduler.follow(task_id, 0, Watch())
    assert [t for t, _ in events_of(drive(scheduler, logs))] == ["c", "a", "b"]


def test_a_reply_queued_during_a_send_goes_out_before_the_backlogs_rest() -> None:
    scheduler = delivery()
    scheduler.follow("a", 0, Watch())

    def ping(n: int) -> None:
        if n == 0:
            scheduler.reply('{"type":"pong"}')

    sent = drive(scheduler, {"a": make_log("a", 4)}, during_send=ping)
    assert kinds(sent) == ["a:1", "pong", "a:2", "a:3", "a:4"]


# -- batching -------------------------------------------------------------------------------


def test_batched_connection_sends_one_events_message_per_read() -> None:
    log = make_log("a", 2)
    scheduler = delivery(batch=True)
    scheduler.follow("a", 0, Watch())
    step = scheduler.next_step()
    assert step == ReadLog("a", 0, 256)
    scheduler.receive_events(log.read(0, 256))
    step = scheduler.next_step()
    assert step == Send(
        ('{"type":"events","events":[' + log.events[0].json + "," + log.events[1].json + "]}",),
        replies=False,
    )
    scheduler.sent()
    assert scheduler.cursor("a") == 2
    assert scheduler.next_step() == Wait()


def test_unbatched_connection_sends_one_event_message_per_event() -> None:
    log = make_log("a", 2)
    scheduler = delivery(batch=False)
    scheduler.follow("a", 0, Watch())
    assert scheduler.next_step() == ReadLog("a", 0, 256)
    scheduler.receive_events(log.read(0, 256))
    texts: list[str] = []
    for _ in range(2):
        step = scheduler.next_step()
        assert isinstance(step, Send) and not step.replies
        texts.extend(step.texts)
        scheduler.sent()
    assert texts == ['{"type":"event","event":' + e.json + "}" for e in log.events]
    assert scheduler.next_step() == Wait()


def test_batched_backlog_longer_than_the_read_limit_goes_out_in_reads_of_the_limit() -> None:
    scheduler = delivery(batch=True, read_limit=4)
    scheduler.follow("a", 0, Watch())
    sent = drive(scheduler, {"a": make_log("a", 9, end=True)})
    assert [len(m["events"]) for m in sent] == [4, 4, 2]
    assert events_of(sent) == [("a", s) for s in range(1, 11)]


def test_backlog_longer_than_the_read_limit_yields_to_a_reply() -> None:
    scheduler = delivery(batch=True, read_limit=4)
    scheduler.follow("a", 0, Watch())

    def ping(n: int) -> None:
        if n == 0:
            scheduler.reply('{"type":"pong"}')

    sent = drive(scheduler, {"a": make_log("a", 9, end=True)}, during_send=ping)
    assert kinds(sent) == ["a:1+", "pong", "a:5+", "a:9+"]


# -- followers ------------------------------------------------------------------------------


def test_follower_is_unfollowed_once_its_terminal_event_is_sent() -> None:
    watch = Watch()
    scheduler = delivery()
    scheduler.follow("a", 0, watch)
    drive(scheduler, {"a": make_log("a", 2, end=True)})
    assert not scheduler.is_following("a") and watch.closed


def test_follower_of_a_running_task_stays_after_its_backlog() -> None:
    watch = Watch()
    scheduler = delivery()
    scheduler.follow("a", 0, watch)
    drive(scheduler, {"a": make_log("a", 2)})
    assert scheduler.is_following("a") and not watch.closed
    assert scheduler.cursor("a") == 2


def test_follower_at_the_end_of_an_ended_log_lets_go() -> None:
    watch = Watch()
    scheduler = delivery()
    scheduler.follow("a", 3, watch)
    assert drive(scheduler, {"a": make_log("a", 2, end=True)}) == []
    assert not scheduler.is_following("a") and watch.closed


def test_follower_of_an_expired_task_lets_go() -> None:
    scheduler = delivery()
    scheduler.follow("gone", 0, Watch())
    assert scheduler.next_step() == ReadLog("gone", 0, 256)
    scheduler.receive_events([])
    assert scheduler.next_step() == FindTask("gone")
    scheduler.receive_log_state(None)
    assert not scheduler.is_following("gone")


def test_replaced_follower_gets_nothing_more_from_the_old_cursor() -> None:
    log = make_log("a", 10)
    old_watch = Watch()
    scheduler = delivery()
    scheduler.follow("a", 0, old_watch)
    assert scheduler.next_step() == ReadLog("a", 0, 256)
    scheduler.follow("a", 7, Watch())  # resubscribe while the old read is in flight
    scheduler.receive_events(log.read(0, 256))
    sent = drive(scheduler, {"a": log})
    assert events_of(sent) == [("a", 8), ("a", 9), ("a", 10)]
    assert old_watch.closed


def test_replaced_follower_stops_in_the_middle_of_its_backlog() -> None:
    log = make_log("a", 5)
    scheduler = delivery()
    scheduler.follow("a", 0, Watch())

    def resubscribe(n: int) -> None:
        if n == 1:
            scheduler.follow("a", 4, Watch())

    sent = drive(scheduler, {"a": log}, during_send=resubscribe)
    assert kinds(sent) == ["a:1", "a:2", "a:5"]


def test_unfollowed_task_gets_nothing_more() -> None:
    scheduler = delivery()
    scheduler.follow("a", 0, Watch())
    scheduler.follow("b", 0, Watch())
    assert scheduler.unfollow("a")
    assert events_of(drive(scheduler, {"a": make_log("a", 3), "b": make_log("b", 1)})) == [("b", 1)]


def test_a_failed_step_costs_its_follower_and_not_the_others() -> None:
    watch = Watch()
    scheduler = delivery()
    scheduler.follow("a", 0, watch)
    scheduler.follow("b", 0, Watch())
    assert scheduler.next_step() == ReadLog("a", 0, 256)
    scheduler.abandon()  # the read raised
    assert watch.closed and not scheduler.is_following("a")
    assert events_of(drive(scheduler, {"b": make_log("b", 2)})) == [("b", 1), ("b", 2)]


# -- slow readers ---------------------------------------------------------------------------


def test_follower_more_than_the_max_lag_behind_a_live_task_gives_up() -> None:
    log = make_log("a", 8)
    scheduler = delivery(read_limit=4, max_lag=5)
    scheduler.follow("a", 0, Watch())

    def task_runs_ahead(n: int) -> None:
        if n == 0:
            log.append(10)  # the task ran 10 events ahead while the client read one

    sent = drive(scheduler, {"a": log}, during_send=task_runs_ahead)
    assert scheduler.too_slow
    assert scheduler.next_step() == Done()
    # The first read was within the lag; the second found the task 18 - 8 = 10 ahead.
    assert events_of(sent) == [("a", s) for s in range(1, 5)]


def test_follower_within_the_max_lag_keeps_up() -> None:
    log = make_log("a", 8)
    scheduler = delivery(read_limit=4, max_lag=10)
    scheduler.follow("a", 0, Watch())

    def task_runs_ahead(n: int) -> None:
        if n == 0:
            log.append(10)

    sent = drive(scheduler, {"a": log}, during_send=task_runs_ahead)
    assert not scheduler.too_slow
    assert events_of(sent) == [("a", s) for s in range(1, 19)]


def test_replaying_an_ended_log_longer_than_the_max_lag_is_not_too_slow() -> None:
    scheduler = delivery(read_limit=4, max_lag=2)
    scheduler.follow("a", 0, Watch())
    sent = drive(scheduler, {"a": make_log("a", 30, end=True)})
    assert not scheduler.too_slow
    assert events_of(sent) == [("a", s) for s in range(1, 32)]


def test_replaying_a_live_tasks_long_log_is_not_too_slow() -> None:
    """The lag counts from the log's length at the first full read: a long replay of a
    task still running is not falling behind."""
    scheduler = delivery(read_limit=4, max_lag=2)
    scheduler.follow("a", 0, Watch())
    sent = drive(scheduler, {"a": make_log("a", 30)})
    assert not scheduler.too_slow
    assert len(events_of(sent)) == 30


def test_giving_up_stops_after_the_message_in_flight() -> None:
    scheduler = delivery()
    scheduler.follow("a", 0, Watch())

    def too_slow(n: int) -> None:
        if n == 1:
            scheduler.give_up()

    sent = drive(scheduler, {"a": make_log("a", 5)}, during_send=too_slow)
    assert kinds(sent) == ["a:1", "a:2"]
    assert scheduler.next_step() == Done()


def test_restart_sends_what_is_ready_then_is_done() -> None:
    scheduler = delivery()
    scheduler.follow("a", 0, Watch())
    scheduler.restart()
    sent = drive(scheduler, {"a": make_log("a", 1, end=True)})
    assert events_of(sent) == [("a", 1), ("a", 2)]
    assert scheduler.next_step() == Done()


# -- the caller's side of the contract ------------------------------------------------------


def test_every_input_that_makes_work_wakes_the_writer() -> None:
    wakes: list[str] = []
    scheduler = delivery(wake=lambda: wakes.append("wake"))
    scheduler.follow("a", 0, Watch())
    scheduler.mark("a", False)
    scheduler.reply("{}")
    scheduler.give_up()
    scheduler.restart()
    assert len(wakes) == 5


def test_the_next_step_waits_for_the_outcome_of_the_last() -> None:
    scheduler = delivery()
    scheduler.follow("a", 0, Watch())
    assert isinstance(scheduler.next_step(), ReadLog)
    with pytest.raises(RuntimeError):
        scheduler.next_step()
    with pytest.raises(RuntimeError):
        scheduler.sent()


# -- the writer and the watchdog, on a mock clock ------------------------------------------


class SlowSocket:
    """A client whose every receive takes ``send_s`` seconds (of the mock clock)."""

    def __init__(self, send_s: float, expect: int) -> None:
        self.send_s = send_s
        self.texts: list[str] = []
        self.expected = trio.Event()
        self._expect = expect

    async def send(self, text: str) -> None:
        await trio.sleep(self.send_s)
        self.texts.append(text)
        if len(self.texts) == self._expect:
            self.expected.set()


class MemoryLogs:
    def __init__(self, *logs: Log) -> None:
        self.logs = {log.task_id: log for log in logs}

    async def read(self, task_id: str, after: int, limit: int | None = None) -> list[Ev]:
        await trio.lowlevel.checkpoint()
        return self.logs[task_id].read(after, limit)

    async def get(self, task_id: str) -> LogState | None:
        await trio.lowlevel.checkpoint()
        log = self.logs.get(task_id)
        return None if log is None else log.state()


async def test_watchdog_gives_up_on_a_send_stuck_past_the_timeout(
    autojump_clock: MockClock,
) -> None:
    socket = SlowSocket(send_s=60, expect=1)
    writer = WsWriter(socket, MemoryLogs(make_log("a", 3)), batch=False, max_lag_events=100)
    hub = WsHub(send_timeout_s=5)
    hub.writers.add(writer)
    writer.delivery.follow("a", 0, Watch())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        with trio.fail_after(600):
            await writer.run()  # returns: the watchdog gave up on the connection
        nursery.cancel_scope.cancel()
    assert writer.too_slow
    # The stuck message was finished, never cut, and nothing was sent after it.
    assert len(socket.texts) == 1 and trio.current_time() >= 60


async def test_watchdog_leaves_slow_but_moving_sends_alone(autojump_clock: MockClock) -> None:
    socket = SlowSocket(send_s=4, expect=4)  # 16 s in all, each send under the 5 s limit
    writer = WsWriter(socket, MemoryLogs(make_log("a", 4)), batch=False, max_lag_events=100)
    hub = WsHub(send_timeout_s=5)
    hub.writers.add(writer)
    writer.delivery.follow("a", 0, Watch())
    async with trio.open_nursery() as nursery:
        nursery.start_soon(hub.run)
        nursery.start_soon(writer.run)
        with trio.fail_after(600):
            await socket.expected.wait()
        nursery.cancel_scope.cancel()
    assert not writer.too_slow
    assert [json.loads(t)["event"]["seq"] for t in socket.texts] == [1, 2, 3, 4]
    assert trio.current_time() >= 16


async def test_writer_wakes_for_a_task_followed_while_it_waits() -> None:
    socket = SlowSocket(send_s=0, expect=2)
    writer = WsWriter(socket, MemoryLogs(make_log("a", 2)), batch=False, max_lag_events=100)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(writer.run)
        await trio.testing.wait_all_tasks_blocked()  # the writer found nothing: it waits
        assert socket.texts == []
        writer.delivery.follow("a", 0, Watch())
        await socket.expected.wait()
        nursery.cancel_scope.cancel()
    assert [json.loads(t)["event"]["seq"] for t in socket.texts] == [1, 2]


async def test_restarting_writer_finishes_its_backlog_and_returns(
    autojump_clock: MockClock,
) -> None:
    socket = SlowSocket(send_s=1, expect=3)
    writer = WsWriter(
        socket, MemoryLogs(make_log("a", 2, end=True)), batch=False, max_lag_events=100
    )
    hub = WsHub(send_timeout_s=5)
    hub.writers.add(writer)
    writer.delivery.follow("a", 0, Watch())
    hub.close_all()
    with trio.fail_after(60):
        await writer.run()
    assert writer.restarting and not writer.too_slow
    assert len(socket.texts) == 3
