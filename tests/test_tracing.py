"""Traces: a trace per task, a span per phase. A stop or a disconnect marks the spans it cut
as cancelled, with the stop's event; the caller's traceparent is the task's parent, and the
task's outgoing requests carry the span they run in. Spans go to the SDK's in-memory
exporter here, and in one test over OTLP/HTTP to a receiver on loopback."""

from __future__ import annotations

import json
import secrets
from collections.abc import AsyncIterator, Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import h11
import httpx2
import pytest
import trio
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode

from fakes.mcp_server import McpHttpFake, McpRecorder
from fakes.model import HangReply, TextReply, ToolCallReply
from server.app import create_app
from server.cli import serve_app
from server.config import Settings, otel_traces_wanted
from server.tasks.backend import next_events
from tests.conftest import WAIT, Fakes, Tether, base_settings
from tests.helpers import chat_body, until
from tests.test_ws import connect

# A caller's trace context (W3C): the task's root span must be its child.
CALLER_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_SPAN = "00f067aa0ba902b7"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
async def start_traced(
    nursery: trio.Nursery, fakes: Fakes, exporter: InMemorySpanExporter
) -> AsyncIterator[Callable[..., Any]]:
    """Start a real Tether with tracing on, its spans going to ``exporter``."""
    started: list[Tether] = []
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    async def start(**overrides: Any) -> Tether:
        settings = base_settings(fakes, otel_traces=True, **overrides)
        app = create_app(settings, tracer_provider=provider)
        stop = trio.Event()
        binds = await nursery.start(partial(serve_app, app, settings, shutdown_trigger=stop.wait))
        client = httpx2.AsyncClient(base_url=binds[0], timeout=WAIT, trust_env=False)
        tether = Tether(binds[0], app.extensions["tether"], client, stop)
        started.append(tether)
        return tether

    yield start
    for tether in started:
        await tether.client.aclose()
        tether.stop_serving.set()


# ------------------------------------------------------------------------------- helpers


class Tree:
    """The finished spans of one task's trace, looked up by name."""

    def __init__(self, spans: Sequence[ReadableSpan]) -> None:
        self.spans = list(spans)
        self.root = self.one("tether.task")

    def all(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.all(name)
        assert len(found) == 1, f"{name}: {[s.name for s in self.spans]}"
        return found[0]

    def parent_of(self, span: ReadableSpan) -> ReadableSpan:
        assert span.parent is not None
        return next(s for s in self.spans if s.context.span_id == span.parent.span_id)


async def _task_trace(exporter: InMemorySpanExporter, task_id: str) -> Tree:
    """The task's trace once its root span has ended (it ends after the terminal event)."""

    async def ended() -> bool:
        return any(
            s.name == "tether.task" and (s.attributes or {}).get("tether.task.id") == task_id
            for s in exporter.get_finished_spans()
        )

    await until(ended, timeout=WAIT)
    root = next(
        s
        for s in exporter.get_finished_spans()
        if s.name == "tether.task" and (s.attributes or {}).get("tether.task.id") == task_id
    )
    assert root.context is not None
    trace_id = root.context.trace_id
    return Tree(
        [s for s in exporter.get_finished_spans() if s.context and s.context.trace_id == trace_id]
    )


def _assert_stopped(span: ReadableSpan, reason: str = "stop") -> None:
    """Cut by the task's stop: an error status that says cancelled, and the stop's event
    with its latency."""
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description == f"cancelled ({reason})"
    stops = [e for e in span.events if e.name == "tether.stop"]
    assert len(stops) == 1, span.events
    attributes = stops[0].attributes or {}
    assert attributes["reason"] == reason
    assert float(attributes["stop_ms"]) >= 0  # type: ignore[arg-type]


def _assert_root(tree: Tree, task_id: str, *, status: str, reason: str | None) -> None:
    attributes = tree.root.attributes or {}
    assert attributes["tether.task.id"] == task_id
    assert attributes["tether.user"] == "local"
    assert attributes["tether.model"] == "fake-model"
    assert attributes["tether.status"] == status
    assert attributes.get("tether.cancel_reason") == reason
    queued = tree.one("queued")
    assert tree.parent_of(queued) is tree.root
    assert queued.start_time == tree.root.start_time


def _span_id(span: ReadableSpan) -> str:
    assert span.context is not None
    return f"{span.context.span_id:016x}"


async def _stop(tether: Tether, task_id: str) -> None:
    response = await tether.client.post(f"/api/tasks/{task_id}/stop")
    assert response.status_code == 200
    assert response.json()["status"] == "cancelled"


# ------------------------------------------------------------------------------- the trees


async def test_stop_during_web_search_cuts_the_search_spans_under_the_callers_trace(
    start_traced: Callable[..., Any], fakes: Fakes, exporter: InMemorySpanExporter
) -> None:
    tether: Tether = await start_traced()
    fakes.search.configure(delay=30)
    response = await tether.client.post(
        "/api/chat/completions",
        json=chat_body(background=True, features={"web_search": True}),
        headers={"traceparent": CALLER_TRACEPARENT},
    )
    task_id = response.json()["task_id"]
    with trio.fail_after(WAIT):
        search_request = await fakes.search.wait_for_request("/search")
    await _stop(tether, task_id)
    tree = await _task_trace(exporter, task_id)

    _assert_root(tree, task_id, status="cancelled", reason="stop")
    _assert_stopped(tree.root)
    assert f"{tree.root.context.trace_id:032x}" == CALLER_TRACE  # type: ignore[union-attr]
    assert tree.root.parent is not None and f"{tree.root.parent.span_id:016x}" == CALLER_SPAN
    phase = tree.one("web_search")
    assert tree.parent_of(phase) is tree.root
    assert (phase.attributes or {})["tether.step"] == "web_search"
    _assert_stopped(phase)
    queries = tree.one("search.queries")
    assert tree.parent_of(queries) is phase
    assert queries.status.status_code is StatusCode.UNSET
    search = tree.one("search")
    assert tree.parent_of(search) is phase
    assert (search.attributes or {})["tether.query"] == "hello"
    _assert_stopped(search)
    # The search request went out carrying the search span.
    traceparent = search_request.headers["traceparent"]
    assert traceparent.split("-")[1:3] == [CALLER_TRACE, _span_id(search)]
    assert not tree.all("llm.stream")


async def test_stop_during_mcp_call_cuts_the_tool_span(
    start_traced: Callable[..., Any],
    fakes: Fakes,
    exporter: InMemorySpanExporter,
    nursery: trio.Nursery,
    tmp_path: Path,
) -> None:
    recorder = McpRecorder()
    await recorder.start(nursery)
    mcp = McpHttpFake("web", recorder)
    await mcp.start(nursery)
    config = tmp_path / "mcp.json"
    config.write_text(json.dumps({"mcpServers": {"files": {"url": mcp.url}}}))
    with trio.fail_after(WAIT * 2):
        tether: Tether = await start_traced(mcp_config=str(config))
    fakes.model.push(ToolCallReply([("mcp__files__slow", {"seconds": 30})]))
    task_id = await tether.background(chat_body("wait", tool_ids=["mcp:files:slow"]))
    with trio.fail_after(WAIT):
        await recorder.wait_for("call", server="web", tool="slow")
    await _stop(tether, task_id)
    tree = await _task_trace(exporter, task_id)
    mcp.stop()

    _assert_root(tree, task_id, status="cancelled", reason="stop")
    model = tree.one("llm.stream")
    assert tree.parent_of(model) is tree.root
    assert model.status.status_code is StatusCode.UNSET
    assert [e.name for e in model.events] == ["first_token"]
    call = tree.one("tool.call")
    assert tree.parent_of(call) is tree.root
    attributes = call.attributes or {}
    assert (attributes["mcp.server"], attributes["mcp.tool"]) == ("files", "slow")
    assert attributes["tether.tool"] == "mcp__files__slow"
    _assert_stopped(call)


async def test_stop_during_tool_call_cuts_the_tool_span_and_its_request_carries_it(
    start_traced: Callable[..., Any], fakes: Fakes, exporter: InMemorySpanExporter
) -> None:
    tether: Tether = await start_traced()
    fakes.model.push(ToolCallReply([("fetch_url", {"url": fakes.pages.base_url + "/hang"})]))
    task_id = await tether.background(chat_body("read it", tool_ids=["fetch_url"]))
    with trio.fail_after(WAIT):
        page_request = await fakes.pages.wait_for_request("/hang")
    await _stop(tether, task_id)
    tree = await _task_trace(exporter, task_id)

    _assert_root(tree, task_id, status="cancelled", reason="stop")
    call = tree.one("tool.call")
    assert tree.parent_of(call) is tree.root
    assert (call.attributes or {})["tether.tool"] == "fetch_url"
    assert "mcp.server" not in (call.attributes or {})
    _assert_stopped(call)
    assert page_request.headers["traceparent"].split("-")[2] == _span_id(call)
    # The model's request carried its own span.
    model_request = fakes.model.requests_for("/v1/chat/completions")[0]
    assert model_request.headers["traceparent"].split("-")[2] == _span_id(tree.one("llm.stream"))


async def test_stop_during_generation_cuts_the_model_stream_after_its_first_token(
    start_traced: Callable[..., Any], fakes: Fakes, exporter: InMemorySpanExporter
) -> None:
    tether: Tether = await start_traced()
    fakes.model.push(TextReply([f"w{i} " for i in range(400)], interval=0.02))
    task_id = await tether.background(chat_body())
    store = tether.runtime.manager.store
    with trio.fail_after(WAIT):
        while not [e for e in await store.read(task_id, 0) if e.type == "delta"]:
            await next_events(store, task_id, (await store.read(task_id, 0))[-1].seq)
    await _stop(tether, task_id)
    tree = await _task_trace(exporter, task_id)

    _assert_root(tree, task_id, status="cancelled", reason="stop")
    model = tree.one("llm.stream")
    assert tree.parent_of(model) is tree.root
    assert (model.attributes or {})["gen_ai.request.model"] == "fake-model"
    assert model.events[0].name == "first_token"
    _assert_stopped(model)
    assert model.events[0].timestamp <= model.events[1].timestamp


async def test_client_disconnect_of_a_streaming_chat_cuts_the_model_stream(
    start_traced: Callable[..., Any], fakes: Fakes, exporter: InMemorySpanExporter
) -> None:
    tether: Tether = await start_traced()
    fakes.model.push(TextReply([f"t{i} " for i in range(1000)], interval=0.02))
    async with tether.client.stream(
        "POST", "/api/chat/completions", json=chat_body(stream=True)
    ) as response:
        task_id = response.headers["X-Task-Id"]
        async for line in response.aiter_lines():
            if '"content":"t1 "' in line:
                break
    tree = await _task_trace(exporter, task_id)

    _assert_root(tree, task_id, status="cancelled", reason="disconnect")
    assert (tree.root.attributes or {})["tether.mode"] == "stream"
    _assert_stopped(tree.root, "disconnect")
    _assert_stopped(tree.one("llm.stream"), "disconnect")


async def test_a_skipped_page_read_is_marked_skipped_and_the_task_completes(
    start_traced: Callable[..., Any], fakes: Fakes, exporter: InMemorySpanExporter
) -> None:
    tether: Tether = await start_traced()
    url = fakes.pages.base_url + "/slow/30"
    fakes.search.configure(results=[{"url": url, "title": "Slow", "content": "a slow page"}])
    task_id = await tether.background(chat_body(features={"web_search": True}))
    with trio.fail_after(WAIT):
        await fakes.pages.wait_for_request("/slow")
    skipped = await tether.client.post(f"/api/tasks/{task_id}/skip", json={"step": f"page:{url}"})
    assert skipped.status_code == 200, skipped.text
    tree = await _task_trace(exporter, task_id)

    _assert_root(tree, task_id, status="completed", reason=None)
    assert (tree.root.attributes or {})["tether.finish_reason"] == "stop"
    assert tree.root.status.status_code is StatusCode.UNSET
    page = tree.one("page.read")
    assert tree.parent_of(page) is tree.one("web_search")
    assert (page.attributes or {})["url.full"] == url
    assert page.status.status_code is StatusCode.ERROR
    assert page.status.description == "skipped"
    assert [e.name for e in page.events] == ["tether.skip"]
    assert tree.one("web_search").status.status_code is StatusCode.UNSET


async def test_untraced_server_sends_no_trace_context(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(TextReply(["hi"]))
    response = await tether.chat(chat_body(), key=None)
    assert response.status_code == 200
    request = fakes.model.requests_for("/v1/chat/completions")[-1]
    assert "traceparent" not in request.headers
    assert tether.runtime.tracing.enabled is False


def test_the_otel_variables_decide_once_whether_traces_are_on() -> None:
    endpoint = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    assert otel_traces_wanted({}) is False
    assert otel_traces_wanted(endpoint) is True
    assert otel_traces_wanted({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h/v1/traces"})
    assert otel_traces_wanted({**endpoint, "OTEL_SDK_DISABLED": "true"}) is False
    assert otel_traces_wanted({**endpoint, "OTEL_TRACES_SAMPLER": "always_off"}) is False
    assert otel_traces_wanted({**endpoint, "OTEL_TRACES_EXPORTER": "none"}) is False
    settings = Settings.from_env({**endpoint, "OTEL_SERVICE_NAME": "chat-eu"})
    assert (settings.otel_traces, settings.otel_service_name) == (True, "chat-eu")
    assert Settings.from_env({}).otel_traces is False


# ------------------------------------------------------------------------------- OTLP/HTTP


class OtlpReceiver:
    """A collector's OTLP/HTTP trace endpoint on loopback: POST /v1/traces, protobuf."""

    def __init__(self) -> None:
        self.spans: list[Any] = []
        self.changed = trio.Event()
        self.port = 0

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await nursery.start(partial(trio.serve_tcp, self._serve, 0, host="127.0.0.1"))
        self.port = listeners[0].socket.getsockname()[1]

    async def _serve(self, stream: trio.SocketStream) -> None:
        connection = h11.Connection(h11.SERVER)
        body = b""
        while True:
            event = connection.next_event()
            if event is h11.NEED_DATA:
                data = await stream.receive_some()
                if not data:
                    return
                connection.receive_data(data)
            elif isinstance(event, h11.Request):
                path = event.target
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                assert path == b"/v1/traces"
                export = ExportTraceServiceRequest.FromString(body)
                for resource_spans in export.resource_spans:
                    for scope_spans in resource_spans.scope_spans:
                        self.spans.extend((resource_spans.resource, s) for s in scope_spans.spans)
                self.changed.set()
                self.changed = trio.Event()
                answer = ExportTraceServiceResponse().SerializeToString()
                headers = [("content-type", "application/x-protobuf")]
                headers.append(("content-length", str(len(answer))))
                await stream.send_all(
                    connection.send(h11.Response(status_code=200, headers=headers))
                )
                await stream.send_all(connection.send(h11.Data(data=answer)))
                await stream.send_all(connection.send(h11.EndOfMessage()))
                connection.start_next_cycle()
                body = b""


async def test_spans_are_exported_over_otlp_http_to_a_collector(
    start_tether: Callable[..., Any],
    fakes: Fakes,
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    receiver = OtlpReceiver()
    await receiver.start(nursery)
    monkeypatch.setenv(
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", f"http://127.0.0.1:{receiver.port}/v1/traces"
    )
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "20")  # export soon after the task ends
    tether: Tether = await start_tether(otel_traces=True, otel_service_name="tether-test")
    fakes.model.push(TextReply(["Hello ", "there."]))
    task_id = await tether.background(chat_body())
    assert (await tether.events(task_id))[-1]["type"] == "task:completed"

    def names() -> set[str]:
        return {span.name for _, span in receiver.spans}

    with trio.fail_after(WAIT):
        while "tether.task" not in names():
            await receiver.changed.wait()
    by_name = {span.name: (resource, span) for resource, span in receiver.spans}
    assert {"tether.task", "queued", "llm.stream"} <= names()
    resource, root = by_name["tether.task"]
    service = {a.key: a.value.string_value for a in resource.attributes}["service.name"]
    assert service == "tether-test"
    attributes = {a.key: a.value.string_value for a in root.attributes}
    assert (attributes["tether.task.id"], attributes["tether.status"]) == (task_id, "completed")
    for name in ("queued", "llm.stream"):
        child = by_name[name][1]
        assert (child.trace_id, child.parent_span_id) == (root.trace_id, root.span_id)
    assert [e.name for e in by_name["llm.stream"][1].events] == ["first_token"]


async def _two_replicas(
    start_traced: Callable[..., Any], request: pytest.FixtureRequest
) -> tuple[Tether, Tether]:
    """Two traced servers sharing one task space on a real redis-server."""
    redis = request.getfixturevalue("redis_server")
    shared = {
        "backend": "redis",
        "redis_url": redis.url,
        "redis_prefix": "o" + secrets.token_hex(6),
    }
    return await start_traced(**shared), await start_traced(**shared)


async def test_a_stop_through_another_replica_is_a_span_linked_to_the_tasks_trace(
    start_traced: Callable[..., Any],
    fakes: Fakes,
    exporter: InMemorySpanExporter,
    request: pytest.FixtureRequest,
) -> None:
    owner, other = await _two_replicas(start_traced, request)
    fakes.model.push(HangReply())
    task_id = await owner.background(chat_body())
    with trio.fail_after(WAIT):
        await fakes.model.wait_for_request("/v1/chat/completions")
    await _stop(other, task_id)
    tree = await _task_trace(exporter, task_id)

    _assert_root(tree, task_id, status="cancelled", reason="stop")
    sent = next(s for s in exporter.get_finished_spans() if s.name == "tether.stop.send")
    _assert_linked(sent, tree, task_id)


def _assert_linked(span: ReadableSpan, tree: Tree, task_id: str) -> None:
    """``span`` is another replica's own, about the task, linked to the task's root span."""
    assert span.context is not None and tree.root.context is not None
    root = tree.root.context
    assert span.context.trace_id != root.trace_id
    assert [(link.context.trace_id, link.context.span_id) for link in span.links] == [
        (root.trace_id, root.span_id)
    ]
    assert (span.attributes or {})["tether.task.id"] == task_id


async def test_a_resume_through_another_replica_is_a_span_linked_to_the_tasks_trace(
    start_traced: Callable[..., Any],
    fakes: Fakes,
    exporter: InMemorySpanExporter,
    request: pytest.FixtureRequest,
) -> None:
    owner, other = await _two_replicas(start_traced, request)
    fakes.model.push(HangReply())
    created = await owner.client.post(
        "/v1/responses", json={"model": "fake-model", "input": "hi", "background": True}
    )
    assert created.status_code == 200, created.text
    task_id = created.json()["id"]
    with trio.fail_after(WAIT):
        await fakes.model.wait_for_request("/v1/chat/completions")

    # Four readers follow the running task: the SSE events, a Responses stream and a
    # WebSocket subscribe on the other replica, and the SSE events on the owner.
    terminals: dict[str, str] = {}

    async def read_sse(tether: Tether, name: str, url: str, reading: trio.Event) -> None:
        async with tether.client.stream("GET", url) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    reading.set()
                    terminals[name] = json.loads(line[6:])["type"]

    async def read_ws(reading: trio.Event) -> None:
        async with connect(other) as client:
            await client.send({"type": "subscribe", "task_id": task_id, "after": 0})
            await client.events_until_terminal(task_id, stop_when=lambda _: True)
            reading.set()
            terminals["ws"] = (await client.events_until_terminal(task_id))[-1]["type"]

    readers = {name: trio.Event() for name in ("sse", "responses", "ws", "owner")}
    async with trio.open_nursery() as nursery:
        events_url = f"/api/tasks/{task_id}/events?after=0"
        nursery.start_soon(read_sse, other, "sse", events_url, readers["sse"])
        responses_url = f"/v1/responses/{task_id}?stream=true&starting_after=0"
        nursery.start_soon(read_sse, other, "responses", responses_url, readers["responses"])
        nursery.start_soon(read_ws, readers["ws"])
        nursery.start_soon(read_sse, owner, "owner", events_url, readers["owner"])
        with trio.fail_after(WAIT):
            for reading in readers.values():
                await reading.wait()
        await _stop(owner, task_id)
    tree = await _task_trace(exporter, task_id)

    _assert_root(tree, task_id, status="cancelled", reason="stop")
    # Each reader followed the task to its end.
    assert terminals == {
        "sse": "task:cancelled",
        "responses": "response.incomplete",
        "ws": "task:cancelled",
        "owner": "task:cancelled",
    }

    def resumes() -> list[ReadableSpan]:
        return [s for s in exporter.get_finished_spans() if s.name == "tether.resume"]

    async def three_resumes() -> bool:
        return len(resumes()) >= 3

    await until(three_resumes, timeout=WAIT)
    # The other replica's three readers, each its own span linked to the task's root; the
    # owner's reader is none (the task's own trace is the owner's).
    for resumed in resumes():
        _assert_linked(resumed, tree, task_id)
    vias = sorted(str((s.attributes or {})["tether.resume.via"]) for s in resumes())
    assert vias == ["responses", "sse", "ws"]
