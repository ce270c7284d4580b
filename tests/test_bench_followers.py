"""The followers scenario's view of a replica's Redis connections (bench/scenarios/followers.py):
on a Redis Cluster every node's ``CLIENT LIST`` is read, its clients told apart by the local
ports of the replicas' connections, and the counts summed over the nodes."""

from __future__ import annotations

import pytest
import trio

from bench.redis_clients import RedisProbe, parse_setup, sum_clients, tally_clients
from fakes.redis_cluster import RedisCluster
from tests.conftest import WAIT


async def _ping(stream: trio.SocketStream) -> None:
    """A PING answered: the node has taken the connection in (it is in CLIENT LIST)."""
    await stream.send_all(b"PING\r\n")
    reply = b""
    while not reply.endswith(b"\r\n"):
        reply += await stream.receive_some(64)
    assert reply == b"+PONG\r\n"


async def test_clients_of_each_replica_are_counted_on_every_node_and_summed(
    redis_cluster: RedisCluster,
) -> None:
    first, second = (node.port for node in redis_cluster.nodes[:2])
    owners = [(first, "b"), (first, "b"), (second, "b"), (second, "a")]
    ports: dict[str, dict[int, set[int]]] = {"a": {first: set(), second: set()}}
    ports["b"] = {first: set(), second: set()}
    opened: list[trio.SocketStream] = []
    tallies = {}
    with_probe = {}  # the same listings, the probe's own connection not left out
    with trio.fail_after(WAIT):
        try:
            for node, owner in owners:
                stream = await trio.open_tcp_stream("127.0.0.1", node)
                opened.append(stream)
                await _ping(stream)
                ports[owner][node].add(int(stream.socket.getsockname()[1]))
            for node in (first, second):
                probe = await RedisProbe.open(node)
                try:
                    listing = str(await probe.command("CLIENT", "LIST"))
                finally:
                    await probe.aclose()
                tallies[node] = tally_clients(
                    listing, probe.local_port, ports["a"][node], ports["b"][node]
                )
                with_probe[node] = tally_clients(listing, -1, ports["a"][node], ports["b"][node])
        finally:
            for stream in opened:
                await stream.aclose()

    total = sum_clients(tallies)
    assert (total["a"], total["b"]) == (1, 3)
    assert total["b_by_node"] == {str(first): 2, str(second): 1}
    assert total["b_by_cmd"] == {"ping": 3}
    assert total["total"] == total["a"] + total["b"] + total["other"]
    assert total["total"] == sum(t["total"] for t in tallies.values())
    # Each node's probe is left out of its count.
    assert sum_clients(with_probe)["other"] == total["other"] + 2


def test_a_followers_setup_is_one_server_a_cluster_or_a_cluster_with_its_follow_reads() -> None:
    assert parse_setup("one") == ("one", None)
    assert parse_setup("cluster") == ("cluster", None)
    assert parse_setup("cluster:128") == ("cluster", 128)
    for wrong in ("two", "one:8", "cluster:", "cluster:0", "cluster:x"):
        with pytest.raises(ValueError):
            parse_setup(wrong)
