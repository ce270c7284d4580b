"""``python -m bench --target URL [--api-key KEY] [--model NAME]``: the scenarios that need no
fake upstream, against any deployment (a ``tether serve``, a Tether behind nginx or a load
balancer, or another OpenAI-compatible server), each against a floor measured at the same
server in the same run (``bench.remote.pick_floor``).

For every target: time to first byte and to first token, streaming and sync. For a Tether
target (its ``/openapi.json`` is Tether's: titled ``Tether``, with the ``/api/tasks`` routes)
also: time to task id (a background POST), stop -> ``task:cancelled`` on the task's events
stream, resume (``/api/tasks/{id}/events?after=N``) -> its first event, and the load levels
(N streams at once: lag behind a lone stream, errors). A target that is not Tether gets
the scenarios that apply; the report lists the others, each with why it was skipped.
"""

from __future__ import annotations

import json
import random
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import trio

from bench.httpclient import HttpConnection, HttpError, sse_events
from bench.progress import Progress
from bench.remote import (
    ChatError,
    Endpoint,
    chat_body,
    first_token_rounds,
    first_token_rows,
    floor_sample,
    listener_pid,
    pick_floor,
    run_level,
)
from bench.results import Results
from bench.stats import Samples, interleaved_rounds, ratio

SCENARIO = "target"
# What is asked: short, so that the first-token samples measure the server, not a long answer.
PROMPT = "What is Tether?"
# The levels' streams should last a few seconds: `local` answers with the question in it
# (at 40 tokens/s by default), and a real model asked this repeats the words.
LEVEL_PROMPT = "Repeat these words: " + " ".join(f"w{i}" for i in range(120))
TERMINAL = ("task:completed", "task:cancelled", "task:failed")
SKIP_NOT_TETHER = (
    "not a Tether server (its /openapi.json is not Tether's): it has no task ids, stops or "
    "resumable event logs"
)
SKIP_LEVELS = (
    "load levels run only against a Tether target (whose `local` model costs nothing) or a "
    "peer in front of the bench's fake model: against another deployment each stream would "
    "spend its real model's tokens"
)


@dataclass(frozen=True)
class TargetConfig:
    """Sample counts of a ``--target`` run (quick / full)."""

    mode: str
    first_token_rounds: int = 100  # floor, streaming and sync chat per round
    ttid_rounds: int = 200  # floor and background POST per round
    stop_samples: int = 30
    resume_rounds: int = 100
    levels: tuple[int, ...] = (1, 10, 30, 100)  # streams at once
    level_timeout_s: float = 120.0


TARGET_QUICK = TargetConfig(
    mode="quick",
    first_token_rounds=30,
    ttid_rounds=50,
    stop_samples=10,
    resume_rounds=30,
    levels=(1, 10, 30),
)
TARGET_FULL = TargetConfig(mode="full")


async def is_tether(ep: Endpoint) -> bool:
    try:
        doc = await ep.get_json("/openapi.json")
    except (OSError, HttpError, ValueError, trio.BrokenResourceError):
        return False
    if not isinstance(doc, dict):
        return False
    title = str((doc.get("info") or {}).get("title", ""))
    paths = doc.get("paths") or {}
    return title == "Tether" and any(str(p).startswith("/api/tasks") for p in paths)


async def default_model(ep: Endpoint) -> str:
    """The first model of the target's ``/v1/models`` (Tether lists ``local`` first)."""
    try:
        listing = await ep.get_json("/v1/models")
        return str(listing["data"][0]["id"])
    except (OSError, HttpError, ValueError, KeyError, IndexError, TypeError) as exc:
        raise ChatError(f"no --model given and GET /v1/models gave none: {exc}") from exc


class TetherTasks:
    """Tether's own routes on one target: background chats, stops, event streams."""

    def __init__(self, ep: Endpoint, model: str) -> None:
        self.ep = ep
        self.model = model

    def background_body(self) -> dict[str, Any]:
        return chat_body(
            self.model,
            PROMPT,
            stream=False,
            background=True,
            chat_id="bench-target-" + uuid.uuid4().hex[:8],
        )

    async def start(self, conn: HttpConnection) -> tuple[str, float]:
        """A background chat: its task id and the time to the 202."""
        answer = await conn.request(
            "POST", self.ep.path("/api/chat/completions"), self.background_body(), self.headers
        )
        if answer.status != 202:
            raise ChatError(f"background chat: {answer.status}: {answer.body[:200]!r}")
        return str(answer.json()["task_id"]), answer.elapsed

    @property
    def headers(self) -> dict[str, str]:
        return self.ep.headers()

    async def stop(self, conn: HttpConnection, task_id: str) -> float:
        answer = await conn.request(
            "POST", self.ep.path(f"/api/tasks/{task_id}/stop"), {}, self.headers
        )
        if answer.status != 200:
            raise ChatError(f"stop: {answer.status}: {answer.body[:200]!r}")
        return answer.elapsed

    async def open_events(self, conn: HttpConnection, task_id: str, after: int) -> None:
        status, _ = await conn.open_stream(
            "GET", self.ep.path(f"/api/tasks/{task_id}/events?after={after}"), None, self.headers
        )
        if status != 200:
            raise ChatError(f"events of {task_id}: {status}")


OnRound = Callable[[int], None]


async def _time_to_task_id(
    tasks: TetherTasks, floor: str, cfg: TargetConfig, samples: Samples, on_round: OnRound
) -> None:
    conn, side = tasks.ep.conn(), tasks.ep.conn()

    floor_op = floor_sample(tasks.ep, conn, floor, samples, "ttid/floor")

    async def post_op() -> None:
        try:
            task_id, elapsed = await tasks.start(conn)
        except ChatError as exc:
            samples.fail("ttid/tether", str(exc))
            return
        samples.add("ttid/tether", elapsed)
        await tasks.stop(side, task_id)  # not timed: keeps the target's load flat

    try:
        await interleaved_rounds(
            [floor_op, post_op], cfg.ttid_rounds, random.Random(11), on_round=on_round
        )
    finally:
        await conn.aclose()
        await side.aclose()


async def _stop_one(tasks: TetherTasks, control: HttpConnection, samples: Samples) -> None:
    """A background chat followed on its events stream; once its first ``delta`` has
    arrived, a stop: timed to its answer and to ``task:cancelled`` on the stream."""
    task_id, _ = await tasks.start(control)
    events = tasks.ep.conn()
    stop_sent = 0.0
    try:
        await tasks.open_events(events, task_id, 0)
        async for at, data in sse_events(events):
            if data.startswith(":"):
                continue
            event = json.loads(data)
            kind = event.get("type")
            if kind == "delta" and not stop_sent:
                stop_sent = time.monotonic()
                samples.add("stop/answer", await tasks.stop(control, task_id))
            elif kind in TERMINAL:
                if kind == "task:cancelled" and stop_sent:
                    samples.add("stop/cancelled", at - stop_sent)
                else:
                    samples.fail("stop/cancelled", f"ended {kind} before the stop")
                return
        samples.fail("stop/cancelled", "the events stream ended without a terminal event")
    finally:
        await events.aclose()


async def _stop(
    tasks: TetherTasks, floor: str, cfg: TargetConfig, samples: Samples, on_round: OnRound
) -> None:
    conn, control = tasks.ep.conn(), tasks.ep.conn()

    floor_op = floor_sample(tasks.ep, conn, floor, samples, "stop/floor")

    async def stop_op() -> None:
        try:
            with trio.fail_after(30):
                await _stop_one(tasks, control, samples)
        except (ChatError, OSError, HttpError, ValueError, trio.TooSlowError) as exc:
            samples.fail("stop/cancelled", f"{type(exc).__name__}: {exc}")
            control.abort()

    try:
        await interleaved_rounds(
            [floor_op, stop_op], cfg.stop_samples, random.Random(12), on_round=on_round
        )
    finally:
        await conn.aclose()
        await control.aclose()


async def _completed_task(tasks: TetherTasks) -> tuple[str, int]:
    """A task run to its end (a sync chat): its id and last ``seq``."""
    conn = tasks.ep.conn()
    try:
        answer = await conn.request(
            "POST",
            tasks.ep.path("/api/chat/completions"),
            chat_body(tasks.model, PROMPT, stream=False),
            tasks.headers,
        )
        if answer.status != 200:
            raise ChatError(f"sync chat: {answer.status}: {answer.body[:200]!r}")
        task_id = str(answer.json()["task_id"])
        task = await conn.request(
            "GET", tasks.ep.path(f"/api/tasks/{task_id}"), None, tasks.headers
        )
        return task_id, int(task.json()["last_seq"])
    finally:
        await conn.aclose()


async def _resume(
    tasks: TetherTasks, floor: str, cfg: TargetConfig, samples: Samples, on_round: OnRound
) -> None:
    """``GET /api/tasks/{id}/events?after=N`` of a completed task, N ten events before its
    end, timed to its first event (and read to its end), against the floor."""
    task_id, last_seq = await _completed_task(tasks)
    after = max(0, last_seq - 10)
    samples.values.setdefault("resume/meta", []).append(float(last_seq))
    conn = tasks.ep.conn()
    reader = tasks.ep.conn()

    floor_op = floor_sample(tasks.ep, conn, floor, samples, "resume/floor")

    async def resume_op() -> None:
        try:
            await tasks.open_events(reader, task_id, after)
            first: float | None = None
            seqs: list[int] = []
            async for at, data in sse_events(reader):
                if data.startswith(":"):
                    continue
                if first is None:
                    first = at - reader.last_sent_at
                seqs.append(int(json.loads(data)["seq"]))
            if first is None or seqs != list(range(after + 1, last_seq + 1)):
                samples.fail("resume/first", f"replayed seqs {seqs[:3]}... of {after + 1}..")
            else:
                samples.add("resume/first", first)
        except (ChatError, OSError, HttpError, ValueError) as exc:
            samples.fail("resume/first", f"{type(exc).__name__}: {exc}")
            reader.abort()

    try:
        await interleaved_rounds(
            [floor_op, resume_op], cfg.resume_rounds, random.Random(13), on_round=on_round
        )
    finally:
        await conn.aclose()
        await reader.aclose()


def _vs_floor(samples: Samples, label: str, key: str, floor_key: str) -> dict[str, Any]:
    s, f = samples.summary(key), samples.summary(floor_key)
    return {
        "measure": label,
        "n": s["n"],
        "failures": s["failures"],
        "failure_example": (samples.failures.get(key) or [None])[0],
        "p50": s["p50"],
        "p99": s["p99"],
        "floor_p50": f["p50"],
        "floor_p99": f["p99"],
        "ratio_p50": ratio(s["p50"], f["p50"]),
        "ratio_p99": ratio(s["p99"], f["p99"]),
    }


async def run_target(
    url: str,
    api_key: str | None,
    model: str | None,
    cfg: TargetConfig,
    progress: Progress,
    results: Results,
) -> None:
    """Every scenario that applies to the target, into ``results.figures["target"]``."""
    ep = Endpoint(url, api_key)
    fig: dict[str, Any] = {"url": url, "config": asdict(cfg), "skipped": [], "ran": []}
    results.figures[SCENARIO] = fig
    progress.section("target")
    floor, medians = await pick_floor(ep)
    fig["floor_candidates_ms"] = medians
    if floor is None:
        results.errors.append(f"{url}: none of {list(medians)} answered 200")
        return
    fig["floor"] = floor
    tether = await is_tether(ep)
    fig["kind"] = "tether" if tether else "other"
    fig["model"] = model = model or await default_model(ep)
    pid = listener_pid(ep.port) if ep.loopback else None
    fig["server_pid"] = pid
    progress.step(
        f"{url}: {'Tether' if tether else 'not Tether'}, floor {floor} "
        f"({medians[floor]} ms), model {model!r}"
    )

    progress.section("target: first byte and first token")
    samples = await first_token_rounds(
        {"target": (ep, floor, model)},
        lambda m, stream: chat_body(m, PROMPT, stream=stream),
        cfg.first_token_rounds,
        seed=10,
        on_round=partial(progress.bar, "rounds", total=cfg.first_token_rounds),
    )
    fig["first_token"] = first_token_rows(samples, "target")
    _record(results, samples, "first_token")
    fig["ran"].append("first_token")
    for row in fig["first_token"]:
        progress.step(f"{row['measure']}: p50 {row['p50']} ms, {row['ratio_p50']}x the floor")

    tether_rows: list[dict[str, Any]] = []
    fig["tether"] = tether_rows
    if not tether:
        for name in ("time_to_task_id", "stop", "resume"):
            fig["skipped"].append({"scenario": name, "reason": SKIP_NOT_TETHER})
        fig["skipped"].append({"scenario": "levels", "reason": SKIP_LEVELS})
        return
    tasks = TetherTasks(ep, model)
    samples = Samples()
    steps = (
        (
            "time_to_task_id",
            _time_to_task_id,
            "time to task id (background POST)",
            "ttid/tether",
            cfg.ttid_rounds,
        ),
        (
            "stop",
            _stop,
            "stop -> task:cancelled on the events stream",
            "stop/cancelled",
            cfg.stop_samples,
        ),
        (
            "resume",
            _resume,
            "resume (events?after=last-10) -> first event",
            "resume/first",
            cfg.resume_rounds,
        ),
    )
    for name, step, label, key, rounds in steps:
        progress.section(f"target: {name}")
        try:
            await step(tasks, floor, cfg, samples, partial(progress.bar, "rounds", total=rounds))
        except (ChatError, OSError, HttpError, ValueError, KeyError) as exc:
            results.errors.append(f"target {name}: {type(exc).__name__}: {exc}")
            continue
        fig["ran"].append(name)
        row = _vs_floor(samples, label, key, key.split("/")[0] + "/floor")
        tether_rows.append(row)
        if name == "stop":
            tether_rows.append(
                _vs_floor(samples, "stop -> its answer (200)", "stop/answer", "stop/floor")
            )
        progress.step(f"{label}: p50 {row['p50']} ms, {row['ratio_p50']}x the floor")
    _record(results, samples, "tether")

    progress.section("target: levels")
    fig["levels"] = await run_levels(ep, model, cfg, [pid] if pid else [], progress)
    fig["ran"].append("levels")


async def run_levels(
    ep: Endpoint,
    model: str,
    cfg: TargetConfig,
    cpu_pids: list[int],
    progress: Progress,
) -> list[dict[str, Any]]:
    """Each level of ``cfg.levels`` (level 1 first: its lone stream is the profile)."""
    rows: list[dict[str, Any]] = []
    profile = None
    request = chat_body(model, LEVEL_PROMPT, stream=True, stream_options={"include_usage": True})
    for streams in cfg.levels:
        level = await run_level(
            ep,
            lambda: dict(request),
            streams,
            profile,
            cpu_pids,
            cfg.level_timeout_s,
        )
        profile = profile or level.profile
        row = level.row()
        rows.append(row)
        progress.step(
            f"{streams:>4} streams: {row['completed']} completed, {row['errors']} errors, "
            f"lag p99 {row['lag_p99']} ms, first token p99 {row['ttft_p99']} ms"
            + (f", {row['cpu_us_per_token']} µs CPU/token" if row["cpu_us_per_token"] else "")
        )
    return rows


def _record(results: Results, samples: Samples, prefix: str) -> None:
    for key, values in sorted(samples.values.items()):
        if not key.endswith("/meta"):
            results.add_set(SCENARIO, f"{prefix}/{key}", values)
    for key, fails in samples.failures.items():
        results.notes.append(f"target {key}: {len(fails)} failed, e.g. {fails[0][:200]}")
