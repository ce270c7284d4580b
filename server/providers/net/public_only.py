"""Connections to public addresses only, checked at the moment of connecting.

Page fetches (search results, a model's ``fetch_url``) go wherever a URL points, and a URL
is outside text: unless ``TETHER_FETCH_ALLOW_PRIVATE`` says otherwise, they must not reach
the server's own network (loopback, private, link-local and other non-public addresses).
Checking the name's addresses and then connecting by name leaves a window: a DNS server
under an attacker's control can answer a public address to the check and 127.0.0.1 to the
connect (DNS rebinding). So the check is made here, where the connection is made: the name
is resolved once, every address it has must be public, and the connection goes to the
address that was checked. TLS still verifies the certificate against the name (httpcore
passes the URL's host as the server name), so connecting by address changes nothing else.
Each redirect hop and each new connection of the pool is checked the same way.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Awaitable, Callable, Iterable

import httpcore2
import trio
from httpcore2 import SOCKET_OPTION, AsyncNetworkBackend, AsyncNetworkStream

from server.providers.net.tls_safe import TlsSafeBackend
from server.providers.net.wrapped import WrappingBackend

IpAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolve = Callable[[str], Awaitable[list[IpAddress]]]


async def resolve_host(host: str) -> list[IpAddress]:
    """Every address ``host`` has (itself, if it is an address). Cancelling it abandons the
    lookup."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = await trio.socket.getaddrinfo(host, None, type=trio.socket.SOCK_STREAM)
    except OSError as exc:
        raise httpcore2.ConnectError(f"cannot resolve {host}: {exc}") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


class PublicOnlyBackend(WrappingBackend):
    """Makes TCP connections to public addresses only, through ``inner``; refuses anything
    else with ``httpcore2.ConnectError`` before a packet is sent."""

    def __init__(
        self, resolve: Resolve = resolve_host, inner: AsyncNetworkBackend | None = None
    ) -> None:
        super().__init__(inner or TlsSafeBackend())
        self._resolve = resolve

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        """Resolve ``host`` once, check every address, connect to the first. Cancelling
        it abandons the lookup or the connect."""
        addresses = await self._resolve(host)
        if not addresses:
            raise httpcore2.ConnectError(f"cannot resolve {host}")
        for address in addresses:
            if not address.is_global:
                raise httpcore2.ConnectError(f"{host} is a non-public address ({address}); refused")
        return await super().connect_tcp(
            str(addresses[0]), port, timeout, local_address, socket_options
        )

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,
        socket_options: Iterable[SOCKET_OPTION] | None = None,
    ) -> AsyncNetworkStream:
        raise httpcore2.ConnectError("page fetches do not use Unix sockets")
