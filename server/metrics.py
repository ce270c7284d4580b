"""Prometheus metrics, one registry per app so that several apps can live in one process."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.tasks_active = Gauge(
            "tether_tasks_active", "Tasks running now, by phase", ["phase"], registry=self.registry
        )
        self.tasks_total = Counter(
            "tether_tasks",
            "Tasks ended, by mode and final status",
            ["mode", "status"],
            registry=self.registry,
        )
        self.time_to_task_id = Histogram(
            "tether_time_to_task_id_seconds",
            "From a chat request's arrival to its task being admitted and answered",
            ["transport"],
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
            registry=self.registry,
        )
        self.stop_seconds = Histogram(
            "tether_stop_seconds",
            "From a stop reaching the task's process to every connection of the task closed",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0),
            registry=self.registry,
        )
        self.cancels = Counter(
            "tether_task_cancels",
            "Tasks cancelled, by reason and phase",
            ["reason", "phase"],
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "tether_upstream_errors",
            "Failures of the outside world, by kind",
            ["kind"],
            registry=self.registry,
        )
        self.loop_busy = Gauge(
            "tether_loop_busy_ratio",
            "CPU time of the event loop's thread over wall time, smoothed",
            registry=self.registry,
        )
        self.read_pause = Gauge(
            "tether_model_read_pause_seconds",
            "Pause between two reads of a model stream (0 unless the loop is busy)",
            registry=self.registry,
        )
        self.store_reachable = Gauge(
            "tether_task_store_reachable",
            "1 while this process is sure the shared task store hears it (its heartbeat is "
            "current; always 1 on the memory backend), else 0: not ready, readers let go",
            registry=self.registry,
        )
        self.rejected = Counter(
            "tether_tasks_rejected",
            "Requests refused by admission",
            ["reason"],
            registry=self.registry,
        )

        self.connections_open = Gauge(
            "tether_connections_open",
            "Client connections (HTTP and WebSocket) open now in this process",
            registry=self.registry,
        )
        self.connections_refused = Counter(
            "tether_connections_refused",
            "Client connections refused at opening, by the limit they met",
            ["reason"],
            registry=self.registry,
        )
        self.request_timeouts = Counter(
            "tether_request_timeouts",
            "Requests ended because the client sent them too slowly, by part (head, body)",
            ["part"],
            registry=self.registry,
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)
