"""The runs of ``python -m bench`` that measure something else than the bench's own Tether
server: ``--target URL`` (``bench/target.py``) and ``--peer NAME`` (``bench/peer.py``)."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from bench.peer import PEER_FULL, PEER_QUICK, PEERS, run_peers
from bench.procs import ProcessSet
from bench.progress import Progress
from bench.results import Results
from bench.target import TARGET_FULL, TARGET_QUICK, run_target

__all__ = ["PEERS", "RemoteRun"]


@dataclass
class RemoteRun:
    results: Results
    progress: Progress
    procs: ProcessSet
    run: Callable[[], Awaitable[None]]

    @classmethod
    def prepare(cls, args: argparse.Namespace, nofile: tuple[int, int]) -> RemoteRun:
        progress = Progress(args.quiet)
        if args.target:
            cfg = TARGET_FULL if args.full else TARGET_QUICK
            name = args.name or f"target-{cfg.mode}"
            results = Results(name, cfg.mode)
            results.settings.update(
                {
                    "target": args.target,
                    "api_key": "(given)" if args.api_key else None,
                    "model": args.model,
                }
            )
            run = partial(run_target, args.target, args.api_key, args.model, cfg, progress, results)
            what = f"--target {args.target}"
        else:
            pcfg = PEER_FULL if args.full else PEER_QUICK
            name = args.name or "peers"
            results = Results(name, pcfg.mode)
            results.settings.update({"peer": args.peer})
            what = f"--peer {args.peer}"
        results.settings["rlimit_nofile"] = list(nofile)
        log_dir = Path(tempfile.mkdtemp(prefix=f"tether-bench-{name}-"))
        procs = ProcessSet(log_dir)
        if args.peer:
            run = partial(run_peers, args.peer, pcfg, procs, progress, results)
        progress.step(f"{results.mode} run {name!r}: {what}; process logs in {log_dir}")
        return cls(results, progress, procs, run)
