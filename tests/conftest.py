"""Fixtures: the loopback fakes and a real Tether server (hypercorn, trio worker) on a
loopback port, talked to over sockets."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import httpx2
import pytest
import trio

from fakes.model import FakeModel
from fakes.pages import FakePages
from fakes.redis_cluster import RedisCluster
from fakes.redis_sentinel import SentinelSet
from fakes.redis_server import RedisServer
from fakes.scripted import Script, ScriptedServer
from fakes.search import FakeSearxng
from server.app import create_app
from server.cli import serve_app
from server.config import Settings
from server.runtime import Runtime
from server.tasks.backend import next_events
from tests.scripted import Serve

WAIT = 10.0  # generous upper bound for anything a test waits on
BACKENDS = ("memory", "redis", "redis-cluster", "redis-sentinel")
# Kinds that run the core suites only (modules marked ``core_suite`` too), to keep CI short:
# the other both_backends modules would add their Redis time again for little that a
# cluster or Sentinel changes.
CORE_ONLY = ("redis-cluster", "redis-sentinel")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "both_backends: run the module's servers on the memory and on the Redis task backend",
    )
    config.addinivalue_line(
        "markers",
        "core_suite: a both_backends module that also runs on the kinds of CORE_ONLY "
        "(a Redis Cluster, Redis behind Sentinel)",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "backend_kind" in metafunc.fixturenames and metafunc.definition.get_closest_marker(
        "both_backends"
    ):
        core = metafunc.definition.get_closest_marker("core_suite") is not None
        kinds = [k for k in BACKENDS if core or k not in CORE_ONLY]
        metafunc.parametrize("backend_kind", kinds, indirect=True)


@pytest.fixture(scope="session")
def redis_server() -> Any:
    """One real redis-server for the whole test session; each server under test gets a
    key prefix of its own in it."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster() -> Any:
    """One real Redis Cluster (three primaries, three replicas) for the whole test session;
    each server under test gets a key prefix of its own in it. Tests that break a cluster
    (a failover, a slot moved) start one of their own."""
    cluster = RedisCluster()
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_sentinels() -> Any:
    """One real Sentinel set-up (a primary, its replica, three sentinels) for the whole test
    session, never failed over; each server under test gets a key prefix of its own."""
    sentinels = SentinelSet()
    sentinels.start(agree=False)
    yield sentinels
    sentinels.stop()


@pytest.fixture
def backend_kind(request: pytest.FixtureRequest) -> str:
    """The task backend of the servers a test starts: memory, unless the module is marked
    ``both_backends`` (then each test runs once per backend)."""
    return str(getattr(request, "param", "memory"))


@pytest.fixture
def backend_settings(request: pytest.FixtureRequest, backend_kind: str) -> dict[str, Any]:
    """Settings for the chosen backend; Redis only starts when a test needs it."""
    prefix = "t" + secrets.token_hex(6)
    if backend_kind == "redis":
        server: RedisServer = request.getfixturevalue("redis_server")
        return {"backend": "redis", "redis_url": server.url, "redis_prefix": prefix}
    if backend_kind == "redis-cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        return {"backend": "redis", "redis_url": cluster.url, "redis_prefix": prefix}
    if backend_kind == "redis-sentinel":
        sentinels: SentinelSet = request.getfixturevalue("redis_sentinels")
        return {**sentinels.settings(), "redis_prefix": prefix}
    return {}


@dataclass
class Fakes:
    model: FakeModel
    search: FakeSearxng
    pages: FakePages


@pytest.fixture
async def fakes(nursery: trio.Nursery) -> Fakes:
    model, search, pages = FakeModel(), FakeSearxng(), FakePages()
    for fake in (model, search, pages):
        await fake.start(nursery)
    search.configure(page_base_url=pages.base_url)
    return Fakes(model, search, pages)


@dataclass
class Tether:
    base_url: str
    runtime: Runtime
    client: httpx2.AsyncClient
    stop_serving: trio.Event

    @property
    def ws_url(self) -> str:
        return self.base_url.replace("http://", "ws://") + "/ws"

    async def chat(self, body: dict[str, Any], key: str | None = None) -> httpx2.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return await self.client.post("/api/chat/completions", json=body, headers=headers)

    async def background(self, body: dict[str, Any], key: str | None = None) -> str:
        response = await self.chat({**body, "background": True}, key)
        assert response.status_code == 202, response.text
        return str(response.json()["task_id"])

    async def events(
        self, task_id: str, after: int = 0, key: str | None = None
    ) -> list[dict[str, Any]]:
        """All events of a task through the SSE route, up to the terminal one."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        out: list[dict[str, Any]] = []
        async with self.client.stream(
            "GET", f"/api/tasks/{task_id}/events?after={after}", headers=headers
        ) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    out.append(json.loads(line[6:]))
        return out

    async def wait_phase(self, task_id: str, phase: str, key: str | None = None) -> None:
        """Follow the task's events until it reports being in ``phase``."""
        manager = self.runtime.manager
        while True:
            record = await manager.store.get(task_id)
            assert record is not None
            if record.phase == phase:
                return
            assert record.active, f"task ended in {record.phase} before reaching {phase}"
            await next_events(manager.store, task_id, record.last_seq)


def base_settings(fakes: Fakes, **overrides: Any) -> Settings:
    settings = Settings(
        host="127.0.0.1",
        port=0,
        llm_base_url=fakes.model.base_url + "/v1",
        llm_api_key="sk-fake",
        default_model="fake-model",
        search_provider="searxng",
        searxng_url=fakes.search.base_url,
        search_query_generation=False,
        search_result_count=3,
        local_model_tokens_per_s=0,
        sse_keepalive_s=15,
        ws_reconnect_grace_s=0,
        fetch_allow_private=True,  # the fakes live on loopback
    )
    return settings.with_overrides(**overrides)


StartTether = Callable[..., Any]


@pytest.fixture
async def start_tether(
    nursery: trio.Nursery, fakes: Fakes, backend_settings: dict[str, Any]
) -> AsyncIterator[Callable[..., Any]]:
    """Start a Tether server with the test settings plus overrides; returns a ``Tether``."""
    started: list[Tether] = []

    async def start(**overrides: Any) -> Tether:
        settings = base_settings(fakes, **{**backend_settings, **overrides})
        app = create_app(settings)
        stop = trio.Event()
        binds = await nursery.start(partial(serve_app, app, settings, shutdown_trigger=stop.wait))
        base_url = binds[0]
        client = httpx2.AsyncClient(base_url=base_url, timeout=WAIT, trust_env=False)
        tether = Tether(base_url, app.extensions["tether"], client, stop)
        started.append(tether)
        return tether

    yield start
    for tether in started:
        await tether.client.aclose()
        tether.stop_serving.set()


@pytest.fixture
async def tether(start_tether: Callable[..., Any]) -> Tether:
    result: Tether = await start_tether()
    return result


@pytest.fixture
async def serve(nursery: trio.Nursery) -> AsyncIterator[Serve]:
    """``await serve(script)`` starts a loopback server answering every request with
    ``script``; a script that crashed fails the test."""
    servers: list[ScriptedServer] = []

    async def start(script: Script) -> ScriptedServer:
        server = ScriptedServer(script)
        await server.start(nursery)
        servers.append(server)
        return server

    yield start
    for server in servers:
        assert not server.errors, "a script crashed:\n" + "\n".join(server.errors)


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    # trust_env=False: no proxy from the environment may stand between us and loopback.
    async with httpx2.AsyncClient(trust_env=False) as client:
        yield client
