"""The bench's child processes: loopback fakes, the Tether server, the payload-first baseline.

Each child is a real process started with ``subprocess.Popen`` from the repository root, its
output going to a log file. ``ProcessSet.kill_all`` ends every child by its pid (SIGTERM, then
SIGKILL after a grace period); ``__main__`` calls it from a ``finally`` outside ``trio.run`` and
from a SIGTERM handler, and Linux children also get PR_SET_PDEATHSIG so that a bench killed
with SIGKILL does not leave them behind. A child that forks its own workers (``tether serve
--workers N``) is marked ``forks``: the workers it was seen with are ended by their pids
after it (a fork does not inherit PR_SET_PDEATHSIG). So are the processes a child started
itself and that outlive it (a Tether server's stdio MCP servers), taken just before it is
ended.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil  # type: ignore[import-untyped]
import trio

REPO_ROOT = Path(__file__).resolve().parent.parent
PR_SET_PDEATHSIG = 1


class ProcessError(RuntimeError):
    pass


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def free_port() -> int:
    """A port that was free a moment ago on 127.0.0.1 (for servers that print no port)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    port: int = 0
    interrupt_first: bool = False  # SIGINT before SIGTERM (lets a profiler write its report)
    forks: bool = False  # a supervisor whose forked children do the work (``--workers N``)
    forked: dict[int, psutil.Process] = field(default_factory=dict)  # every child seen

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.popen.poll() is None

    def processes(self) -> list[psutil.Process]:
        """The process, then (if it ``forks``) its current children by pid, which are
        remembered so that ``ProcessSet.kill`` can end them. Raises ``psutil.Error`` when
        the process is gone."""
        main = psutil.Process(self.pid)
        if not self.forks:
            return [main]
        children = sorted(main.children(), key=lambda p: p.pid)
        self.forked.update((child.pid, child) for child in children)
        return [main, *children]

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


@dataclass
class ProcessSet:
    log_dir: Path
    procs: list[Proc] = field(default_factory=list)

    def spawn(
        self,
        name: str,
        args: list[str],
        env: dict[str, str] | None = None,
        *,
        interrupt_first: bool = False,
        program: str | None = None,
    ) -> Proc:
        """Start ``python <args>`` (or ``program <args>``), output to ``<name>.log``."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        child_env["PYTHONUNBUFFERED"] = "1"
        child_env.update(env or {})
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                [program or sys.executable, *args],
                cwd=REPO_ROOT,
                env=child_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        proc = Proc(name, popen, log_path, interrupt_first=interrupt_first)
        self.procs.append(proc)
        return proc

    def spawn_piped(self, name: str, args: list[str]) -> Proc:
        """Start a child whose stdin and stdout are pipes to the bench (stderr to its log)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        child_env = {k: v for k, v in os.environ.items() if not k.startswith("TETHER_")}
        child_env["PYTHONUNBUFFERED"] = "1"
        with open(log_path, "wb") as log:
            popen = subprocess.Popen(
                [sys.executable, *args],
                cwd=REPO_ROOT,
                env=child_env,
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.PIPE,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    def adopt(self, name: str, popen: subprocess.Popen[bytes], log_path: Path) -> Proc:
        """Take in a child started elsewhere (the test suite's Redis Cluster starts its own
        nodes), so that it is ended by its pid with the others and its CPU is counted. It
        has no PR_SET_PDEATHSIG: a bench killed with SIGKILL leaves it behind."""
        proc = Proc(name, popen, log_path)
        self.procs.append(proc)
        return proc

    async def start_fake(self, name: str, module: str, timeout: float = 20.0) -> Proc:
        """Start ``python -m <module> --port 0`` and wait for its ``READY <port>`` line."""
        proc = self.spawn(name, ["-m", module, "--port", "0", "--host", "127.0.0.1"])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in proc.log_path.read_text(errors="replace").splitlines():
                if line.startswith("READY "):
                    proc.port = int(line.split()[1])
                    return proc
            if not proc.alive():
                raise ProcessError(f"{name} exited early:\n{proc.log_tail()}")
            await trio.sleep(0.02)
        raise ProcessError(f"{name} printed no READY line in {timeout} s:\n{proc.log_tail()}")

    def kill(self, proc: Proc, grace: float | None = None) -> None:
        """End one child by its pid: SIGINT (if asked) / SIGTERM, then SIGKILL after
        ``grace`` seconds (longer when a profiler has a report to write); then any of its
        forked workers, or other processes it started, still running, by their pids."""
        if grace is None:
            grace = 30.0 if proc.interrupt_first else 3.0
        # Whatever the child started itself (a Tether server's stdio MCP servers), taken
        # while it is still their parent: ended by pid after it if still running.
        started: list[psutil.Process] = []
        if proc.alive():
            with contextlib.suppress(psutil.Error):
                if proc.forks:
                    proc.processes()
                started = psutil.Process(proc.pid).children(recursive=True)
        self._end(proc, grace)
        every = {p.pid: p for p in [*proc.forked.values(), *started]}
        left = [p for p in every.values() if p.is_running()]
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.terminate()
        _, alive = psutil.wait_procs(left, timeout=grace)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(alive, timeout=grace)

    def end(self, proc: Proc, grace: float | None = None) -> None:
        """End one child (``kill``) and forget it."""
        self.kill(proc, grace)
        if proc in self.procs:
            self.procs.remove(proc)

    def _end(self, proc: Proc, grace: float) -> None:
        if proc.popen.poll() is not None:
            return
        signals = [signal.SIGINT, signal.SIGTERM] if proc.interrupt_first else [signal.SIGTERM]
        for sig in signals:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, sig)
            try:
                proc.popen.wait(timeout=grace)
                return
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(timeout=grace)

    def kill_all(self) -> None:
        for proc in reversed(self.procs):
            self.kill(proc)
            for pipe in (proc.popen.stdin, proc.popen.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
        self.procs.clear()
