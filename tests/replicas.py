"""Tether replicas as real processes (``python -m server serve``) on loopback ports, for the
tests that need more than one: each is started with its settings as ``TETHER_*``
variables, waited for on ``/healthz``, and stopped by pid (SIGTERM, or SIGKILL as a crash).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx2
import trio
import trio.lowlevel

from server.config import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_env(settings: Settings) -> dict[str, str]:
    """The ``TETHER_*`` variables that give ``settings`` (those that differ from the
    defaults)."""
    default = Settings()
    env: dict[str, str] = {}
    for name in Settings.model_fields:
        value = getattr(settings, name)
        if value == getattr(default, name) or value is None:
            continue
        if isinstance(value, Mapping):
            value = ",".join(f"{k}={v}" for k, v in value.items())
        elif isinstance(value, tuple):
            value = ",".join(str(item) for item in value)
        elif isinstance(value, bool):
            value = "true" if value else "false"
        env["TETHER_" + name.upper()] = str(value)
    return env


class Replica:
    """One Tether server process."""

    def __init__(
        self,
        settings: Settings,
        *,
        args: tuple[str, ...] = (),
        name: str = "replica",
        output: Path | None = None,
    ) -> None:
        """``output``: a file that gets the process's stdout and stderr (else they are
        dropped)."""
        self.port = free_port()
        self.name = name
        self.output = output
        self.settings = settings.with_overrides(port=self.port)
        self._args = args
        self.process: trio.Process | None = None
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.client = httpx2.AsyncClient(base_url=self.base_url, timeout=10.0, trust_env=False)

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self, timeout: float = 20.0) -> None:
        env = {
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/tmp"),
            "PYTHONPATH": str(ROOT),
            **settings_env(self.settings),
        }
        # The child keeps its own copy of the file.
        async with await trio.Path(self.output or os.devnull).open("ab") as out:
            self.process = await trio.lowlevel.open_process(
                [sys.executable, "-m", "server", "serve", *self._args],
                cwd=ROOT,
                env=env,
                stdout=out.fileno(),
                stderr=subprocess.STDOUT,
            )
        with trio.fail_after(timeout):
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self.process.returncode}")
                try:
                    if (await self.client.get("/readyz")).status_code == 200:
                        return
                except httpx2.TransportError:
                    pass
                await trio.sleep(0.05)

    async def kill(self) -> None:
        """SIGKILL: the replica dies as in a crash, saying goodbye to nobody."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            await self.process.wait()

    async def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait for the process to exit; returns its exit status."""
        assert self.process is not None
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        with trio.fail_after(timeout):
            return await self.process.wait()

    async def close(self) -> None:
        """Stop the process (SIGTERM; SIGKILL if it has not gone in 20 s)."""
        await self.client.aclose()
        if self.process is not None and self.process.poll() is None:
            with trio.move_on_after(20):
                await self.terminate()
            await self.kill()

    async def chat(self, body: dict[str, Any]) -> httpx2.Response:
        return await self.client.post("/api/chat/completions", json=body)

    async def background(self, body: dict[str, Any]) -> str:
        response = await self.chat({**body, "background": True})
        assert response.status_code == 202, response.text
        return str(response.json()["task_id"])
