"""Traces (OpenTelemetry): a trace per task, a span per phase, off unless configured.

Whether tracing is on is decided once, at start-up, from the standard ``OTEL_*`` variables
(``config.Settings.from_env``): off, the task manager never opens a task span, and every
other span here is a look-up of one context variable that finds nothing. Nothing is done
per event or per token either way: spans are per task, per step and per model call.

Who may open a span, and under which parent, follows trio's tasks. The task manager opens
the task's root span (``TaskSpan``) in the trio task that runs the task and makes it
current there, with the tracer, in context variables; trio copies a task's context into
every child started with ``start_soon``, so the steps, searches, page reads, tool calls and
model streams of the task, wherever they run in its nurseries, find their parent and the
tracer in their own context, and open and end their spans in the one trio task that runs
them. A span ended by a cancel asks the task (through the same context) whether a stop
did it, so that it says "cancelled" with the stop's reason and latency instead of an error.

Trace context leaves through a ``traceparent`` header on each outgoing HTTP request, set by
an httpx2 event hook (``send_trace_context``) on clients built while tracing is on, and in
an MCP call's ``_meta`` (``trace_meta``), which the MCP HTTP client also copies to the
header: the SDK sends requests from its session's tasks, where the task's context is not.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, MutableMapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import trio
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode, Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from server.exception_groups import first_leaf

log = logging.getLogger("tether.tracing")

Attributes = Mapping[str, str | int | float | bool]
# How a reader resumed a task: its SSE events, a Responses stream, a WebSocket subscribe.
ResumeVia = Literal["sse", "responses", "ws"]

# W3C trace context only (no baggage): Tether forwards where a span runs, nothing else.
_PROPAGATOR = TraceContextTextMapPropagator()


class StopSource(Protocol):
    """What a cut span asks its task: whether a stop came, why, and when (trio's clock).
    The task manager's ``RunningTask`` is one."""

    @property
    def cancel_reason(self) -> str | None: ...

    @property
    def stop_received(self) -> float | None: ...


@dataclass(frozen=True)
class _TaskContext:
    tracer: Tracer
    stops: StopSource


# The tracer and the stop source of the task the current trio task works for; None when
# tracing is off or outside a task.
_TASK: ContextVar[_TaskContext | None] = ContextVar("tether_task_trace", default=None)
_NO_SPAN: AbstractContextManager[None] = nullcontext()


class Tracing:
    """The server's tracer, or none: built once at start-up (``build_tracing``)."""

    def __init__(self, provider: TracerProvider | None, *, owned: bool = False) -> None:
        self.provider = provider
        self.enabled = provider is not None
        self._tracer = provider.get_tracer("tether") if provider is not None else None
        # A provider built here is shut down here; one given (a test's) is its owner's.
        self._owned = owned

    def start_task(
        self,
        *,
        task_id: str,
        user: str,
        mode: str,
        model: str,
        parent: str | None,
        admitted_ns: int,
        stops: StopSource,
    ) -> TaskSpan | None:
        """The task's root span, begun at its admission (``admitted_ns``, epoch ns) as a
        child of the caller's ``traceparent`` if one came; None when tracing is off."""
        if self._tracer is None:
            return None
        return TaskSpan(
            self._tracer,
            attributes={
                "tether.task.id": task_id,
                "tether.user": user,
                "tether.mode": mode,
                "tether.model": model,
            },
            parent=parent,
            admitted_ns=admitted_ns,
            stops=stops,
        )

    def linked_span(
        self, name: str, task_trace: str | None, attributes: Attributes
    ) -> AbstractContextManager[Span | None]:
        """A span of this process's own about a task run elsewhere (a stop, a resume),
        linked to that task's trace (its root span's ``traceparent``). It is not made the
        current span: its block opens none of its own, and a block that is an async
        generator's (a resumed stream) may be closed from another context than the one it
        began in, where resetting a context variable would fail."""
        if self._tracer is None:
            return _NO_SPAN
        linked = _span_context(task_trace)
        links = [Link(linked)] if linked is not None else []
        return _span(self._tracer, name, attributes, links=links, stops=None, current=False)

    async def aclose(self) -> None:
        """Export what is left and stop the exporter (in a thread: the exporter's HTTP is
        blocking). Cancelling it abandons the thread, which still finishes its export."""
        if self.provider is not None and self._owned:
            await trio.to_thread.run_sync(self.provider.shutdown, abandon_on_cancel=True)


def build_tracing(enabled: bool, service_name: str) -> Tracing:
    """The server's tracing as decided at start-up: off, or an SDK provider exporting over
    OTLP/HTTP in batches from a thread of its own. The SDK reads the rest of the ``OTEL_*``
    variables (endpoint, headers, sampler, batch sizes) as it builds these, once."""
    if not enabled:
        return Tracing(None)
    # Imported only when on: the exporter brings requests and protobuf with it.
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

    provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    log.info("traces are exported over OTLP/HTTP as service %s", service_name)
    return Tracing(provider, owned=True)


class TaskSpan:
    """A task's root span (``tether.task``) and its ``queued`` child. The manager makes it
    current for the task's run (``activate``) and ends it with the task's outcome."""

    def __init__(
        self,
        tracer: Tracer,
        *,
        attributes: Attributes,
        parent: str | None,
        admitted_ns: int,
        stops: StopSource,
    ) -> None:
        parent_context = _PROPAGATOR.extract({"traceparent": parent}) if parent else None
        self.span = tracer.start_span(
            "tether.task",
            context=parent_context,
            kind=SpanKind.SERVER,
            attributes=attributes,
            start_time=admitted_ns,
        )
        # Admission to start: the task span and this one begin at the admission; this one
        # ends now, as the task begins to run.
        queued = tracer.start_span(
            "queued", context=trace.set_span_in_context(self.span), start_time=admitted_ns
        )
        queued.end()
        self._context = _TaskContext(tracer, stops)
        self.traceparent = traceparent_of(self.span)

    @contextmanager
    def activate(self) -> Iterator[None]:
        """Make the task span the current one, and the tracer the task's, for the block."""
        token = _TASK.set(self._context)
        try:
            with trace.use_span(self.span, end_on_exit=False, record_exception=False):
                yield
        finally:
            _TASK.reset(token)

    def end(
        self,
        *,
        status: str,
        cancel_reason: str | None,
        finish_reason: str | None,
        stop_ms: float | None,
        error_type: str | None,
    ) -> None:
        span = self.span
        span.set_attribute("tether.status", status)
        if cancel_reason is not None:
            span.set_attribute("tether.cancel_reason", cancel_reason)
        if finish_reason is not None:
            span.set_attribute("tether.finish_reason", finish_reason)
        if status == "cancelled":
            event: dict[str, str | float] = {"reason": cancel_reason or "shutdown"}
            if stop_ms is not None:
                event["stop_ms"] = stop_ms
            span.add_event("tether.stop", event)
            span.set_status(Status(StatusCode.ERROR, f"cancelled ({cancel_reason})"))
        elif status == "failed":
            span.set_status(Status(StatusCode.ERROR, f"failed ({error_type})"))
        span.end()


def span(name: str, attributes: Attributes | None = None) -> AbstractContextManager[Span | None]:
    """A child span of the current one for the block, in the task's trace; a block that a
    cancel ends marks it cut (see ``mark_cancelled``). Outside a traced task, nothing: the
    block gets None."""
    task = _TASK.get()
    if task is None:
        return _NO_SPAN
    return _span(task.tracer, name, attributes, links=(), stops=task.stops)


@contextmanager
def _span(
    tracer: Tracer,
    name: str,
    attributes: Attributes | None,
    *,
    links: list[Link] | tuple[()],
    stops: StopSource | None,
    current: bool = True,
) -> Iterator[Span]:
    opened = tracer.start_span(name, attributes=attributes, links=links)
    try:
        if current:
            with trace.use_span(
                opened, end_on_exit=False, record_exception=False, set_status_on_exception=False
            ):
                yield opened
        else:
            yield opened
    except BaseException as exc:
        # A generator closed before its end (a reader that left) is cut as a cancel is.
        if isinstance(first_leaf(exc), (trio.Cancelled, GeneratorExit)):
            mark_cancelled(opened, stops)
        else:
            opened.record_exception(exc)
            opened.set_status(Status(StatusCode.ERROR, type(exc).__name__))
        raise
    finally:
        opened.end()


def mark_cancelled(span: Span, stops: StopSource | None = None) -> None:
    """Mark a span that a cancel ended: with the task's stop if one came (an event
    ``tether.stop`` with the reason and the stop's latency so far), else as cancelled by
    an enclosing step's skip or deadline."""
    stops = stops if stops is not None else _current_stops()
    reason = stops.cancel_reason if stops is not None else None
    if stops is None or reason is None:
        span.set_status(Status(StatusCode.ERROR, "cancelled"))
        return
    event: dict[str, str | float] = {"reason": reason}
    if stops.stop_received is not None:
        event["stop_ms"] = round((trio.current_time() - stops.stop_received) * 1000, 3)
    span.add_event("tether.stop", event)
    span.set_status(Status(StatusCode.ERROR, f"cancelled ({reason})"))


def mark_cut(span: Span, cut: str, by: str | None) -> None:
    """Mark a step's span that a skip or its deadline ended (the code around it went on)."""
    if cut == "skipped":
        span.add_event("tether.skip", {"by": by} if by is not None else {})
        span.set_status(Status(StatusCode.ERROR, "skipped"))
    else:
        span.add_event("tether.deadline")
        span.set_status(Status(StatusCode.ERROR, "deadline"))


def _current_stops() -> StopSource | None:
    task = _TASK.get()
    return None if task is None else task.stops


def traceparent_of(span: Span) -> str | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier, context=trace.set_span_in_context(span))
    return carrier.get("traceparent")


def _span_context(traceparent: str | None) -> trace.SpanContext | None:
    if not traceparent:
        return None
    context = _PROPAGATOR.extract({"traceparent": traceparent})
    span_context = trace.get_current_span(context).get_span_context()
    return span_context if span_context.is_valid else None


def inject(carrier: MutableMapping[str, str]) -> None:
    """Put the current span's ``traceparent`` in ``carrier`` (nothing outside a span)."""
    _PROPAGATOR.inject(carrier, context=otel_context.get_current())


async def send_trace_context(request: Any) -> None:
    """An httpx2 request hook: the request carries the span it runs in."""
    inject(request.headers)


def trace_meta() -> dict[str, str] | None:
    """An MCP request's ``_meta`` with the current span's ``traceparent``; None outside a
    traced task."""
    if _TASK.get() is None:
        return None
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier or None


def now_ns() -> int:
    """The wall clock in epoch nanoseconds, as spans take their times."""
    return time.time_ns()
