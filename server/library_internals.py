"""Every place where Tether leans on a library's private attributes, in one module.

Each piece below works around something the library does not offer publicly, says why,
and names the upstream issue where there is one. A private attribute can change in any
release, so the code here is written for exact versions (``WRITTEN_FOR``): at import,
``check_libraries`` compares them with the installed ones and makes sure the attributes are
still there, and stops the server with ``LibraryInternalsMoved`` (naming the library, the
version found and what to re-check) rather than let a moved attribute fail on the first
request under load. To move a version: read the named library code again, adjust the piece,
then ``WRITTEN_FOR``.
"""

from __future__ import annotations

import importlib.metadata
from collections.abc import Mapping
from typing import Any

import coredis
import httpcore2
import httpx2
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

# The versions the code below was read against (httpcore2 as locked in uv.lock: it comes
# with httpx2).
WRITTEN_FOR: Mapping[str, str] = {
    "httpx2": "2.16.2",
    "httpcore2": "2.16.2",
    "coredis": "6.9.0",
    "pydantic-settings": "2.16.3",
}

# What to read again in each library before its version is moved.
RECHECK: Mapping[str, str] = {
    "httpx2": "that AsyncHTTPTransport still keeps its httpcore2 pool in ``_pool`` "
    "(httpx2/_transports/default.py), for replace_pool and the pool readers",
    "httpcore2": "that AsyncConnectionPool still lists requests in flight in ``_requests`` "
    "and its connections in ``connections`` "
    "(httpcore2/_async/connection_pool.py), for pool_in_flight and "
    "pool_connections",
    "coredis": "that ConnectionPool.release still drops a dead connection without handing "
    "its slot back to ``_available_connections`` (coredis/pool/_basic.py), for "
    "SlotKeepingPool",
    "pydantic-settings": "that EnvSettingsSource.__init__ still reads the environment "
    "through ``_load_env_vars`` (pydantic_settings/sources/providers/"
    "env.py), for MappingEnvSource",
}


class LibraryInternalsMoved(RuntimeError):
    """An installed library is not the version ``library_internals`` was written for, or
    a private attribute it relies on is gone."""


def check_version(library: str, found: str) -> None:
    """Raise ``LibraryInternalsMoved`` unless ``found`` is the version of ``library`` this
    module was written for."""
    expected = WRITTEN_FOR[library]
    if found != expected:
        raise LibraryInternalsMoved(
            f"{library} {found} is installed, but server/library_internals.py was written "
            f"for {library} {expected}: re-check {RECHECK[library]}, then update "
            "WRITTEN_FOR"
        )


def _require(library: str, present: bool, what: str) -> None:
    if not present:
        raise LibraryInternalsMoved(
            f"{library} {importlib.metadata.version(library)} has no {what}: re-check "
            f"{RECHECK[library]}"
        )


def check_libraries() -> None:
    """The installed versions are those of ``WRITTEN_FOR`` and every private attribute used
    here is there; raises ``LibraryInternalsMoved`` otherwise. Builds a transport, a pool
    and a settings source, and connects nothing."""
    for library in WRITTEN_FOR:
        check_version(library, importlib.metadata.version(library))
    transport = httpx2.AsyncHTTPTransport(verify=False, trust_env=False)
    pool = getattr(transport, "_pool", None)
    _require(
        "httpx2",
        isinstance(pool, httpcore2.AsyncConnectionPool),
        "AsyncHTTPTransport._pool holding an AsyncConnectionPool",
    )
    _require(
        "httpcore2",
        isinstance(getattr(pool, "_requests", None), list),
        "AsyncConnectionPool._requests list",
    )
    _require(
        "httpcore2",
        isinstance(getattr(pool, "connections", None), list),
        "AsyncConnectionPool.connections list",
    )
    redis_pool = coredis.ConnectionPool.from_url("redis://127.0.0.1", max_connections=1)
    _require(
        "coredis",
        callable(getattr(getattr(redis_pool, "_available_connections", None), "put_nowait", None)),
        "ConnectionPool._available_connections queue with put_nowait",
    )
    _require(
        "pydantic-settings",
        _mapping_source_reads_its_mapping(),
        "EnvSettingsSource._load_env_vars read by EnvSettingsSource.__init__",
    )


# httpx2 and httpcore2 -------------------------------------------------------------------
#
# httpcore2's pool takes a network backend (its public plug-in point below HTTP), but
# httpx2's AsyncHTTPTransport does not pass one on, so a transport whose connections come
# from a backend of ours has its pool replaced. Upstream: httpx discussion #3180 and the
# open pull request encode/httpx#3749 ("specifying the httpcore Network Backend when
# creating default transports"); no httpx2 issue found. Neither library says publicly how
# many requests a pool has in flight (encode/httpcore#18 and #508 asked for pool
# statistics and were closed without them), which the clients' pools filled in order need.


def replace_pool(transport: httpx2.AsyncHTTPTransport, pool: httpcore2.AsyncConnectionPool) -> None:
    """Make ``transport`` send its requests through ``pool`` (a pool built with our network
    backend). Call it before the transport's first request."""
    transport._pool = pool


def _pool(transport: httpx2.AsyncHTTPTransport) -> httpcore2.AsyncConnectionPool:
    pool = transport._pool
    assert isinstance(pool, httpcore2.AsyncConnectionPool)  # replace_pool put it there
    return pool


def pool_in_flight(transport: httpx2.AsyncHTTPTransport) -> int:
    """Requests of ``transport``'s pool queued or on a connection, until their response is
    closed."""
    return len(_pool(transport)._requests)


def pool_connections(
    transport: httpx2.AsyncHTTPTransport,
) -> list[httpcore2.AsyncConnectionInterface]:
    """The connections of ``transport``'s pool, idle or not (a copy: closing one while
    walking it is safe)."""
    return list(_pool(transport).connections)


# coredis ----------------------------------------------------------------------------------


class SlotKeepingPool(coredis.ConnectionPool):  # type: ignore[type-arg]
    """coredis 6.9's pool loses a slot each time a leased connection dies (a blocking read
    cancelled, a server restart): ``release`` puts back only usable connections, so after
    ``max_connections`` deaths every command waits forever. A dead connection's slot is
    handed back here (as ``None``, which the pool's ``get_connection`` reconnects on use).
    No upstream issue found for the lost slot; alisaifee/coredis#317 (a cancelled blocking
    command disconnects its connection) is how a leased connection dies here."""

    def release(self, connection: Any) -> None:
        super().release(connection)
        if not connection.usable:
            self._available_connections.put_nowait(None)


# pydantic-settings ------------------------------------------------------------------------


class MappingEnvSource(EnvSettingsSource):
    """pydantic-settings' environment source (the prefix, names in any case, an empty value
    taken for unset) over a given mapping instead of ``os.environ``. pydantic-settings has
    no public way to give its environment source another mapping: its own sources (the
    .env one among them) override ``_load_env_vars``, which ``__init__`` calls, and so does
    this one. No upstream issue found."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        prefix = str(self.settings_cls.model_config.get("env_prefix", "")).upper()
        return {
            name.lower(): value
            for name, value in self._environ.items()
            if name.upper().startswith(prefix) and value != ""
        }


class _Probe(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="PROBE_", case_sensitive=False)

    value: str = "default"


def _mapping_source_reads_its_mapping() -> bool:
    return MappingEnvSource(_Probe, {"probe_VALUE": "given"})().get("value") == "given"


check_libraries()
