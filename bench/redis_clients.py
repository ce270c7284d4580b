"""The followers scenario's probe of Redis (bench/scenarios/followers.py), apart from the
bench's process tools so that the tests can import it with the test dependencies alone: a
RESP2 connection of the bench's own to a Redis node, each node's ``CLIENT LIST`` told apart
by owner, and the tallies of a cluster's nodes summed."""

from __future__ import annotations

import re
from typing import Any

import trio

# The followers scenario's set-ups of Redis: ``one`` redis-server, or a ``cluster``.
SETUP_KINDS = ("one", "cluster")
_ADDR = re.compile(r"(?:^| )addr=[^ ]*:(\d+)(?: |$)")
_CMD = re.compile(r"(?:^| )cmd=([^ ]*)")


class RedisProbe:
    """The bench's own connection to the scenario's Redis: a few RESP2 commands (``CLIENT
    LIST``, ``INFO``), written and parsed here."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self._stream = stream
        self._buf = b""
        self.local_port = int(stream.socket.getsockname()[1])
        self.port = int(stream.socket.getpeername()[1])  # the Redis node's

    @classmethod
    async def open(cls, port: int) -> RedisProbe:
        return cls(await trio.open_tcp_stream("127.0.0.1", port))

    async def _more(self) -> None:
        data = await self._stream.receive_some(1 << 16)
        if not data:
            raise ConnectionError("Redis closed the probe connection")
        self._buf += data

    async def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            await self._more()
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    async def _reply(self) -> Any:
        line = await self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RuntimeError(f"Redis: {rest.decode()}")
        if kind == b":":
            return int(rest)
        if kind == b"$":
            n = int(rest)
            if n < 0:
                return None
            while len(self._buf) < n + 2:
                await self._more()
            data, self._buf = self._buf[:n], self._buf[n + 2 :]
            return data.decode()
        if kind == b"*":
            n = int(rest)
            return None if n < 0 else [await self._reply() for _ in range(n)]
        raise RuntimeError(f"Redis: unexpected reply {line[:80]!r}")

    async def command(self, *args: str) -> Any:
        out = [f"*{len(args)}\r\n".encode()]
        for arg in args:
            data = arg.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        await self._stream.send_all(b"".join(out))
        return await self._reply()

    async def info(self, section: str) -> dict[str, str]:
        text = str(await self.command("INFO", section))
        pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
        return {k: v for k, v in pairs}

    async def aclose(self) -> None:
        await self._stream.aclose()


def parse_setup(spec: str) -> tuple[str, int | None]:
    """A set-up of ``followers_redis``: ``one`` (one redis-server), ``cluster`` (a Redis
    Cluster) or ``cluster:N`` (its replicas with ``TETHER_REDIS_FOLLOW_READS=N``), as (kind,
    N or None). Raises ``ValueError`` for anything else."""
    kind, colon, reads = spec.partition(":")
    if kind not in SETUP_KINDS or (colon and (kind != "cluster" or not reads.isdigit())):
        raise ValueError(f"{spec!r}: one, cluster or cluster:N")
    if colon and int(reads) < 1:
        raise ValueError(f"{spec!r}: N must be at least 1")
    return kind, int(reads) if colon else None


def tally_clients(
    client_list: str, probe_port: int, a_ports: set[int], b_ports: set[int]
) -> dict[str, Any]:
    """One node's ``CLIENT LIST`` by owner: A, B, others (the probe, at ``probe_port``,
    left out); and B's by the last command each ran (``cmd=``)."""
    out: dict[str, Any] = {"total": 0, "a": 0, "b": 0, "other": 0, "b_by_cmd": {}}
    for line in client_list.splitlines():
        if not line:
            continue
        found = _ADDR.search(line)
        port = int(found.group(1)) if found else -1
        if port == probe_port:
            continue
        out["total"] += 1
        if port in b_ports:
            out["b"] += 1
            cmd = _CMD.search(line)
            name = cmd.group(1) if cmd else "?"
            out["b_by_cmd"][name] = out["b_by_cmd"].get(name, 0) + 1
        elif port in a_ports:
            out["a"] += 1
        else:
            out["other"] += 1
    return out


def sum_clients(nodes: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """The tallies of every node (``tally_clients``, by the node's port) summed, with B's
    count on each node (``b_by_node``)."""
    out: dict[str, Any] = {"total": 0, "a": 0, "b": 0, "other": 0, "b_by_cmd": {}}
    out["b_by_node"] = {str(port): nodes[port]["b"] for port in sorted(nodes)}
    for node in nodes.values():
        for owner in ("total", "a", "b", "other"):
            out[owner] += node[owner]
        for cmd, n in node["b_by_cmd"].items():
            out["b_by_cmd"][cmd] = out["b_by_cmd"].get(cmd, 0) + n
    return out
