"""The keys of a task space in Redis, and how records and events are written in them.

Layout (``P`` is ``TETHER_REDIS_PREFIX``). Each task's keys share the hash tag ``{<id>}``,
so that the scripts that touch them are cluster-safe:

- ``P:{id}:rec``: the record, a hash of JSON values (``STORED_FIELDS``), plus ``owner``
  (the replica that runs it) and ``closed`` (set with the terminal event);
- ``P:{id}:log``: the event log, a stream whose entry ids are ``0-<seq>``: ``seq`` is the
  public cursor and the stream id at once, and an explicit id makes a doubled write fail;
- ``P:{id}:content``, ``P:{id}:reasoning`` (strings, APPENDed) and ``P:{id}:sources`` (a
  list): the fields the events carry (``LOGGED``), kept in step with the log by the append
  script.

Admission is global: ``P:{adm}:counts`` holds the active tasks in all and per user,
``P:{adm}:owned:<replica>`` the tasks each replica holds a place for (and whose),
``P:{adm}:tasks:<user>`` every task of a user (for listing: a sorted set scored by when
each task expires, a running one never; it expires with its last task, and entries past
their time are dropped as they are met), and ``P:{adm}:ended`` the retained tasks, scored
the same way (for ``TETHER_MAX_RETAINED_TASKS``). Replicas: ``P:replica:<id>`` lives
while its replica heartbeats; ``P:{adm}:replicas`` lists them; ``P:control:<replica>``
is each one's control stream. Sessions: ``P:session:<id>``.
"""

from __future__ import annotations

import binascii
from dataclasses import dataclass
from typing import Any, cast

from server import fastjson
from server.events import Event, EventType
from server.record import STORED_FIELDS, TaskRecord

SLOTS = 16384


def hash_slot(key: str) -> int:
    """The Redis Cluster slot of ``key``: CRC16 (the XMODEM variant, which is
    ``binascii.crc_hqx`` from 0) of its hash tag (what stands between the first ``{`` and
    the next ``}``, if that is not empty), else of the whole key, modulo 16384; as the
    Redis Cluster specification defines it."""
    data = key.encode()
    start = data.find(b"{")
    if start >= 0:
        end = data.find(b"}", start + 1)
        if end > start + 1:
            data = data[start + 1 : end]
    return binascii.crc_hqx(data, 0) % SLOTS


@dataclass(frozen=True, slots=True)
class TaskKeys:
    rec: str
    log: str
    content: str
    reasoning: str
    sources: str

    def all(self) -> list[str]:
        """Every key of the task, in the order the scripts take them."""
        return [self.rec, self.log, self.content, self.reasoning, self.sources]


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix

    def task(self, task_id: str) -> TaskKeys:
        tag = f"{self.prefix}:{{{task_id}}}"
        return TaskKeys(
            f"{tag}:rec", f"{tag}:log", f"{tag}:content", f"{tag}:reasoning", f"{tag}:sources"
        )

    def adm(self, name: str) -> str:
        return f"{self.prefix}:{{adm}}:{name}"

    def user_tasks(self, user: str = "") -> str:
        """The user's tasks (a sorted set scored by expiry); with no user, the prefix."""
        return self.adm(f"tasks:{user}")

    def heartbeat(self, replica: str) -> str:
        return f"{self.prefix}:replica:{replica}"

    def control(self, replica: str) -> str:
        return f"{self.prefix}:control:{replica}"

    def session(self, session_id: str) -> str:
        return f"{self.prefix}:session:{session_id}"


def encode_fields(record: TaskRecord, **extra: str) -> list[str]:
    """The record's stored fields as field/value pairs of its hash (JSON values)."""
    out: list[str] = []
    for name in STORED_FIELDS:
        out += [name, fastjson.dumps(getattr(record, name))]
    for name, value in extra.items():
        out += [name, value]
    return out


def decode_record(
    raw: dict[str, str], content: str | None, reasoning: str | None, sources: Any
) -> TaskRecord | None:
    """The record from its hash and its logged fields' keys; None if there is none."""
    if not raw or "id" not in raw:
        return None
    data = {name: fastjson.loads(raw[name]) for name in STORED_FIELDS if name in raw}
    data["content"] = content or ""
    data["reasoning"] = reasoning or ""
    data["sources"] = [fastjson.loads(s) for s in sources or ()]
    return TaskRecord.from_dict(data, session_bound=bool(data.get("session_bound")))


def decode_event(task_id: str, chat_id: str | None, message_id: str | None, entry: Any) -> Event:
    """An event from its log entry (``t``: type, ``d``: data; the id's sequence part is
    its seq)."""
    values = entry.field_values
    seq = int(str(entry.identifier).partition("-")[2])
    return Event(
        task_id, chat_id, message_id, seq, cast(EventType, values["t"]), fastjson.loads(values["d"])
    )
