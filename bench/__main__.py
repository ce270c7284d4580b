"""``python -m bench --quick | --full [--scenario NAME ...] [--name NAME] [--profile]``,
``python -m bench --target URL [--api-key KEY] [--model NAME]`` or ``--peer litellm``.

Starts the fakes, the Tether server and the payload-first baseline as separate processes on
127.0.0.1, runs the scenarios, writes ``bench/results/<name>.json``, ``<name>.md`` and one PNG
chart per scenario, and ends every process it started by its pid. Exits 1 when a check
failed (events lost or out of order, tasks or connections left behind, errors).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import resource
import signal
import sys
import tempfile
import traceback
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import trio

from bench.config import FULL, QUICK, RUN_ORDER, SCENARIOS, BenchConfig
from bench.context import Bench
from bench.procs import ProcessSet
from bench.progress import Progress
from bench.remote_run import PEERS, RemoteRun
from bench.results import RESULTS_DIR, Results


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--quick", action="store_true", help="under 3 minutes on 2 cores (the default)"
    )
    mode.add_argument("--full", action="store_true", help="the full sample counts and levels")
    parser.add_argument(
        "--scenario",
        action="append",
        choices=SCENARIOS,
        metavar="NAME",
        help=f"run only this scenario (repeatable): {', '.join(SCENARIOS)}",
    )
    parser.add_argument("--name", help="results name (default: quick or full)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="run the server (and replica B of the replicas and followers scenarios) under "
        "pyinstrument; the text reports go to bench/results/<name>-profile*.txt",
    )
    parser.add_argument(
        "--max-workers", type=int, default=0, help="workers scenario: up to N (default: cores)"
    )
    parser.add_argument(
        "--followers-redis",
        action="append",
        type=_followers_setup,
        metavar="SETUP",
        help="followers scenario: the Redis of a pair of replicas (repeatable, each level runs "
        "on each): one (the default), cluster, or cluster:N (TETHER_REDIS_FOLLOW_READS=N)",
    )
    parser.add_argument("--no-charts", action="store_true", help="skip the PNG charts")
    parser.add_argument("--quiet", action="store_true", help="no progress lines")
    # Measuring another deployment, or a peer gateway beside Tether (bench/remote_run.py).
    parser.add_argument(
        "--target",
        metavar="URL",
        help="measure this deployment (the scenarios that need no fake upstream) instead",
    )
    parser.add_argument("--api-key", help="with --target: sent as Authorization: Bearer")
    parser.add_argument("--model", help="with --target: the model to ask (default: its first)")
    parser.add_argument(
        "--peer",
        choices=PEERS,
        help="install this gateway pinned under .tools/ and measure it beside Tether",
    )
    return parser.parse_args(argv)


def _followers_setup(spec: str) -> str:
    from bench.redis_clients import parse_setup

    try:
        parse_setup(spec)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return spec


async def until_signal(
    results: Results, progress: Progress, body: Callable[[], Awaitable[None]]
) -> None:
    """Run ``body``, cancelled by SIGTERM or SIGHUP (recorded as an error)."""
    async with trio.open_nursery() as nursery:

        async def on_sigterm() -> None:
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGHUP) as signals:
                async for signum in signals:
                    results.errors.append(f"interrupted by signal {signum}")
                    progress.warn("interrupted: stopping")
                    nursery.cancel_scope.cancel()
                    return

        nursery.start_soon(on_sigterm)
        await body()
        nursery.cancel_scope.cancel()


async def run_all(b: Bench, scenarios: list[str]) -> None:
    await until_signal(b.results, b.progress, partial(run_scenarios, b, scenarios))


async def run_scenarios(b: Bench, scenarios: list[str]) -> None:
    b.progress.section("start-up")
    await b.start()
    b.results.settings["server_env"] = b.main_server_env()
    if b.mcp_config is not None:
        b.results.settings["mcp_config"] = b.mcp_config
    b.results.settings["model_id"] = b.model_id
    b.results.settings["websocket"] = b.ws_available
    b.results.settings["server_rss_at_start_mb"] = round(b.rss_at_start_mb, 1)
    for name in scenarios:
        b.progress.section(name)
        module = importlib.import_module(f"bench.scenarios.{name}")
        try:
            await module.run(b)
        except Exception as exc:
            b.results.errors.append(f"{name} crashed: {type(exc).__name__}: {exc}")
            b.progress.warn(f"{name} crashed: {exc!r}")
            traceback.print_exc()
        if not b.tether.alive():
            b.results.errors.append(f"the server exited during {name}:\n{b.tether.log_tail()}")
            break
        b.results.write_json()


def raise_fd_limit() -> tuple[int, int]:
    """Raise this process's open-file limit to its hard limit; the children inherit it (the
    waiting-tasks level holds over 2,000 WebSocket connections, each with an upstream)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    nofile = raise_fd_limit()
    if args.target or args.peer:
        remote = RemoteRun.prepare(args, nofile)
        return finish(
            partial(until_signal, remote.results, remote.progress, remote.run),
            remote.results,
            remote.progress,
            remote.procs,
            charts=not args.no_charts,
        )
    cfg: BenchConfig = FULL if args.full else QUICK
    if args.max_workers:
        cfg = dataclasses.replace(cfg, workers_max=args.max_workers)
    if args.followers_redis:
        cfg = dataclasses.replace(cfg, followers_redis=tuple(args.followers_redis))
    name = args.name or cfg.mode
    scenarios = args.scenario or list(RUN_ORDER)
    progress = Progress(args.quiet)
    results = Results(name, cfg.mode)
    results.settings.update(
        {"config": cfg.to_json(), "scenarios": scenarios, "rlimit_nofile": list(nofile)}
    )
    log_dir = Path(tempfile.mkdtemp(prefix=f"tether-bench-{name}-"))
    procs = ProcessSet(log_dir)
    b = Bench(cfg, progress, procs, results)
    # The stop-latency scenario's MCP rows need MCP servers; no other scenario uses them.
    b.with_mcp = "stop_latency" in scenarios
    if args.profile:
        b.profile_path = str(RESULTS_DIR / f"{name}-profile.txt")
    progress.step(f"{cfg.mode} run {name!r}: {', '.join(scenarios)}; process logs in {log_dir}")
    return finish(partial(run_all, b, scenarios), results, progress, procs, not args.no_charts)


def finish(
    runner: Callable[[], Awaitable[None]],
    results: Results,
    progress: Progress,
    procs: ProcessSet,
    charts: bool,
) -> int:
    """Run, end every process the run started, write the outputs; the exit status."""
    try:
        trio.run(runner)
    except BaseException as exc:  # report whatever broke, then clean up below
        interrupted = isinstance(exc, KeyboardInterrupt) or (
            isinstance(exc, BaseExceptionGroup) and exc.subgroup(KeyboardInterrupt) is not None
        )
        if interrupted:
            results.errors.append("interrupted (SIGINT)")
            progress.warn("interrupted")
        else:
            results.errors.append(f"bench failed: {type(exc).__name__}: {exc}")
            traceback.print_exc()
    finally:
        progress.step("stopping every process the bench started")
        procs.kill_all()
    from bench.report import write_outputs

    paths = write_outputs(results, charts=charts)
    for path in paths:
        progress.step(f"wrote {path}")
    for check in results.checks:
        if not check.ok:
            progress.warn(f"check failed: {check.name}: {check.detail}")
    for error in results.errors:
        progress.warn(error.splitlines()[0])
    progress.step(f"{'OK' if results.ok else 'FAILED'} in {progress.elapsed():.0f} s")
    return 0 if results.ok else 1


if __name__ == "__main__":
    sys.exit(main())
