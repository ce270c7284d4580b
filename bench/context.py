"""The running bench: its processes, the clients that talk to them, and shared helpers."""

from __future__ import annotations

import contextlib
import itertools
import json
import sys
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import psutil  # type: ignore[import-untyped]
import trio

from bench.config import BenchConfig
from bench.fakes import FakeControl
from bench.httpclient import HttpConnection, HttpError, get_json
from bench.mcp_fake import McpFakeControl, start_mcp_fake
from bench.procs import REPO_ROOT, Proc, ProcessError, ProcessSet, free_port
from bench.progress import Progress
from bench.remote import machine_busy_s
from bench.results import Results
from bench.wsclient import ws_client

# Library frames a profile shows instead of folding them away (the hot paths run there).
PROFILE_SHOW = r".*/(hypercorn|quart_trio|wsproto|h11|httpx2|httpcore2)/.*"
# The model fake's answer for ordinary tasks: short, instant.
DEFAULT_REPLY: dict[str, Any] = {"kind": "text", "chunks": ["Hello", " from", " the", " fake."]}
# The MCP servers of the bench's own Tether server (``Bench.with_mcp``), by their names in
# TETHER_MCP_CONFIG, which are also the labels of their records: the test fake
# (fakes/mcp_server.py) as a stdio server that Tether starts, and over streamable HTTP
# in the ``mcp_http`` child (bench/mcp_fake.py).
MCP_STDIO = "stdio"
MCP_HTTP = "http"


@dataclass
class Bench:
    cfg: BenchConfig
    progress: Progress
    procs: ProcessSet
    results: Results
    server: Proc | None = None
    payload_first: Proc | None = None
    relay_floor: Proc | None = None
    search: FakeControl | None = None
    pages: FakeControl | None = None
    model: FakeControl | None = None
    # MCP servers for the stop-latency scenario's MCP rows: only when it runs, and only for
    # the bench's own server (it connects to them at start-up; they idle otherwise).
    with_mcp: bool = False
    mcp: McpFakeControl | None = None
    mcp_config: dict[str, Any] | None = None
    mcp_config_path: str | None = None
    model_id: str = "fake-model"
    ws_available: bool = False
    profile_path: str | None = None
    rss_at_start_mb: float = 0.0
    _ids: itertools.count[int] = field(default_factory=itertools.count)

    # -- start-up -------------------------------------------------------------------------

    async def start(self) -> None:
        fakes: dict[str, Proc] = {}

        async def start_fake(name: str, module: str) -> None:
            fakes[name] = await self.procs.start_fake(name, module)

        async def start_mcp() -> None:
            self.mcp = await start_mcp_fake(self.procs, "mcp_http", MCP_HTTP)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(start_fake, "search", "fakes.search")
            nursery.start_soon(start_fake, "pages", "fakes.pages")
            nursery.start_soon(start_fake, "model", "fakes.model")
            if self.with_mcp:
                nursery.start_soon(start_mcp)
        self.search = FakeControl("search", fakes["search"].port)
        self.pages = FakeControl("pages", fakes["pages"].port)
        self.model = FakeControl("model", fakes["model"].port)
        await self.reset_fakes()
        self.progress.step(
            f"fakes up: search :{self.search.port}, pages :{self.pages.port}, "
            f"model :{self.model.port}"
        )
        if self.mcp is not None:
            self._write_mcp_config(self.mcp)
            self.progress.step(
                f"MCP fakes: {MCP_HTTP} at {self.mcp.http_url} (pid "
                f"{self.mcp.proc.pid}), {MCP_STDIO} started by Tether, "
                f"recording to :{self.mcp.record_port}; config "
                f"{self.mcp_config_path}"
            )
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._start_server)
            nursery.start_soon(self._start_payload_first)
            nursery.start_soon(self._start_relay_floor)
        await self._discover_model()
        self.ws_available = await self._probe_ws()
        self.rss_at_start_mb = self.server_rss_mb()
        # Each WebSocket client of the waiting scenario costs the server two descriptors (its
        # connection and its upstream search); the server inherits the bench's raised limit.
        nofile = self.server_process().rlimit(psutil.RLIMIT_NOFILE)
        self.results.settings["server_rlimit_nofile"] = list(nofile)
        need = 2 * (self.cfg.waiting_tasks + self.cfg.waiting_streams) + 1000
        if nofile[0] < need:
            self.results.notes.append(
                f"the server's open-file limit {nofile[0]} is below the "
                f"{need} the waiting scenario needs"
            )
        self.progress.step(
            f"tether :{self.tether.port} (pid {self.tether.pid}), payload-first "
            f":{self.pf.port}, relay floor :{self.floor.port}; "
            f"model {self.model_id!r}; "
            f"WebSocket {'yes' if self.ws_available else 'NOT available'}"
        )

    def server_env(self) -> dict[str, str]:
        """The settings of every Tether server of the run (the replicas scenario's too)."""
        env = dict(self.cfg.server_env)
        env["TETHER_LLM_BASE_URL"] = self.fake("model").base_url + "/v1"
        env["TETHER_SEARXNG_URL"] = self.fake("search").base_url
        return env

    def main_server_env(self) -> dict[str, str]:
        """The settings of the bench's own Tether server: ``server_env`` and, with MCP, the
        MCP configuration."""
        env = self.server_env()
        if self.mcp_config_path is not None:
            env["TETHER_MCP_CONFIG"] = self.mcp_config_path
        return env

    def _write_mcp_config(self, mcp: McpFakeControl) -> None:
        """TETHER_MCP_CONFIG for the bench's server, in the log folder: the test fake over
        stdio (started by Tether, from the repository root, recording to the ``mcp_http``
        child) and the ``mcp_http`` child's streamable-HTTP endpoint."""
        self.mcp_config = {
            "mcpServers": {
                MCP_STDIO: {
                    "command": sys.executable,
                    "args": [
                        "-m",
                        "fakes.mcp_server",
                        "--label",
                        MCP_STDIO,
                        "--record",
                        f"127.0.0.1:{mcp.record_port}",
                    ],
                    "cwd": str(REPO_ROOT),
                },
                MCP_HTTP: {"url": mcp.http_url},
            }
        }
        path = self.procs.log_dir / "mcp.json"
        path.write_text(json.dumps(self.mcp_config, indent=2))
        self.mcp_config_path = str(path)

    def profiled(self, args: list[str], path: str) -> list[str]:
        """``args`` of a Tether server run under pyinstrument, its text report to ``path``
        (written when the process gets SIGINT: spawn it with ``interrupt_first``)."""
        return [
            "-m",
            "pyinstrument",
            "-o",
            path,
            "-r",
            "text",
            f"--show-regex={PROFILE_SHOW}",
            *args,
        ]

    async def _start_server(self) -> None:
        port = free_port()
        args = ["-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port)]
        if self.profile_path:
            args = self.profiled(args, self.profile_path)
        proc = self.procs.spawn(
            "tether", args, self.main_server_env(), interrupt_first=bool(self.profile_path)
        )
        proc.port = port
        self.server = proc
        await self._wait_healthz(proc)

    async def start_tether(
        self,
        name: str,
        env: dict[str, str],
        args: list[str] | None = None,
        *,
        replicas: int = 1,
        profile: bool = False,
    ) -> Proc:
        """Start another Tether server than the bench's own (the replicas scenario's): the
        bench's settings plus ``env``, on a free port, with ``args`` after ``serve``; wait
        until ``/readyz`` has answered from ``replicas`` different replicas (the workers of
        ``--workers N`` share the port, and each new connection reaches one of them).
        ``profile`` under ``--profile``: run it under pyinstrument, its report beside the
        bench's (``<name>-profile-<server name>.txt``)."""
        port = free_port()
        command = ["-m", "server", "serve", "--host", "127.0.0.1", "--port", str(port)]
        command += args or []
        profiled = profile and self.profile_path is not None
        if profiled:
            path = str(self.profile_path).removesuffix(".txt") + f"-{name}.txt"
            command = self.profiled(command, path)
        proc = self.procs.spawn(
            name, command, {**self.server_env(), **env}, interrupt_first=profiled
        )
        proc.port = port
        proc.forks = replicas > 1
        await self._wait_healthz(proc)
        seen: set[str] = set()
        deadline = time.monotonic() + 30
        while len(seen) < replicas:
            if time.monotonic() > deadline or not proc.alive():
                raise ProcessError(
                    f"{name}: /readyz answered from {len(seen)} of {replicas} "
                    f"replicas:\n{proc.log_tail()}"
                )
            with contextlib.suppress(OSError, HttpError, ValueError):
                ready = await get_json("127.0.0.1", port, "/readyz")
                seen.add(str(ready.get("replica")))
            await trio.sleep(0.02)
        return proc

    async def restart_server(self) -> None:
        """End the Tether server by its pid and start a fresh one (a fresh heap, for memory
        figures that the earlier scenarios' high-water mark would otherwise hide)."""
        old = self.tether
        self.procs.kill(old)
        self.procs.procs.remove(old)
        await self._start_server()
        await self._discover_model()
        self.progress.step(f"tether restarted: :{self.tether.port} (pid {self.tether.pid})")

    async def _start_payload_first(self) -> None:
        args = [
            "-m",
            "bench.baselines.payload_first",
            "--port",
            "0",
            "--searxng-url",
            self.fake("search").base_url,
            "--llm-base-url",
            self.fake("model").base_url + "/v1",
        ]
        self.payload_first = await self._start_baseline("payload_first", args)

    async def _start_relay_floor(self) -> None:
        args = [
            "-m",
            "bench.baselines.relay_floor",
            "--port",
            "0",
            "--llm-base-url",
            self.fake("model").base_url + "/v1",
        ]
        self.relay_floor = await self._start_baseline("relay_floor", args)

    async def _start_baseline(self, name: str, args: list[str]) -> Proc:
        proc = self.procs.spawn(name, args)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not proc.port:
            for line in proc.log_path.read_text(errors="replace").splitlines():
                if line.startswith("READY "):
                    proc.port = int(line.split()[1])
            if not proc.alive():
                raise ProcessError(f"{name} exited:\n{proc.log_tail()}")
            await trio.sleep(0.05)
        if not proc.port:
            raise ProcessError(f"{name} printed no READY line:\n{proc.log_tail()}")
        await self._wait_healthz(proc)
        return proc

    async def _wait_healthz(self, proc: Proc, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.alive():
                raise ProcessError(f"{proc.name} exited:\n{proc.log_tail()}")
            try:
                await get_json("127.0.0.1", proc.port, "/healthz")
                return
            except (OSError, HttpError, ValueError):
                await trio.sleep(0.05)
        raise ProcessError(
            f"{proc.name} did not answer /healthz in {timeout} s:\n{proc.log_tail()}"
        )

    async def _discover_model(self) -> None:
        """The id under which the server lists the fake model (its list is refreshed in the
        background, so it may take a moment to appear)."""
        deadline = time.monotonic() + 15
        ids: list[str] = []
        while time.monotonic() < deadline:
            try:
                answer = await get_json("127.0.0.1", self.tether.port, "/api/models")
                ids = [str(m.get("id")) for m in answer.get("data", [])]
            except (OSError, HttpError, ValueError):
                ids = []
            fake = [i for i in ids if "fake-model" in i]
            if fake:
                self.model_id = fake[0]
                return
            await trio.sleep(0.1)
        raise ProcessError(f"the server never listed the fake model (models: {ids})")

    async def _probe_ws(self) -> bool:
        try:
            with trio.move_on_after(5):
                async with ws_client(self.ws_url) as client:
                    await client.ping()
                    return True
        except Exception as exc:  # any failure means: no usable /ws yet
            self.results.notes.append(f"WebSocket /ws not usable: {type(exc).__name__}: {exc}")
        return False

    # -- accessors ------------------------------------------------------------------------

    @property
    def tether(self) -> Proc:
        assert self.server is not None
        return self.server

    @property
    def pf(self) -> Proc:
        assert self.payload_first is not None
        return self.payload_first

    @property
    def floor(self) -> Proc:
        assert self.relay_floor is not None
        return self.relay_floor

    def fake(self, name: str) -> FakeControl:
        fake = {"search": self.search, "pages": self.pages, "model": self.model}[name]
        assert fake is not None
        return fake

    @property
    def fakes(self) -> list[FakeControl]:
        return [self.fake("search"), self.fake("pages"), self.fake("model")]

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.tether.port}/ws"

    def conn(self, port: int | None = None) -> HttpConnection:
        """A connection to the bench's Tether server (or to another one, by its port)."""
        return HttpConnection("127.0.0.1", port or self.tether.port)

    def pf_conn(self) -> HttpConnection:
        return HttpConnection("127.0.0.1", self.pf.port)

    # -- helpers --------------------------------------------------------------------------

    def marker(self, prefix: str) -> str:
        """A unique word for one sample: it becomes the search query and the page URLs."""
        return f"{prefix}{next(self._ids)}x{uuid.uuid4().hex[:6]}"

    def chat_body(
        self,
        text: str,
        *,
        chat_id: str,
        web_search: bool = False,
        background: bool = False,
        stream: bool = False,
        session_id: str | None = None,
        tool_ids: list[str] | None = None,
        deadlines: dict[str, float] | None = None,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": [{"role": "user", "content": text}],
            "stream": stream,
            "chat_id": chat_id,
            "message_id": "m-" + uuid.uuid4().hex[:8],
            "features": {"web_search": web_search},
        }
        if background:
            body["background"] = True
        if session_id is not None:
            body["session_id"] = session_id
        if tool_ids:
            body["tool_ids"] = tool_ids
        if deadlines:
            body["deadlines"] = deadlines
        return body

    async def reset_fakes(self) -> None:
        """Clear the fakes' records and settings, then restore the bench's base settings."""
        for fake in self.fakes:
            await fake.reset()
        await self.fake("search").configure(page_base_url=self.fake("pages").base_url)
        await self.fake("model").configure(default_reply=DEFAULT_REPLY)

    async def stop_chat(self, chat_id: str, port: int | None = None) -> tuple[float, int]:
        """Stop every task of a chat; returns how long the stop took (s) and how many
        tasks it stopped. ``port``: another Tether server than the bench's own."""
        conn = self.conn(port)
        try:
            answer = await conn.request("POST", f"/api/chats/{chat_id}/stop", {})
        finally:
            await conn.aclose()
        if answer.status != 200:
            raise HttpError(f"chat stop -> {answer.status}: {answer.body[:200]!r}")
        return answer.elapsed, len(answer.json().get("tasks", []))

    async def running_tasks(self, port: int | None = None) -> list[dict[str, Any]]:
        answer = await get_json("127.0.0.1", port or self.tether.port, "/api/tasks")
        tasks: list[dict[str, Any]] = answer.get("tasks", [])
        return tasks

    async def wait_no_tasks(self, timeout: float = 30.0, port: int | None = None) -> float | None:
        """Wait until ``GET /api/tasks`` is empty; the time it took, or None."""
        start = time.monotonic()
        while time.monotonic() - start < timeout:
            if not await self.running_tasks(port):
                return time.monotonic() - start
            await trio.sleep(0.05)
        return None

    def server_process(self) -> psutil.Process:
        return psutil.Process(self.tether.pid)

    def server_rss_mb(self) -> float:
        return float(self.server_process().memory_info().rss) / 2**20

    def rss_mb(self, pid: int | None = None) -> float:
        """RSS of a process of the run (default: the Tether server), in MB."""
        process = psutil.Process(pid) if pid is not None else self.server_process()
        return float(process.memory_info().rss) / 2**20

    def proc_rss_mb(self, proc: Proc) -> float:
        """RSS of a process of the run with its forked workers (``--workers N``), in MB."""
        return sum(float(p.memory_info().rss) for p in proc.processes()) / 2**20

    def server_cpu_s(self) -> float:
        times = self.server_process().cpu_times()
        return float(times.user + times.system)

    @staticmethod
    def machine_busy_s() -> float:
        """CPU seconds the whole machine has been busy (``bench.remote.machine_busy_s``)."""
        busy = machine_busy_s()
        assert busy is not None  # psutil is imported above
        return busy

    def cpu_by_process(self) -> dict[str, float]:
        """CPU seconds (user + system) so far of every process of the run, the bench too.
        The forked workers of a ``--workers N`` server are ``<name>/1``, ``<name>/2``, ...
        beside its supervisor ``<name>``."""
        out: dict[str, float] = {}
        named: list[tuple[str, psutil.Process]] = []
        for proc in self.procs.procs:
            try:
                processes = proc.processes()
            except psutil.Error:
                continue
            named += [
                (proc.name if i == 0 else f"{proc.name}/{i}", process)
                for i, process in enumerate(processes)
            ]
        named.append(("bench", psutil.Process()))
        for name, process in named:
            try:
                times = process.cpu_times()
            except psutil.Error:
                continue
            out[name] = float(times.user + times.system)
        return out

    async def open_fake_connections(self) -> dict[str, int]:
        return {f.name: len(await f.open_connections()) for f in self.fakes}
