"""Everything a running server holds: settings, the shared HTTP client, providers, the
pipeline and the task manager. Built at start-up, closed at shutdown."""

from __future__ import annotations

from dataclasses import dataclass

import httpx2
from opentelemetry.sdk.trace import TracerProvider

from server.auth import Authenticator
from server.config import Settings, SettingsError, read_mcp_config
from server.load import LoadGauge
from server.metrics import Metrics
from server.pipeline.chat import ChatPipeline
from server.providers.llm.paced import Pause, paced_client
from server.providers.llm.router import ModelRouter, build_model_router
from server.providers.net.client import client_with_backend
from server.providers.net.public_only import PublicOnlyBackend
from server.providers.net.tls_safe import TlsSafeBackend
from server.providers.search.base import SearchProvider
from server.providers.search.factory import build_search_provider
from server.providers.tools.mcp import McpServers
from server.providers.tools.registry import ToolRegistry, build_tools
from server.providers.web.fetch import HttpPageReader
from server.sessions import SessionRegistry
from server.tasks.backend import Backend
from server.tasks.manager import TaskManager
from server.tasks.memory import MemoryBackend
from server.tasks.redis import RedisTarget, Sentinels, redis_backend
from server.tracing import Tracing, build_tracing


@dataclass
class Runtime:
    settings: Settings
    auth: Authenticator
    metrics: Metrics
    http: httpx2.AsyncClient
    pages_http: httpx2.AsyncClient  # http itself when private addresses are allowed
    model_http: httpx2.AsyncClient
    load: LoadGauge
    models: ModelRouter
    search: SearchProvider
    tools: ToolRegistry
    mcp: McpServers | None
    pipeline: ChatPipeline
    manager: TaskManager
    sessions: SessionRegistry
    tracing: Tracing


def _limits(settings: Settings, *, keepalive: int) -> httpx2.Limits:
    return httpx2.Limits(
        max_connections=settings.http_max_connections,
        max_keepalive_connections=min(keepalive, settings.http_max_connections),
    )


def _timeout(settings: Settings) -> httpx2.Timeout:
    return httpx2.Timeout(settings.llm_timeout_s, connect=10.0)


def build_http_client(
    settings: Settings, *, keepalive: int, pause: Pause | None = None
) -> httpx2.AsyncClient:
    """A client for outgoing HTTP; with ``pause``, its reads are paced (see ``paced``).
    Timeouts here are outer bounds; each step also has its own deadline inside the task's
    cancel scope."""
    limits, timeout = _limits(settings, keepalive=keepalive), _timeout(settings)
    traced = settings.otel_traces
    if pause is not None:
        return paced_client(limits, timeout, pause, traced=traced)
    return client_with_backend(TlsSafeBackend(), limits, timeout, traced=traced)


def redis_target(settings: Settings) -> RedisTarget:
    """Where the settings say Redis is: a URL, or the primary that sentinels name."""
    if settings.redis_sentinels and settings.redis_sentinel_service:
        addresses = []
        for address in settings.redis_sentinels:
            host, _, port = address.rpartition(":")
            addresses.append((host, int(port)))
        return Sentinels(
            tuple(addresses),
            settings.redis_sentinel_service,
            password=settings.redis_sentinel_password,
            db=settings.redis_sentinel_db,
            primary_password=settings.redis_password,
            primary_username=settings.redis_username,
        )
    if not settings.redis_url:
        raise SettingsError("TETHER_BACKEND=redis needs TETHER_REDIS_URL or TETHER_REDIS_SENTINELS")
    return settings.redis_url


def build_backend(settings: Settings) -> Backend:
    if settings.backend == "redis":
        return redis_backend(
            redis_target(settings),
            prefix=settings.redis_prefix,
            mode=settings.redis_mode,
            follow_reads=settings.redis_follow_reads,
            retention_s=settings.task_retention_s,
            max_retained=settings.max_retained_tasks,
            replica_ttl_s=settings.replica_ttl_s,
            timeout_s=settings.backend_timeout_s,
        )
    return MemoryBackend()


def build_runtime(settings: Settings, *, tracer_provider: TracerProvider | None = None) -> Runtime:
    """Everything the server holds. Traced (``settings.otel_traces``), spans go to
    ``tracer_provider`` if given (a test's), else to the OTLP exporter the SDK configures
    from OTEL_*."""
    # Two pools: model streams are long and go to one or two hosts, so their connections
    # are worth keeping; searches and page fetches are short and go everywhere. Apart,
    # neither pool's bookkeeping (httpcore walks its connection list on every request)
    # pays for the other's connections: under load, hundreds of open model streams would
    # otherwise be walked by every page fetch.
    load = LoadGauge()
    if settings.otel_traces and tracer_provider is not None:
        tracing = Tracing(tracer_provider)
    else:
        tracing = build_tracing(settings.otel_traces, settings.otel_service_name)
    http = build_http_client(settings, keepalive=50)
    # Page fetches (search results, fetch_url) go where outside text points: unless
    # allowed, they reach public addresses only, checked where they connect.
    pages_http = (
        http
        if settings.fetch_allow_private
        else client_with_backend(
            PublicOnlyBackend(),
            _limits(settings, keepalive=50),
            _timeout(settings),
            traced=settings.otel_traces,
        )
    )
    model_http = build_http_client(
        settings, keepalive=settings.http_max_connections, pause=lambda: load.read_pause_s
    )
    metrics = Metrics()
    metrics.loop_busy.set_function(lambda: load.busy)
    metrics.read_pause.set_function(lambda: load.read_pause_s)
    models = build_model_router(settings, model_http)
    search = build_search_provider(settings, http)
    # A configuration file that cannot be read stops the start (SettingsError); a server in
    # it that does not answer never does.
    mcp = (
        McpServers(read_mcp_config(settings.mcp_config), settings) if settings.mcp_config else None
    )
    pages = HttpPageReader(pages_http, settings)
    tools = ToolRegistry(build_tools(settings, pages), mcp, settings.mcp_max_result_chars)
    pipeline = ChatPipeline(settings, models, search, tools, pages)
    manager = TaskManager(settings, build_backend(settings), pipeline.run_chat, metrics, tracing)
    cluster = manager.cluster
    metrics.store_reachable.set_function(lambda: 1.0 if cluster.reachable else 0.0)
    sessions = SessionRegistry(manager, settings.ws_reconnect_grace_s)
    return Runtime(
        settings=settings,
        auth=Authenticator(settings),
        metrics=metrics,
        http=http,
        pages_http=pages_http,
        model_http=model_http,
        load=load,
        models=models,
        search=search,
        tools=tools,
        mcp=mcp,
        pipeline=pipeline,
        manager=manager,
        sessions=sessions,
        tracing=tracing,
    )
