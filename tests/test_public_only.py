"""Page fetches reach public addresses only, checked where the connection is made: a name is
resolved once and the address checked is the address connected (no DNS-rebinding window).

The resolver here is the test's (a DNS server that changes its answer), and the layer
below the check records where it was asked to connect instead of connecting: no packet
leaves the machine.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

import httpcore2
import httpx2
import pytest
from httpcore2 import SOCKET_OPTION, AsyncNetworkBackend, AsyncNetworkStream

from server.providers.net.client import client_with_backend
from server.providers.net.public_only import IpAddress, PublicOnlyBackend
from server.providers.web.base import PageError
from server.providers.web.fetch import fetch_page


class RecordingNetwork(AsyncNetworkBackend):
    """Where connections were asked for; none is made."""

    def __init__(self) -> None:
        self.hosts: list[str] = []

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        self.hosts.append(host)
        raise httpcore2.ConnectError("not connecting in a test")

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        raise AssertionError("no Unix sockets here")

    async def sleep(self, seconds: float) -> None:
        raise AssertionError("no sleeping here")


def rebinding_dns(*answers: list[str]) -> tuple[list[str], object]:
    """A resolver that gives ``answers`` in turn (a rebinding DNS server changes its
    answer between two lookups of one name), and the names it was asked."""
    asked: list[str] = []
    queue = [[ipaddress.ip_address(a) for a in answer] for answer in answers]

    async def resolve(host: str) -> list[IpAddress]:
        asked.append(host)
        return queue.pop(0)

    return asked, resolve


async def test_the_address_checked_is_the_address_connected() -> None:
    asked, resolve = rebinding_dns(["1.1.1.1"], ["127.0.0.1"])
    network = RecordingNetwork()
    backend = PublicOnlyBackend(resolve, network)  # type: ignore[arg-type]
    with pytest.raises(httpcore2.ConnectError, match="not connecting"):
        await backend.connect_tcp("rebind.example", 80)
    assert network.hosts == ["1.1.1.1"] and asked == ["rebind.example"]
    # The next connection looks the name up again and gets loopback: refused unsent.
    with pytest.raises(httpcore2.ConnectError, match="non-public address"):
        await backend.connect_tcp("rebind.example", 80)
    assert network.hosts == ["1.1.1.1"]


@pytest.mark.parametrize(
    "addresses",
    [
        ["127.0.0.1"],
        ["10.0.0.7"],
        ["169.254.169.254"],
        ["::1"],
        ["fd00::1"],
        ["1.1.1.1", "192.168.1.1"],
    ],
)
async def test_a_name_with_any_non_public_address_is_refused(addresses: list[str]) -> None:
    _, resolve = rebinding_dns(addresses)
    network = RecordingNetwork()
    with pytest.raises(httpcore2.ConnectError, match="non-public address"):
        await PublicOnlyBackend(resolve, network).connect_tcp(  # type: ignore[arg-type]
            "inner.example", 80
        )
    assert network.hosts == []


async def test_a_page_fetch_through_the_page_client_connects_to_the_checked_address() -> None:
    _, resolve = rebinding_dns(["93.184.215.14"], ["127.0.0.1"])
    network = RecordingNetwork()
    client = client_with_backend(
        PublicOnlyBackend(resolve, network),  # type: ignore[arg-type]
        httpx2.Limits(max_connections=2),
        httpx2.Timeout(5.0),
    )
    async with client:
        with pytest.raises(PageError, match="could not connect"):
            await fetch_page(
                client, "http://rebind.example/page", timeout=5, max_bytes=1000, max_chars=1000
            )
        with pytest.raises(PageError, match="non-public address"):
            await fetch_page(
                client, "http://rebind.example/page", timeout=5, max_bytes=1000, max_chars=1000
            )
    assert network.hosts == ["93.184.215.14"]
