"""What a quick and a full run measure: sample counts, levels, delays."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCENARIOS = (
    "time_to_task_id",
    "stop_latency",
    "disconnect",
    "scale",
    "waiting",
    "cancel_storm",
    "replicas",
    "responses",
    "steering",
    "followers",
    "workers",
)
# Scale runs first so that its memory per task is measured from a server that has not yet
# grown its heap (Python keeps freed memory for reuse, so RSS only shows a high-water mark).
# Replicas runs last: it starts its own Redis and Tether processes and ends them after.
# Workers (a server per worker count, up to every core) runs only when named (--scenario).
RUN_ORDER = (
    "scale",
    "waiting",
    "time_to_task_id",
    "stop_latency",
    "disconnect",
    "responses",
    "steering",
    "cancel_storm",
    "replicas",
    "followers",
)


@dataclass(frozen=True)
class BenchConfig:
    mode: str
    # 1. time-to-task-id
    search_delays_s: tuple[float, ...] = (0.0, 10.0, 30.0)
    ttid_sequential: int = 500  # Tether samples per delay, one client, interleaved with the floor
    ttid_concurrent_clients: int = 50
    ttid_concurrent_rounds: int = 10  # requests per concurrent client per delay
    payload_first_sequential: int = 500  # at delay 0, interleaved like Tether's samples
    payload_first_delayed: int = 20  # at delays > 0, sent concurrently (each takes ~delay)
    ws_chat_samples: int = 500
    # 2. stop latency, 3. disconnect latency
    stop_samples: int = 30  # per phase and transport
    disconnect_samples: int = 30  # per client kind and phase
    # 4. scale
    scale_levels: tuple[int, ...] = (1, 10, 30, 100, 300, 1000)  # at scale_rate
    scale_tokens: int = 200
    scale_rate: float = 50.0
    # (tasks, tokens/s, tokens): many slow streams
    # 60 tokens: 12 s of streaming, so that the steady state outlasts the ramp of 1,000 chats
    scale_slow_levels: tuple[tuple[int, float, int], ...] = ((1000, 5.0, 60),)
    scale_unbatched_levels: tuple[int, ...] = (100,)  # Tether without ?batch=1
    scale_floor_levels: tuple[int, ...] = (100, 300)  # the same streams on the relay floor
    scale_floor_slow: bool = True  # the slow levels on the relay floor too
    scale_max_workers: int = 4  # WebSocket client worker processes
    scale_probe_interval_s: float = 0.02
    # 6. waiting tasks
    waiting_tasks: int = 2000  # tasks held in a web search, each with its own WS client
    waiting_search_delay_s: float = 30.0
    waiting_streams: int = 50  # streaming beside them at scale_rate
    # 5. cancel storm
    storm_tasks: int = 10_000
    storm_concurrency: int = 200
    storm_max_delay_s: float = 1.5
    # 7. replicas on one Redis (and ``serve --workers 2``)
    replica_stop_samples: int = 300  # per arm: stop via the task's replica / via the other
    replica_resume_samples: int = 200  # per arm: subscribe on the task's replica / the other
    replica_scale_levels: tuple[int, ...] = (100, 300)  # tasks, at scale_rate, scale_tokens
    # 8. the Responses API
    responses_sequential: int = 500  # per body, one client, interleaved with the floor
    responses_concurrent_clients: int = 20
    responses_concurrent_rounds: int = 10  # per client
    responses_cancel_samples: int = 30  # per phase and arm (Responses cancel, task stop)
    responses_resume_samples: int = 200  # per log length, interleaved with fresh and floor
    responses_resume_tokens: tuple[int, ...] = (200, 2000)  # the completed responses' lengths
    # 9. steering: skips and deadlines
    steering_samples: int = 40  # per step kind and arm (skip, stop, deadline, floor)
    steering_deadline_s: float = 0.2  # deadlines.web_search_s and deadlines.tools_s
    # 10. followers on replica B of tasks running on replica A
    followers_tasks: int = 100  # streaming on A
    followers_rate: float = 5.0  # tokens/s of each task
    followers_tokens: int = 60  # 12 s at 5/s
    followers_on_a: int = 1  # per task: A's own followers (the floor)
    followers_on_b: tuple[int, ...] = (1, 10)  # per task, one level each: 100 and 1,000 on B
    # The Redis of each pair of replicas, every level run on each: "one" (one redis-server),
    # "cluster" (the tests' six-node Redis Cluster), "cluster:N" (TETHER_REDIS_FOLLOW_READS=N)
    followers_redis: tuple[str, ...] = ("one",)
    # 11. workers: --workers N on Redis for N = 1, 2, ... up to the cores (or workers_max)
    workers_streams: int = 100  # per worker, at scale_rate: the load grows with N
    workers_tokens: int = 300  # 6 s at 50/s
    workers_max: int = 0  # 0: os.cpu_count()
    # server settings the bench runs with (TETHER_* environment)
    server_env: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


_SERVER_ENV = {
    "TETHER_SEARCH_PROVIDER": "searxng",
    "TETHER_SEARCH_QUERY_GENERATION": "false",
    "TETHER_SEARCH_FETCH_PAGES": "true",
    "TETHER_SEARCH_RESULT_COUNT": "3",
    "TETHER_LLM_API_KEY": "bench-key",
    # The fakes are on 127.0.0.1, which page fetches refuse by default.
    "TETHER_FETCH_ALLOW_PRIVATE": "true",
    # Admission limits out of the way: the bench measures, it does not test 429s.
    "TETHER_MAX_ACTIVE_TASKS": "50000",
    "TETHER_MAX_ACTIVE_TASKS_PER_USER": "50000",
    # Ended tasks expire quickly so that the cancel storm can check memory afterwards.
    "TETHER_TASK_RETENTION_S": "5",
    # The default pool (200) would cap concurrent upstream requests (model streams, the
    # waiting scenario's 2,000 pending searches) below what the bench holds open at once.
    "TETHER_HTTP_MAX_CONNECTIONS": "3000",
}

FULL = BenchConfig(mode="full", server_env=dict(_SERVER_ENV))

QUICK = BenchConfig(
    mode="quick",
    ttid_sequential=150,
    ttid_concurrent_rounds=4,
    payload_first_sequential=150,
    payload_first_delayed=5,
    ws_chat_samples=100,
    stop_samples=8,
    disconnect_samples=8,
    scale_levels=(1, 10, 30, 100, 300),
    scale_tokens=200,  # 4 s of streaming: enough probe samples for a p99
    storm_tasks=1000,
    storm_concurrency=100,
    replica_stop_samples=100,
    replica_resume_samples=50,
    replica_scale_levels=(100,),
    responses_sequential=150,
    responses_concurrent_rounds=4,
    responses_cancel_samples=8,
    responses_resume_samples=40,
    steering_samples=12,
    followers_tasks=50,
    followers_tokens=40,
    followers_on_b=(2, 10),  # 100 and 500 on B
    server_env=dict(_SERVER_ENV),
)
