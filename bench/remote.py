"""Measuring any OpenAI-compatible deployment over HTTP: the parts that ``--target`` and
``--peer`` share.

Every figure is taken against a floor measured at the same server in the same run,
interleaved with the samples: the cheapest route the server has (``/healthz``,
``/health``, ...: ``pick_floor``). The chat samples time, on one keep-alive connection each:

- *time to first byte*: from sending the request to the answer's status line and headers;
- *time to first token*: to the first content of the answer: the first SSE chunk with
  ``delta.content`` for a stream, the whole ``chat.completion`` for a sync request (its first
  token is only readable then).

A *level* is N streams sent at once; each streamed piece of content is timed on arrival and
set against a lone stream of the same answer at the same server (level 1, the floor): a
piece's *lag* is how much later, counted from sending its request, it arrives than the same
piece of the lone stream did (a wait for the first token counts). A level *holds* when
every stream ends without an error and the lag p99 is under ``LAG_HELD_MS``.
"""

from __future__ import annotations

import contextlib
import json
import random
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from bench.httpclient import HttpConnection, HttpError, sse_events
from bench.stats import Op, Samples, interleaved_rounds, percentile, ratio, summarize

# The floor candidates, in the order tried: Tether's and vLLM's health routes, LiteLLM's
# cheap liveness probe (its ``/health`` calls every model), then the model list.
FLOOR_CANDIDATES = (
    "/healthz",
    "/health/liveliness",
    "/health/liveness",
    "/health",
    "/v1/models",
)
LAG_HELD_MS = 100.0  # the scale scenario's bound for a level's event lag p99
CHAT_PATH = "/v1/chat/completions"


class ChatError(RuntimeError):
    pass


@dataclass(frozen=True)
class Endpoint:
    """A server to measure: its base URL (a path prefix is kept: a deployment behind a
    proxy at ``/llm/``) and the API key sent as ``Authorization: Bearer``."""

    url: str
    api_key: str | None = None

    @property
    def parts(self) -> urllib.parse.SplitResult:
        return urllib.parse.urlsplit(self.url)

    @property
    def host(self) -> str:
        return self.parts.hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        parts = self.parts
        return parts.port or (443 if parts.scheme == "https" else 80)

    @property
    def loopback(self) -> bool:
        return self.host in ("127.0.0.1", "localhost", "::1") or self.host.startswith("127.")

    def path(self, route: str) -> str:
        return self.parts.path.rstrip("/") + route

    def headers(self) -> dict[str, str]:
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def conn(self) -> HttpConnection:
        return HttpConnection(self.host, self.port, tls=self.parts.scheme == "https")

    async def get(self, conn: HttpConnection, route: str) -> tuple[int, float, bytes]:
        answer = await conn.request("GET", self.path(route), headers=self.headers())
        return answer.status, answer.elapsed, answer.body

    async def get_json(self, route: str) -> Any:
        conn = self.conn()
        try:
            answer = await conn.request("GET", self.path(route), headers=self.headers())
        finally:
            await conn.aclose()
        if answer.status != 200:
            raise HttpError(f"GET {route} -> {answer.status}: {answer.body[:200]!r}")
        return answer.json()

    async def post_json(self, conn: HttpConnection, route: str, body: Any) -> tuple[int, Any]:
        answer = await conn.request("POST", self.path(route), body, headers=self.headers())
        try:
            data = answer.json()
        except ValueError:
            data = None
        return answer.status, data


async def pick_floor(ep: Endpoint, tries: int = 5) -> tuple[str | None, dict[str, float]]:
    """The cheapest route of the server: the first of ``FLOOR_CANDIDATES`` that answers 200
    (None when none does), and every candidate's median of ``tries`` in ms (``-1`` for one
    that did not answer 200)."""
    medians: dict[str, float] = {}
    conn = ep.conn()
    try:
        for route in FLOOR_CANDIDATES:
            times: list[float] = []
            for _ in range(tries):
                try:
                    status, elapsed, _ = await ep.get(conn, route)
                except (OSError, HttpError, trio.BrokenResourceError) as exc:
                    raise ChatError(f"{ep.url}: GET {route} failed: {exc}") from exc
                if status != 200:
                    break
                times.append(elapsed)
            medians[route] = round(percentile(sorted(times), 50) * 1000, 3) if times else -1.0
    finally:
        await conn.aclose()
    # The first that answers, in the candidates' order (the timings, a few samples each,
    # are too noisy to choose between two cheap routes; they are reported).
    answering = [r for r, m in medians.items() if m >= 0]
    return (answering[0] if answering else None), medians


def chat_body(model: str, text: str, *, stream: bool, **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "stream": stream,
        **extra,
    }


@dataclass
class ChatTiming:
    sent_at: float
    first_byte: float  # the answer's head, seconds after sending
    first_token: float | None = None  # the first content, seconds after sending
    done: float = 0.0
    status: int = 0
    task_id: str | None = None  # a Tether stream's ``: task <id>`` comment
    pieces: list[tuple[float, int]] = field(default_factory=list)  # (arrival, content end)
    content: str = ""
    completion_tokens: int | None = None  # from ``usage``, where the server sends it


async def timed_chat(
    ep: Endpoint, conn: HttpConnection, body: dict[str, Any], *, keep_pieces: bool = False
) -> ChatTiming:
    """Send one chat and read its whole answer, timing its first byte and first token.
    Raises ``ChatError`` for an answer other than 200 or an error inside a stream."""
    status, _ = await conn.open_stream("POST", ep.path(CHAT_PATH), body, headers=ep.headers())
    sent_at = conn.last_sent_at
    timing = ChatTiming(sent_at, time.monotonic() - sent_at, status=status)
    if status != 200 or not body.get("stream"):
        chunks = [chunk async for chunk in conn.body_chunks()]
        timing.done = time.monotonic() - sent_at
        raw = b"".join(chunks)
        if status != 200:
            raise ChatError(f"{status}: {raw[:200]!r}")
        try:
            answer = json.loads(raw)
            timing.content = str(answer["choices"][0]["message"].get("content") or "")
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ChatError(f"not a chat.completion: {raw[:200]!r}") from exc
        timing.first_token = timing.done
        timing.task_id = answer.get("task_id") if isinstance(answer, dict) else None
        return timing
    async for at, data in sse_events(conn):
        if data.startswith(": task "):
            timing.task_id = data[len(": task ") :].strip()
            continue
        if data.startswith(":") or data == "[DONE]":
            continue
        try:
            chunk = json.loads(data)
        except ValueError as exc:
            raise ChatError(f"not JSON in the stream: {data[:200]!r}") from exc
        if "error" in chunk:
            raise ChatError(f"error in the stream: {str(chunk['error'])[:200]}")
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            timing.completion_tokens = usage["completion_tokens"]
        choices = chunk.get("choices") or []
        piece = (choices[0].get("delta") or {}).get("content") if choices else None
        if piece:
            if timing.first_token is None:
                timing.first_token = at - sent_at
            timing.content += piece
            if keep_pieces:
                timing.pieces.append((at, len(timing.content)))
    timing.done = time.monotonic() - sent_at
    if timing.first_token is None:
        raise ChatError("the stream ended without content")
    return timing


async def first_token_rounds(
    targets: dict[str, tuple[Endpoint, str, str]],
    make_body: Callable[[str, bool], dict[str, Any]],
    rounds: int,
    seed: int,
    on_round: Callable[[int], None] | None = None,
) -> Samples:
    """Per target (name -> endpoint, floor route, model): its floor, a streaming chat and a
    sync chat, every op of every target in a random order each round, each target on its own
    keep-alive connection. Keys: ``<name>/floor``, ``<name>/stream/ttfb``,
    ``<name>/stream/ttft``, ``<name>/sync/ttfb``, ``<name>/sync/ttft``."""
    samples = Samples()
    conns: list[HttpConnection] = []
    ops: list[Op] = []
    for name, (ep, floor, model) in targets.items():
        conn = ep.conn()
        conns.append(conn)
        ops.append(floor_sample(ep, conn, floor, samples, f"{name}/floor"))
        for stream in (True, False):
            ops.append(_chat_op(ep, conn, model, make_body, stream, samples, name))
    try:
        await interleaved_rounds(ops, 3, random.Random(seed))  # warm-up: connections, pools, caches
        samples.values.clear()
        samples.failures.clear()
        await interleaved_rounds(ops, rounds, random.Random(seed + 1), on_round=on_round)
    finally:
        for conn in conns:
            await conn.aclose()
    return samples


def floor_sample(ep: Endpoint, conn: HttpConnection, route: str, samples: Samples, key: str) -> Op:
    """An op that times one GET of the floor route into ``key``."""

    async def op() -> None:
        try:
            status, elapsed, _ = await ep.get(conn, route)
        except (OSError, HttpError, trio.BrokenResourceError) as exc:
            samples.fail(key, repr(exc))
            return
        if status == 200:
            samples.add(key, elapsed)
        else:
            samples.fail(key, str(status))

    return op


def _chat_op(
    ep: Endpoint,
    conn: HttpConnection,
    model: str,
    make_body: Callable[[str, bool], dict[str, Any]],
    stream: bool,
    samples: Samples,
    name: str,
) -> Op:
    mode = "stream" if stream else "sync"

    async def op() -> None:
        try:
            timing = await timed_chat(ep, conn, make_body(model, stream))
        except (ChatError, OSError, HttpError, trio.BrokenResourceError) as exc:
            samples.fail(f"{name}/{mode}/ttft", str(exc))
            conn.abort()
            return
        samples.add(f"{name}/{mode}/ttfb", timing.first_byte)
        if timing.first_token is not None:
            samples.add(f"{name}/{mode}/ttft", timing.first_token)

    return op


def first_token_rows(samples: Samples, name: str) -> list[dict[str, Any]]:
    """The table rows of one target: each measure against its floor (p50 and p99)."""
    floor = samples.summary(f"{name}/floor")
    rows = []
    for mode in ("stream", "sync"):
        for what, label in (("ttfb", "first byte"), ("ttft", "first token")):
            s = samples.summary(f"{name}/{mode}/{what}")
            rows.append(
                {
                    "target": name,
                    "measure": f"{'streaming' if mode == 'stream' else 'sync'}: {label}",
                    "key": f"{mode}/{what}",
                    "n": s["n"],
                    "failures": s["failures"],
                    "p50": s["p50"],
                    "p99": s["p99"],
                    "floor_p50": floor["p50"],
                    "floor_p99": floor["p99"],
                    "ratio_p50": ratio(s["p50"], floor["p50"]),
                    "ratio_p99": ratio(s["p99"], floor["p99"]),
                }
            )
    return rows


# -- levels ---------------------------------------------------------------------------------


def process_tree(pid: int) -> list[Any]:
    import psutil  # type: ignore[import-untyped]  # the bench group's; the tests run without

    main = psutil.Process(pid)
    return [main, *main.children(recursive=True)]


def cpu_seconds(pids: list[int]) -> float:
    """CPU seconds (user + system) so far of these processes and all their children."""
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            for process in process_tree(pid):
                with contextlib.suppress(psutil.Error):
                    times = process.cpu_times()
                    total += float(times.user + times.system)
    return total


def machine_busy_s() -> float | None:
    """CPU seconds the whole machine has been busy (every core, every process, this run's or
    not), from ``/proc/stat``: all but idle and iowait (guest time is already inside user
    time); None without psutil."""
    try:
        import psutil
    except ImportError:
        return None
    times = psutil.cpu_times()._asdict()
    idle = ("idle", "iowait", "guest", "guest_nice")
    return float(sum(v for k, v in times.items() if k not in idle))


def listener_pid(port: int) -> int | None:
    """The pid of the process listening on 127.0.0.1:``port`` (or any address), if this
    user may see it, and psutil (the bench group's) is there: a loopback target's server,
    for its CPU figures."""
    try:
        import psutil
    except ImportError:
        return None
    with contextlib.suppress(psutil.Error, OSError):
        for c in psutil.net_connections(kind="tcp"):
            if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid:
                return int(c.pid)
    return None


@dataclass
class LevelResult:
    streams: int
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    ttft: list[float] = field(default_factory=list)
    lags: list[float] = field(default_factory=list)
    pieces: int = 0
    chars: int = 0
    wall_s: float = 0.0
    tokens: int | None = None  # when the answer's tokens can be counted (the fake's)
    cpu_s: float | None = None
    # CPU % over the level of the other processes that share the machine (the bench client,
    # the fake model): one near 100 %, or a sum near cores x 100 %, means the level
    # measured the machine, not only the server.
    cpu_pct: dict[str, float] = field(default_factory=dict)
    profile: list[tuple[float, int]] = field(default_factory=list)  # a lone stream's

    def row(self) -> dict[str, Any]:
        lag = summarize(self.lags)
        ttft = summarize(self.ttft)
        tokens = self.tokens
        return {
            "streams": self.streams,
            "completed": self.ok,
            "errors": len(self.errors),
            "error_example": self.errors[0][:160] if self.errors else None,
            "ttft_p50": ttft["p50"],
            "ttft_p99": ttft["p99"],
            "lag_p50": lag["p50"],
            "lag_p99": lag["p99"],
            "lag_max": lag["max"],
            "pieces": self.pieces,
            "tokens": tokens,
            "wall_s": round(self.wall_s, 2),
            "pieces_per_s": round(self.pieces / self.wall_s, 1) if self.wall_s else None,
            "cpu_s": None if self.cpu_s is None else round(self.cpu_s, 3),
            "cpu_pct": self.cpu_pct,
            "cpu_us_per_token": (
                round(self.cpu_s / tokens * 1e6, 1) if self.cpu_s is not None and tokens else None
            ),
            "held": bool(
                self.streams
                and not self.errors
                and self.ok == self.streams
                and lag["p99"] is not None
                and lag["p99"] <= LAG_HELD_MS
            ),
        }


def piece_lags(
    sent_at: float, pieces: list[tuple[float, int]], profile: list[tuple[float, int]]
) -> list[float]:
    """Each piece's lag (seconds) behind the lone stream's ``profile`` of the same answer
    (``(seconds after its request was sent, content offset)`` per piece): the piece's time
    after its own request was sent, minus the time after which the lone stream had reached
    the same content offset. A wait for the first token counts. A piece past the
    profile's end is set against the profile's end."""
    if not pieces or not profile:
        return []
    out: list[float] = []
    j = 0
    for at, end in pieces:
        while j < len(profile) - 1 and profile[j][1] < end:
            j += 1
        out.append(max(0.0, (at - sent_at) - profile[j][0]))
    return out


async def run_level(
    ep: Endpoint,
    make_body: Callable[[], dict[str, Any]],
    streams: int,
    profile: list[tuple[float, int]] | None,
    cpu_pids: list[int],
    timeout_s: float,
    count_tokens: Callable[[str], int] | None = None,
    watch: dict[str, int] | None = None,
) -> LevelResult:
    """``streams`` streaming chats sent at once, each on its own connection, read to their
    end; with no ``profile`` (level 1) the one stream becomes the profile."""
    result = LevelResult(streams)
    conns = [ep.conn() for _ in range(streams)]
    timings: list[ChatTiming] = []

    async def connect(conn: HttpConnection) -> None:
        try:
            await conn.connect()
        except OSError as exc:
            result.errors.append(f"connect: {exc}")

    async def one(conn: HttpConnection) -> None:
        try:
            timings.append(await timed_chat(ep, conn, make_body(), keep_pieces=True))
        except (ChatError, OSError, HttpError, trio.BrokenResourceError) as exc:
            result.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            conn.abort()

    # Every connection is open before the first request goes: the level times the server's
    # streams, not its accept queue.
    with trio.move_on_after(timeout_s):
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(connect, conn)
    cpu0 = cpu_seconds(cpu_pids) if cpu_pids else None
    others = {"server": cpu_pids, **{k: [v] for k, v in (watch or {}).items()}}
    others0 = {k: cpu_seconds(v) for k, v in others.items() if v}
    client0 = time.process_time()
    machine0 = machine_busy_s()
    started = time.monotonic()
    with trio.move_on_after(timeout_s) as scope:
        async with trio.open_nursery() as nursery:
            for conn in conns:
                nursery.start_soon(one, conn)
    result.wall_s = time.monotonic() - started
    if cpu0 is not None:
        result.cpu_s = cpu_seconds(cpu_pids) - cpu0
    wall = max(result.wall_s, 1e-9)
    result.cpu_pct = {"bench client": round((time.process_time() - client0) / wall * 100, 1)}
    machine1 = machine_busy_s()
    if machine0 is not None and machine1 is not None:
        # Everything the machine ran, this run's processes and any other job's.
        result.cpu_pct["machine"] = round((machine1 - machine0) / wall * 100, 1)
    for name, before in others0.items():
        result.cpu_pct[name] = round((cpu_seconds(others[name]) - before) / wall * 100, 1)
    if scope.cancelled_caught:
        result.errors.append(f"{streams - len(timings)} streams not ended after {timeout_s} s")
    result.ok = len(timings)
    if profile is None and timings:
        lone = timings[0]
        profile = [(at - lone.sent_at, end) for at, end in lone.pieces]
    result.profile = profile or []
    for timing in timings:
        if timing.first_token is not None:
            result.ttft.append(timing.first_token)
        result.pieces += len(timing.pieces)
        result.chars += len(timing.content)
        tokens = count_tokens(timing.content) if count_tokens else timing.completion_tokens
        if tokens is not None:
            result.tokens = (result.tokens or 0) + tokens
        result.lags += piece_lags(timing.sent_at, timing.pieces, result.profile)
    return result


# -- disconnect -----------------------------------------------------------------------------


async def abort_when(
    ep: Endpoint,
    body: dict[str, Any],
    ready: Callable[[], Awaitable[None]],
) -> float:
    """Send a chat on a fresh connection, read its answer until ``ready()`` returns (or the
    first content, for a stream, whichever is later), then close the socket: a client
    walking away. Returns the monotonic time just before the close; raises ``ChatError``
    when ``ready()`` failed or no content came within 30 s."""
    conn = ep.conn()
    first = trio.Event()

    async def client() -> None:
        with contextlib.suppress(
            trio.BrokenResourceError, trio.ClosedResourceError, OSError, HttpError, ChatError
        ):
            status, _ = await conn.open_stream(
                "POST", ep.path(CHAT_PATH), body, headers=ep.headers()
            )
            if status != 200:
                return
            if body.get("stream"):
                async for _, data in sse_events(conn):
                    if '"content":"' in data.replace(" ", "") and not data.startswith(":"):
                        first.set()
            else:
                async for _ in conn.body_chunks():
                    pass

    failure: Exception | None = None
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client)
        try:
            await ready()
            if body.get("stream"):
                with trio.fail_after(30):
                    await first.wait()
        except Exception as exc:  # the sample failed: still close the socket, then say so
            failure = exc
        closed_at = conn.abort()
    if failure is not None:
        raise ChatError(f"{type(failure).__name__}: {failure}") from failure
    return closed_at
