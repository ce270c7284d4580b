"""Memory on Redis per retained task: ``MEMORY USAGE`` of each of its keys.

``python -m bench.redis_memory``: a real ``redis-server`` (the test dependencies' one, or
``TETHER_TEST_REDIS_SERVER``) on a loopback port, and the Redis task backend writing, with
its own scripts, ``--tasks`` tasks as a web-search answer writes them: ``task:started``, the
search's status events, five cited sources, a 500-token answer (one delta a token) and the
terminal event. Each task's keys are measured once it has ended (``MEMORY USAGE ... SAMPLES
0``, exact), and the indexes a task has an entry in (its user's tasks, the retained tasks)
are measured whole and divided by the tasks. Writes ``bench/results/redis-memory.md``.
"""

from __future__ import annotations

import argparse
import platform
import secrets
import statistics
from pathlib import Path

import coredis
import trio

from fakes.redis_server import RedisServer
from server.record import TaskRecord
from server.tasks.backend import Control, NoControl
from server.tasks.redis import RedisBackend, redis_backend

RESULTS = Path(__file__).resolve().parent / "results" / "redis-memory.md"
TOKENS = 500
SOURCES = 5
# Tokens as a model streams them: a word or a piece of one, with its space.
WORDS = ("The", " server", " runs", " every", " request", " as", " a", " task", ",", " and")


async def write_task(backend: RedisBackend, user: str) -> TaskRecord:
    """One answer with web search and sources, written as the task manager writes it."""
    record = TaskRecord(
        id="task_" + secrets.token_hex(8),
        user=user,
        model="fake-model",
        mode="background",
        chat_id="chat_" + secrets.token_hex(4),
        message_id="msg_" + secrets.token_hex(4),
    )
    assert await backend.admission.reserve(record, max_total=10_000, max_per_user=10_000)
    store = backend.store
    await store.create(record)
    record.status, record.phase = "running", "web_search"
    await store.save(record)
    await store.append(record, "task:started", {})
    urls = [f"https://docs.example.org/guide/page-{i}.html" for i in range(SOURCES)]
    await store.append(
        record,
        "status",
        {
            "phase": "web_search",
            "action": "queries",
            "description": "Searching for 2 queries",
            "done": True,
            "queries": ["tether structured concurrency", "tether cancel web search"],
            "step": "web_search",
        },
    )
    for url in urls:
        step = {"phase": "web_search", "action": "fetch", "url": url, "step": f"page:{url}"}
        await store.append(record, "status", {**step, "description": "Reading", "done": False})
        await store.append(record, "status", {**step, "description": "Read", "done": True})
    for i, url in enumerate(urls, 1):
        snippet = "A task's work runs inside its cancel scope; a stop closes every connection. "
        source = {"index": i, "url": url, "title": f"Guide, page {i}", "snippet": snippet * 3}
        await store.append(record, "source", source)
        record.sources.append(source)  # the task's emitter keeps its record so
    record.phase = "generating"
    await store.save(record)
    for i in range(TOKENS):
        await store.append(record, "delta", {"content": WORDS[i % len(WORDS)]})
        record.content += WORDS[i % len(WORDS)]
    record.status, record.phase, record.finish_reason = "completed", "done", "stop"
    record.usage = {"prompt_tokens": 900, "completion_tokens": TOKENS, "total_tokens": 1400}
    assert await store.finish(record) is not None
    return record


async def measure(tasks: int) -> str:
    server = RedisServer()
    server.start()
    try:
        prefix = "m" + secrets.token_hex(4)
        backend = redis_backend(server.url, prefix=prefix)
        raw = coredis.Redis.from_url(server.url, decode_responses=True)
        done = trio.Event()
        control: Control = NoControl()
        per_key: dict[str, list[int]] = {}
        async with raw, trio.open_nursery() as nursery:
            await nursery.start(backend.cluster.serve, control, done)
            records = [await write_task(backend, "user-1") for _ in range(tasks)]
            for record in records:
                keys = backend.store._keys.task(record.id)
                for name in ("rec", "log", "content", "reasoning", "sources"):
                    used = await raw.memory_usage(getattr(keys, name), samples=0)
                    per_key.setdefault(name, []).append(used or 0)
            indexes = {
                "user's tasks (share)": f"{prefix}:{{adm}}:tasks:user-1",
                "retained tasks (share)": f"{prefix}:{{adm}}:ended",
            }
            for name, key in indexes.items():
                per_key[name] = [round((await raw.memory_usage(key, samples=0) or 0) / tasks)]
            events = await backend.store.read(records[0].id, 0)
            version = str((await raw.info("server"))["redis_version"])
            done.set()
        return report(per_key, tasks, len(events), len(records[0].content), version)
    finally:
        server.stop()


def report(per_key: dict[str, list[int]], tasks: int, events: int, chars: int, version: str) -> str:
    rows = [(name, int(statistics.median(sizes))) for name, sizes in per_key.items()]
    total = sum(size for _, size in rows)
    lines = [
        "# Redis memory per retained task",
        "",
        "`python -m bench.redis_memory` (bench/redis_memory.py): `MEMORY USAGE <key> SAMPLES 0`",
        f"of each key of an ended task, median of {tasks} tasks, on a real `redis-server`",
        f"{version} ({platform.machine()}, Python {platform.python_version()}). Each task is a",
        f"web-search answer as Tether writes it: {events} events (`task:started`, 11 status",
        f"events, {SOURCES} sources of about 230 characters each, {TOKENS} deltas of one token",
        f"each, the terminal event, which carries the whole record), an answer of {chars}",
        "characters. The indexes a task has an entry in are measured whole and divided by",
        "the tasks. `reasoning` is 0: the answer has none, and no key is made for it.",
        "",
        "| key | bytes |",
        "|---|---:|",
        *(f"| `{name}` | {size:,} |" for name, size in rows),
        f"| **all** | **{total:,}** |",
        "",
        f"About {total / 1024:.0f} KiB a task: at the default `TETHER_MAX_RETAINED_TASKS` "
        f"(20,000), {total * 20_000 / 2**20:,.0f} MiB at most for the retained tasks.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=20)
    args = parser.parse_args()
    text = trio.run(measure, args.tasks)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
