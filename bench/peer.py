"""``python -m bench --peer litellm``: a peer gateway beside Tether, both in front of the
bench's own fake model, measured in the same run by the same scenarios.

LiteLLM's proxy (what most users would pick instead of Tether as a gateway) is installed
pinned (``bench/peers/litellm-requirements.txt``) into its own environment,
``.tools/litellm/``, never into Tether's ``.venv``, and run twice: as shipped and with
``general_settings.cancel_on_disconnect: true``. It stays on loopback: its model price list
is the one it ships (``LITELLM_LOCAL_MODEL_COST_MAP=True``; else it fetches one at start),
and so are its other lists; no callback, no telemetry. It refuses to start without a master
key: it gets one, and the bench sends it as a user would.

Scenarios, the targets interleaved (in a random order each round or level):

- first byte and first token, streaming and sync, against each server's own floor (its
  cheapest route: Tether's ``/healthz``, LiteLLM's ``/health/liveliness``);
- load levels (N streams at once of ``tokens`` tokens at ``rate`` tokens/s from the fake):
  lag behind a lone stream, errors, and the server's CPU per streamed token (its process
  and its children, from /proc);
- a client that walks away (streaming, after its first token; sync, 0.2 s after the fake
  got the request): from the client's close to the fake seeing its upstream connection
  closed (both CLOCK_MONOTONIC), or still open ``DISCONNECT_WAIT_S`` later.
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import trio

from bench.fakes import FakeControl
from bench.httpclient import HttpError, get_json
from bench.procs import REPO_ROOT, Proc, ProcessError, ProcessSet, free_port
from bench.progress import Progress
from bench.remote import (
    CHAT_PATH,
    ChatError,
    Endpoint,
    abort_when,
    chat_body,
    first_token_rounds,
    first_token_rows,
    pick_floor,
    run_level,
)
from bench.results import Results
from bench.stats import ratio, summarize

SCENARIO = "peers"
PEERS = ("litellm",)
LITELLM_VERSION = "1.108.7"
REQUIREMENTS = REPO_ROOT / "bench" / "peers" / "litellm-requirements.txt"
VENV = REPO_ROOT / ".tools" / "litellm"
MASTER_KEY = "sk-bench-peer"  # LiteLLM refuses to start without one
UPSTREAM_KEY = "bench-key"  # what the gateways send to the fake model
SHORT_REPLY: dict[str, Any] = {"kind": "text", "chunks": ["Hello", " from", " the", " fake."]}
# A long slow answer, for the client that walks away: 10 s, twice the wait for the close,
# so that an upstream call that runs on after its client left ends by itself soon after.
LONG_REPLY: dict[str, Any] = {"kind": "text", "tokens": 200, "rate": 20}
LONG_REPLY_S = 10.0
DISCONNECT_WAIT_S = 5.0
# LiteLLM's switches for lists it would otherwise fetch from the internet, and its banners.
LITELLM_ENV = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOCAL_BLOG_POSTS": "True",
    "LITELLM_LOCAL_POLICY_TEMPLATES": "True",
    "LITELLM_LOCAL_AUTOROUTER_PRESETS": "True",
    "LITELLM_DONT_SHOW_FEEDBACK_BOX": "True",
    "DISABLE_ADMIN_UI": "True",
    "LITELLM_LOG": "ERROR",
}


@dataclass(frozen=True)
class PeerConfig:
    mode: str
    first_token_rounds: int = 100
    levels: tuple[int, ...] = (1, 10, 30, 100, 300)
    level_tokens: int = 200
    level_rate: float = 50.0
    level_timeout_s: float = 240.0  # a level not ended by then has not held
    disconnect_samples: int = 20  # per target and client kind


PEER_QUICK = PeerConfig(
    mode="quick",
    first_token_rounds=40,
    levels=(1, 10, 30, 100),
    level_tokens=100,
    disconnect_samples=6,
)
PEER_FULL = PeerConfig(mode="full")


@dataclass
class Target:
    name: str  # tether, litellm, litellm-cod
    label: str
    proc: Proc
    ep: Endpoint
    model: str
    floor: str = ""


def find_uv() -> list[str]:
    """uv as the Makefile finds it: ``$UV``, on PATH, ``python3 -m uv``, or .tools/bin/uv."""
    if os.environ.get("UV"):
        return os.environ["UV"].split()
    if shutil.which("uv"):
        return ["uv"]
    probe = subprocess.run(
        [sys.executable, "-m", "uv", "--version"], capture_output=True, check=False
    )
    if probe.returncode == 0:
        return [sys.executable, "-m", "uv"]
    return [str(REPO_ROOT / ".tools" / "bin" / "uv")]


def install_litellm(progress: Progress) -> Path:
    """LiteLLM pinned in ``.tools/litellm/`` (quick when already there: uv checks the pins)."""
    uv = find_uv()
    python = VENV / "bin" / "python"
    if not python.exists():
        progress.step(f"installing LiteLLM {LITELLM_VERSION} into {VENV} (pinned)")
        subprocess.run([*uv, "venv", "-q", "--python", "3.11", str(VENV)], check=True)
    subprocess.run(
        [*uv, "pip", "install", "-q", "--python", str(python), "-r", str(REQUIREMENTS)],
        check=True,
    )
    return VENV / "bin" / "litellm"


def litellm_config(model_base_url: str, cancel_on_disconnect: bool) -> str:
    """The proxy's config.yaml (JSON is YAML): one model, the fake; no callbacks."""
    import json

    general: dict[str, Any] = {"master_key": MASTER_KEY}
    if cancel_on_disconnect:
        general["cancel_on_disconnect"] = True
    config = {
        "model_list": [
            {
                "model_name": "fake-model",
                "litellm_params": {
                    "model": "openai/fake-model",
                    "api_base": model_base_url,
                    "api_key": UPSTREAM_KEY,
                },
            }
        ],
        "litellm_settings": {
            "telemetry": False,
            "callbacks": [],
            "success_callback": [],
            "failure_callback": [],
        },
        "general_settings": general,
    }
    return json.dumps(config, indent=2)


async def wait_ready(proc: Proc, route: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not proc.alive():
            raise ProcessError(f"{proc.name} exited:\n{proc.log_tail()}")
        try:
            await get_json("127.0.0.1", proc.port, route)
            return
        except (OSError, HttpError, ValueError):
            await trio.sleep(0.1)
    raise ProcessError(f"{proc.name} did not answer {route} in {timeout} s:\n{proc.log_tail()}")


async def start_tether(procs: ProcessSet, model: FakeControl) -> Proc:
    from bench.config import QUICK

    port = free_port()
    # The bench's settings (admission limits out of the way, a pool as large as the
    # levels need), less its web search: a gateway's chats search nothing.
    env = {k: v for k, v in QUICK.server_env.items() if not k.startswith("TETHER_SEARCH")}
    env["TETHER_LLM_BASE_URL"] = model.base_url + "/v1"
    env["TETHER_LLM_API_KEY"] = UPSTREAM_KEY
    proc = procs.spawn(
        "tether", ["-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port)], env
    )
    proc.port = port
    await wait_ready(proc, "/healthz", 60)
    return proc


async def start_litellm(
    procs: ProcessSet, binary: Path, model: FakeControl, name: str, cancel: bool
) -> Proc:
    config = procs.log_dir / f"{name}.yaml"
    config.write_text(litellm_config(model.base_url + "/v1", cancel))
    port = free_port()
    args = ["--config", str(config), "--host", "127.0.0.1", "--port", str(port)]
    proc = procs.spawn(name, args, LITELLM_ENV, program=str(binary))
    proc.port = port
    await wait_ready(proc, "/health/liveliness", 180)
    return proc


async def tether_model_id(proc: Proc) -> str:
    """The id under which Tether lists the fake model (its list is fetched at start)."""
    deadline = time.monotonic() + 15
    ids: list[str] = []
    while time.monotonic() < deadline:
        try:
            ids = [
                str(m["id"]) for m in (await get_json("127.0.0.1", proc.port, "/v1/models"))["data"]
            ]
        except (OSError, HttpError, ValueError, KeyError):
            ids = []
        fake = [i for i in ids if "fake-model" in i]
        if fake:
            return fake[0]
        await trio.sleep(0.1)
    raise ProcessError(f"Tether never listed the fake model (models: {ids})")


def marker_body(model: str, stream: bool) -> dict[str, Any]:
    return chat_body(model, "bench " + uuid.uuid4().hex[:10], stream=stream)


async def run_peers(
    peer: str, cfg: PeerConfig, procs: ProcessSet, progress: Progress, results: Results
) -> None:
    fig: dict[str, Any] = {"peer": peer, "config": asdict(cfg)}
    results.figures[SCENARIO] = fig
    progress.section("peers: start-up")
    binary = await trio.to_thread.run_sync(install_litellm, progress)
    fake_proc = await procs.start_fake("model", "fakes.model")
    model = FakeControl("model", fake_proc.port)
    progress.step(f"fake model :{model.port}; starting Tether and LiteLLM {LITELLM_VERSION} x2")
    started: dict[str, Proc] = {}

    async def start(name: str, cancel: bool | None) -> None:
        if cancel is None:
            started[name] = await start_tether(procs, model)
        else:
            started[name] = await start_litellm(procs, binary, model, name, cancel)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(start, "tether", None)
        nursery.start_soon(start, "litellm", False)
        nursery.start_soon(start, "litellm-cod", True)
    targets = [
        Target(
            "tether",
            "Tether",
            started["tether"],
            Endpoint(started["tether"].base_url),
            await tether_model_id(started["tether"]),
        ),
        Target(
            "litellm",
            f"LiteLLM {LITELLM_VERSION}",
            started["litellm"],
            Endpoint(started["litellm"].base_url, MASTER_KEY),
            "fake-model",
        ),
        Target(
            "litellm-cod",
            "LiteLLM, cancel_on_disconnect",
            started["litellm-cod"],
            Endpoint(started["litellm-cod"].base_url, MASTER_KEY),
            "fake-model",
        ),
    ]
    for t in targets:
        floor, medians = await pick_floor(t.ep)
        if floor is None:
            raise ProcessError(f"{t.name}: no floor route answered: {medians}")
        t.floor = floor
        progress.step(f"{t.label}: pid {t.proc.pid}, :{t.proc.port}, floor {floor} ({medians})")
    fig["targets"] = [
        {"name": t.name, "label": t.label, "pid": t.proc.pid, "floor": t.floor, "model": t.model}
        for t in targets
    ]
    results.settings["litellm_env"] = LITELLM_ENV
    results.settings["litellm_config"] = litellm_config("<fake model>/v1", True)

    progress.section("peers: first byte and first token")
    await model.reset()
    await model.configure(default_reply=SHORT_REPLY)
    samples = await first_token_rounds(
        {t.name: (t.ep, t.floor, t.model) for t in targets},
        marker_body,
        cfg.first_token_rounds,
        seed=20,
        on_round=partial(progress.bar, "rounds", total=cfg.first_token_rounds),
    )
    fig["first_token"] = {t.name: first_token_rows(samples, t.name) for t in targets}
    for key, values in samples.values.items():
        results.add_set(SCENARIO, f"first_token/{key}", values)
    for key, fails in samples.failures.items():
        results.errors.append(f"peers {key}: {len(fails)} failed, e.g. {fails[0][:200]}")
    for t in targets:
        row = fig["first_token"][t.name][1]
        progress.step(
            f"{t.label}: streaming first token p50 {row['p50']} ms ({row['ratio_p50']}x its floor)"
        )

    # Disconnects before the levels: a level that a server could not hold leaves it busy.
    progress.section("peers: client disconnect")
    await model.configure(default_reply=LONG_REPLY)
    fig["disconnect"] = await _disconnect(targets, model, cfg, progress)
    for key, d in fig["disconnect"].items():
        if d["failed"]:
            results.errors.append(
                f"peers disconnect {key}: {d['failed']} samples failed, e.g. {d['failure_example']}"
            )
    progress.step(f"letting upstream calls left running end ({LONG_REPLY_S:g} s)")
    await trio.sleep(LONG_REPLY_S)

    progress.section("peers: levels")
    await model.configure(
        default_reply={"kind": "text", "tokens": cfg.level_tokens, "rate": cfg.level_rate}
    )
    fig["levels"] = await _levels(targets, cfg, progress, fake_proc.pid)

    conns = await model.connections()
    slow = [c for c in conns if not c.get("nodelay")]
    results.check(
        "peers: every connection the fake model accepted had TCP_NODELAY",
        not slow and bool(conns),
        f"{len(conns) - len(slow)} of {len(conns)}",
    )
    fig["summary"] = summary_rows(fig)


async def _levels(
    targets: list[Target], cfg: PeerConfig, progress: Progress, fake_pid: int
) -> dict[str, list[dict[str, Any]]]:
    rows: dict[str, list[dict[str, Any]]] = {t.name: [] for t in targets}
    profiles: dict[str, list[tuple[float, int]]] = {}
    rng = random.Random(21)
    timeout = cfg.level_timeout_s + cfg.level_tokens / cfg.level_rate
    for streams in cfg.levels:
        order = list(targets)
        rng.shuffle(order)
        for t in order:
            level = await run_level(
                t.ep,
                lambda t=t: marker_body(t.model, True),  # type: ignore[misc]
                streams,
                profiles.get(t.name),
                [t.proc.pid],
                timeout,
                lambda content: content.count("tok"),
                {"fake model": fake_pid},
            )
            profiles.setdefault(t.name, level.profile)
            row = level.row()
            rows[t.name].append(row)
            progress.step(
                f"{t.label:<32} {streams:>4} streams: {row['completed']} done, "
                f"{row['errors']} errors, lag p99 {row['lag_p99']} ms, "
                f"{row['cpu_us_per_token']} µs CPU/token, {'held' if row['held'] else 'NOT held'}; "
                f"CPU % {row['cpu_pct']}"
            )
    return rows


async def _disconnect(
    targets: list[Target], model: FakeControl, cfg: PeerConfig, progress: Progress
) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    rng = random.Random(22)
    values: dict[tuple[str, str], list[float]] = {}
    still_open: dict[tuple[str, str], int] = {}
    failed: dict[tuple[str, str], list[str]] = {}
    for n in range(1, cfg.disconnect_samples + 1):
        progress.bar("rounds", n - 1, cfg.disconnect_samples)
        ops = [(t, stream) for t in targets for stream in (True, False)]
        rng.shuffle(ops)
        for t, stream in ops:
            key = (t.name, "stream" if stream else "sync")
            seen = len(await model.requests(CHAT_PATH))

            async def ready(seen: int = seen, stream: bool = stream) -> None:
                if await model.wait_request(CHAT_PATH, seen + 1, timeout=30) is None:
                    raise ProcessError("the fake model saw no request")
                if not stream:
                    await trio.sleep(0.2)  # a few tokens into the answer

            try:
                closed_at = await abort_when(t.ep, marker_body(t.model, stream), ready)
            except ChatError as exc:
                failed.setdefault(key, []).append(str(exc))
                continue
            mine = (await model.requests(CHAT_PATH))[seen]
            record = await model.wait_closed(int(mine["conn_id"]), timeout=DISCONNECT_WAIT_S)
            if record is not None and record.get("closed_at") is not None:
                values.setdefault(key, []).append(float(record["closed_at"]) - closed_at)
            else:
                still_open[key] = still_open.get(key, 0) + 1
    progress.bar("rounds", cfg.disconnect_samples, cfg.disconnect_samples)
    for t in targets:
        for mode in ("stream", "sync"):
            key = (t.name, mode)
            s = summarize(values.get(key, []))
            out[f"{t.name}/{mode}"] = {
                **s,
                "samples": cfg.disconnect_samples,
                "still_open": still_open.get(key, 0),
                "failed": len(failed.get(key, [])),
                "failure_example": (failed.get(key) or [None])[0],
            }
            progress.step(
                f"{t.label:<32} {mode:<6}: upstream closed in {s['n']} of "
                f"{cfg.disconnect_samples} (p50 {s['p50']} ms); open after "
                f"{DISCONNECT_WAIT_S:g} s: {still_open.get(key, 0)}"
            )
    return out


def _held(rows: list[dict[str, Any]]) -> int:
    held = [r["streams"] for r in rows if r["held"]]
    return max(held) if held else 0


def summary_rows(fig: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per metric: each target's figure, and each peer's ratio to Tether."""
    names = [t["name"] for t in fig["targets"]]
    rows: list[dict[str, Any]] = []

    def add(metric: str, unit: str, values: dict[str, Any], lower_is_better: bool = True) -> None:
        rows.append(
            {
                "metric": metric,
                "unit": unit,
                "values": values,
                "ratios": {n: ratio(values.get(n), values.get("tether")) for n in names[1:]},
                "lower_is_better": lower_is_better,
            }
        )

    ft = fig.get("first_token", {})
    for i, label in ((1, "streaming: time to first token"), (3, "sync: time to first token")):
        for q in ("p50", "p99"):
            add(f"{label} {q}", "ms", {n: ft[n][i][q] for n in names if n in ft})
            add(
                f"{label} {q} / own floor",
                "×",
                {n: ft[n][i][f"ratio_{q}"] for n in names if n in ft},
            )
    add("floor (cheapest route) p50", "ms", {n: ft[n][1]["floor_p50"] for n in names if n in ft})
    levels = fig.get("levels", {})
    if levels:
        top = max((r["streams"] for r in levels[names[0]]), default=0)
        for streams in sorted({r["streams"] for r in levels[names[0]]}):
            if streams == 1:
                continue
            by = {n: next((r for r in levels[n] if r["streams"] == streams), None) for n in names}
            add(
                f"{streams} streams: server CPU per streamed token",
                "µs",
                {n: r["cpu_us_per_token"] for n, r in by.items() if r},
            )
            add(f"{streams} streams: lag p99", "ms", {n: r["lag_p99"] for n, r in by.items() if r})
            add(
                f"{streams} streams: time to first token p99",
                "ms",
                {n: r["ttft_p99"] for n, r in by.items() if r},
            )
        add(
            f"most streams held (of {top}; lag p99 ≤ 100 ms, no error)",
            "streams",
            {n: _held(levels[n]) for n in names},
            lower_is_better=False,
        )
    disc = fig.get("disconnect", {})
    for mode, label in (("stream", "streaming"), ("sync", "sync")):
        if not disc:
            break
        add(
            f"client left ({label}) → upstream closed, p50",
            "ms",
            {n: disc[f"{n}/{mode}"]["p50"] for n in names},
        )
        add(
            f"client left ({label}) → upstream still open after {DISCONNECT_WAIT_S:g} s",
            "of " + str(disc[f"{names[0]}/{mode}"]["samples"]),
            {n: disc[f"{n}/{mode}"]["still_open"] for n in names},
        )
    return rows
