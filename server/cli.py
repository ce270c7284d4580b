"""``tether serve``: run the server under hypercorn's trio worker."""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Awaitable, Callable, Mapping
from functools import partial
from pathlib import Path
from typing import cast

import trio
from hypercorn.trio.run import worker_serve
from hypercorn.utils import wrap_app
from quart_trio import QuartTrio

from server.api.connections import ConnectionGuard
from server.api.ws import WsHub
from server.app import create_app
from server.config import FROM_OTEL, Settings, SettingsError, read_dotenv, unknown_variables
from server.library_internals import WatchedConfig, watch_connections
from server.runtime import Runtime, redis_target
from server.tasks.redis import RedisTarget

log = logging.getLogger("tether")


class ListenError(Exception):
    """The server could not bind its address."""


def hypercorn_config(settings: Settings) -> WatchedConfig:
    config = WatchedConfig()
    host = f"[{settings.host}]" if ":" in settings.host else settings.host
    config.bind = [f"{host}:{settings.port}"]
    config.websocket_ping_interval = settings.ws_ping_interval_s or None
    # With several workers, each binds its own socket to the port (SO_REUSEPORT) and the
    # kernel spreads new connections over them.
    config.workers = max(1, settings.workers)
    # Between two requests on a connection; the time a request head may take is
    # TETHER_REQUEST_HEAD_TIMEOUT_S (api/connections.py), from the next request's first byte.
    config.keep_alive_timeout = 75
    # Tasks are stopped as soon as shutdown begins, so their streams end at once. What can
    # outlast that is hypercorn's WebSocket ping loop, which sleeps a whole ping interval
    # after its connection closed: do not wait the default 10 s for it.
    config.graceful_timeout = 3
    config.accesslog = None  # Tether writes its own (access_log.py), when asked
    # hypercorn's own handler on top of the root logger's would print every line twice.
    config.errorlog = logging.getLogger("hypercorn.error")
    return config


# Hypercorn sends WebSocket pings but does not wait for pongs. What makes a vanished peer
# noticed is the kernel: with TCP_USER_TIMEOUT set on the listening socket (accepted
# sockets inherit it), a ping that stays unacknowledged that long aborts the connection,
# the handler sees the disconnect, and the session's grace period starts.
def dead_peer_timeout_ms(settings: Settings) -> int:
    return int(max(settings.ws_ping_interval_s, 1.0) * 1000)


async def serve_app(
    app: QuartTrio,
    settings: Settings,
    *,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the app with hypercorn's trio worker until ``shutdown_trigger`` returns.
    Cancelling it closes every connection (tasks end with reason ``shutdown``)."""
    config = hypercorn_config(settings)
    runtime = cast(Runtime, app.extensions["tether"])
    manager = runtime.manager
    guard = ConnectionGuard(settings, runtime.metrics)
    watch_connections(config, guard)
    hub = cast(WsHub, app.extensions["tether_ws"])

    async def shutdown() -> None:
        if shutdown_trigger is None:
            await trio.sleep_forever()
        else:
            await shutdown_trigger()
        # Stop the tasks first, so that their SSE and sync answers end with a terminal
        # event while hypercorn waits for connections to finish; WebSocket clients get
        # their tasks' terminal events, then a close that tells them to reconnect.
        manager.begin_shutdown()
        with trio.move_on_after(config.graceful_timeout / 2):
            await manager.wait_all_ended()
        hub.close_all()

    try:
        sockets = config.create_sockets()
    except OSError as exc:
        raise ListenError(
            f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}"
        ) from exc
    for sock in sockets.insecure_sockets:
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(
                socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, dead_peer_timeout_ms(settings)
            )
        sock.listen(config.backlog)
    async with trio.open_nursery() as nursery:
        await nursery.start(guard.run)
        await worker_serve(
            wrap_app(app, config.wsgi_max_body_size, None),
            config,
            sockets=sockets,
            shutdown_trigger=shutdown,
            task_status=task_status,
        )
        nursery.cancel_scope.cancel()


async def _termination_signal() -> None:
    """Return on SIGINT or SIGTERM: hypercorn then shuts down gracefully, and running
    tasks end with ``cancel_reason: "shutdown"``."""
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        try:
            return all(
                ipaddress.ip_address(info[4][0]).is_loopback
                for info in socket.getaddrinfo(host, None)
            )
        except OSError:
            return False


# Allocations between two young collections. CPython's default (700) makes a full
# collection follow every ~70,000 net allocations while the heap grows by a quarter, and
# every full collection walks the whole heap: with 1,000 open WebSocket connections and
# their tasks, that measured 19 full collections of ~0.4 s each (up to 1.2 s) in a
# 40 s bench, the server frozen meanwhile. Cyclic garbage here (cancelled tasks, their
# tracebacks) dies young and is still collected by the frequent young collections.
GC_YOUNG_THRESHOLD = 50_000


def tune_garbage_collector() -> None:
    """Fewer, cheaper pauses: a larger young generation, and everything alive at start-up
    (modules, the app) moved out of the collector's view for good."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


def settings_help() -> str:
    """Every TETHER_* variable with its default, for ``--help`` (their meanings are in the
    README's Configuration section and API.md)."""
    lines = ["settings (TETHER_* variables, with their defaults):"]
    defaults = Settings()
    for name in Settings.model_fields:
        if name in FROM_OTEL:
            continue  # OTEL_* decide (the README's Traces section)
        default = getattr(defaults, name)
        if isinstance(default, Mapping | tuple):
            shown = ",".join(map(str, default)) or "(none)"
        elif default is None:
            shown = "(unset)"
        elif isinstance(default, bool):
            shown = "true" if default else "false"
        else:
            shown = str(default)
        lines.append(f"  TETHER_{name.upper():<34} {shown}")
    lines.append("Their meanings: docs/settings.md and API.md in the project.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tether",
        description="Tether chat server. Settings are TETHER_* environment "
        "variables (or a .env file); docs/settings.md and API.md in the project document them.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"tether {importlib.metadata.version('tether')}"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    serve_cmd = sub.add_parser("serve", help="run the server")
    serve_cmd.add_argument("--host", help="address to bind (default TETHER_HOST or 127.0.0.1)")
    serve_cmd.add_argument("--port", type=int, help="port (default TETHER_PORT or 8080)")
    serve_cmd.add_argument(
        "--workers",
        type=int,
        help="worker processes on the one port (default TETHER_WORKERS or "
        "1; more than one needs TETHER_BACKEND=redis)",
    )
    serve_cmd.add_argument(
        "--insecure",
        action="store_true",
        help="allow a non-loopback bind with no API keys configured",
    )
    serve_cmd.add_argument(
        "--access-log",
        metavar="TARGET",
        help="log one line per request to - (stdout), stderr or a file "
        "(default TETHER_ACCESS_LOG, or no access log)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # httpx: one line per upstream request; coredis: one per retried command.
    for noisy in ("httpx2", "httpcore2", "httpx", "httpcore", "coredis"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        environ = {**read_dotenv(Path(".env")), **os.environ}
        settings = Settings.from_env(environ)
    except (SettingsError, OSError) as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    for line in unknown_variables(environ):
        log.warning("%s", line)
    overrides: dict[str, object] = {}
    if args.host:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    if args.insecure:
        overrides["insecure"] = True
    if args.workers is not None:
        overrides["workers"] = args.workers
    if args.access_log:
        overrides["access_log"] = args.access_log
    settings = settings.with_overrides(**overrides)
    if not settings.api_keys and not settings.insecure and not is_loopback(settings.host):
        print(
            "tether: refusing to bind to a non-loopback address with no API keys "
            "(set TETHER_API_KEYS, or pass --insecure)",
            file=sys.stderr,
        )
        return 2
    if settings.workers > 1 and settings.backend != "redis":
        print(
            "tether: --workers needs TETHER_BACKEND=redis (workers share their tasks "
            "through Redis; TETHER_REDIS_URL says where it is)",
            file=sys.stderr,
        )
        return 2
    if settings.workers > 1:
        return run_workers(settings)
    return serve_process(settings)


def serve_process(settings: Settings) -> int:
    """Serve in this process until SIGTERM or SIGINT; the exit status (2: it could not
    start). The supervisor of ``--workers`` runs no trio before it forks: a worker
    inherits none of its state."""
    try:
        app = create_app(settings)
    except SettingsError as exc:
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    if settings.backend == "redis":
        target = redis_target(settings)
        problem = trio.run(check_redis, target)
        if problem is not None:
            print(f"tether: cannot use Redis at {target}: {problem}", file=sys.stderr)
            return 2
    tune_garbage_collector()
    try:
        trio.run(partial(serve_app, app, settings, shutdown_trigger=_termination_signal))
    except ListenError as exc:  # the port is taken, or the address is not ours
        print(f"tether: {exc}", file=sys.stderr)
        return 2
    return 0


def run_workers(settings: Settings) -> int:
    """``--workers N``: N worker processes, each a whole server on the same port, sharing
    task state through Redis. This process only supervises them: a SIGTERM or SIGINT is
    passed on to every worker (which ends its tasks with reason ``shutdown``); a worker
    that dies otherwise is replaced; one that cannot start (exit status 2: the port,
    the settings) stops them all."""
    workers: set[int] = set()
    stopping = False
    status = 0

    def stop_all(signum: int = signal.SIGTERM, frame: object = None) -> None:
        nonlocal stopping
        stopping = True
        for pid in workers:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def start_worker() -> None:
        pid = os.fork()
        if pid == 0:  # the worker: its own process group, so that a terminal's Ctrl-C
            os.setpgid(0, 0)  # reaches it once, through the supervisor
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os._exit(serve_process(settings))
        workers.add(pid)

    signal.signal(signal.SIGTERM, stop_all)
    signal.signal(signal.SIGINT, stop_all)
    for _ in range(settings.workers):
        start_worker()
    log.info("supervising %d workers on %s:%d", settings.workers, settings.host, settings.port)
    while workers:
        try:
            pid, wait_status = os.wait()
        except ChildProcessError:
            break
        workers.discard(pid)
        code = os.waitstatus_to_exitcode(wait_status)
        if stopping:
            continue
        if code == 2:
            status = 2
            stop_all()
            continue
        log.error("worker %d exited with status %d; starting another", pid, code)
        start_worker()
    return status


async def check_redis(target: RedisTarget) -> str | None:
    """Why Redis at ``target`` cannot be used, or None if it answers."""
    from server.tasks.redis import ping

    return await ping(target)


if __name__ == "__main__":
    sys.exit(main())
