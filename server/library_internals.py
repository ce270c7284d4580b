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
from typing import Any, Literal, Protocol, cast

import coredis
import httpcore2
import httpx2
import hypercorn.trio.run
import trio
from coredis.cluster._layout import ClusterLayout
from hypercorn.config import Config
from hypercorn.events import Event as HypercornEvent
from hypercorn.events import Updated
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.typing import AppWrapper, LifespanState
from pydantic_settings import BaseSettings, EnvSettingsSource, SettingsConfigDict

# The versions the code below was read against (httpcore2 as locked in uv.lock: it comes
# with httpx2).
WRITTEN_FOR: Mapping[str, str] = {
    "httpx2": "2.16.2",
    "httpcore2": "2.16.2",
    "coredis": "6.9.0",
    "pydantic-settings": "2.16.3",
    "hypercorn": "0.18.0",
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
    "its slot back to ``_available_connections`` (coredis/pool/_basic.py), that "
    "SentinelConnectionPool (coredis/pool/_sentinel.py) still inherits that release, and "
    "that ClusterConnectionPool.release does the same with its node's queue from "
    "``_node_pool`` (coredis/pool/_cluster.py), for SlotKeepingPool, SlotKeepingSentinelPool "
    "and SlotKeepingClusterPool; and that a cluster pipeline still reports no connection "
    "failure to its ClusterLayout, which refreshes after report_errors "
    "(coredis/cluster/_layout.py), for report_cluster_failure",
    "pydantic-settings": "that EnvSettingsSource.__init__ still reads the environment "
    "through ``_load_env_vars`` (pydantic_settings/sources/providers/"
    "env.py), for MappingEnvSource",
    "hypercorn": "that hypercorn/trio/run.py still builds each connection's TCPServer "
    "through its module name ``TCPServer``, that TCPServer keeps its stream in ``stream``, "
    "reads it with ``receive_some``, hears Updated(idle=...) through ``protocol_send`` and "
    "runs its idle timer as ``idle_task`` (a TrioSingleTask with ``stop``), "
    "and that protocol/h11.py sends Updated(idle=False) when a request head is parsed and "
    "Updated(idle=True) when a keep-alive connection goes idle, for WatchedConnection",
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
        "coredis",
        callable(getattr(coredis.ClusterConnectionPool, "_node_pool", None))
        and callable(getattr(ClusterLayout, "report_errors", None)),
        "ClusterConnectionPool._node_pool and ClusterLayout.report_errors",
    )
    _require(
        "pydantic-settings",
        _mapping_source_reads_its_mapping(),
        "EnvSettingsSource._load_env_vars read by EnvSettingsSource.__init__",
    )
    _require(
        "hypercorn",
        cast(Any, hypercorn.trio.run).TCPServer in (TCPServer, WatchedConnection),
        "TCPServer used by name in hypercorn.trio.run",
    )
    probe = TCPServer(cast(Any, None), Config(), cast(Any, None), {}, cast(Any, None))
    _require(
        "hypercorn",
        hasattr(probe, "stream") and callable(getattr(probe, "protocol_send", None)),
        "TCPServer.stream and TCPServer.protocol_send",
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
        _keep_slot(self, connection)


class SlotKeepingSentinelPool(coredis.SentinelConnectionPool):
    """coredis's pool of a primary found through Sentinel, which loses a slot as the plain
    pool does (see SlotKeepingPool); a failover kills every leased connection at once."""

    def release(self, connection: Any) -> None:
        super().release(connection)
        _keep_slot(self, connection)


def _keep_slot(pool: coredis.ConnectionPool[Any], connection: Any) -> None:
    if not connection.usable:
        pool._available_connections.put_nowait(cast(Any, None))


class SlotKeepingClusterPool(coredis.ClusterConnectionPool):
    """The same for coredis 6.9's cluster pool, which keeps a queue of slots per node:
    ``release`` drops a dead leased connection, and only a connection that dies while idle
    in its queue has its slot handed back (``_wrap_connection``)."""

    def release(self, connection: Any) -> None:
        super().release(connection)
        if not connection.usable:
            self._node_pool(connection.location).put_nowait(None)


def report_cluster_failure(client: coredis.RedisCluster[Any], failure: Exception) -> None:
    """Count ``failure`` towards ``client``'s refresh of its cluster layout. coredis 6.9's
    cluster client refreshes its map of slots to nodes only after a few failures reported
    to the layout, and its pipelines report none but redirections: a primary that died is
    then never replaced by its promoted replica for a client whose commands to that slot
    all go through pipelines. No upstream issue found."""
    client.connection_pool.cluster_layout.report_errors(None, failure)


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


# hypercorn --------------------------------------------------------------------------------
#
# hypercorn bounds a connection's reads only with ``read_timeout`` (each read, whatever the
# connection is doing: a client waiting for a long SSE answer sends nothing and would be cut)
# and its idle timer (``keep_alive_timeout``, which also runs while a request head drips
# in, and closes without an answer). It has no bound on the time a request head may take,
# and no hook at the connection's opening where a server could refuse it. Both are in its
# per-connection TCPServer, built by name in hypercorn/trio/run.py: ``watch_connections``
# points that name at a subclass which tells a ``ConnectionHooks`` object what it needs and
# otherwise leaves hypercorn's code as it is. A server whose Config is not a WatchedConfig
# (another app in the same process) gets hypercorn's behaviour unchanged. No upstream
# issue found for a request head timeout in hypercorn.


class ConnectionHooks(Protocol):
    """What a server is told about each of its TCP connections (see WatchedConnection)."""

    def admit(self, connection: WatchedConnection) -> bytes | None:
        """None to serve the connection; otherwise the bytes to answer it with before it is
        closed (it is then never served, and ``closed`` is not called)."""

    def head_pending(self, connection: WatchedConnection) -> None:
        """A request head is awaited: the connection was just admitted, or the first bytes
        of a later request arrived on a keep-alive connection."""

    def head_received(self, connection: WatchedConnection) -> None:
        """The pending request head arrived whole (also a WebSocket upgrade's)."""

    def closed(self, connection: WatchedConnection) -> None:
        """An admitted connection ended, however."""


class WatchedConfig(Config):
    """hypercorn's Config, with the hooks its connections report to."""

    connection_hooks: ConnectionHooks | None = None


# How long a connection answered and closed by the server still reads (and drops) what the
# client sends, so that the client reads the answer rather than a reset; and how much.
LINGER_S = 1.0
LINGER_BYTES = 64 * 1024

_Phase = Literal["head", "request", "idle"]


class WatchedConnection(TCPServer):
    """One connection, as hypercorn's TCPServer serves it, reporting to its config's hooks:
    its admission, when a request head is pending and when it arrived, and its end."""

    def __init__(
        self,
        app: AppWrapper,
        config: Config,
        context: Any,
        state: LifespanState,
        stream: trio.SSLStream[trio.SocketStream],
    ) -> None:
        hooks = config.connection_hooks if isinstance(config, WatchedConfig) else None
        # Watched: plain TCP connections (Tether serves no TLS itself; a TLS stream, as
        # hypercorn would hand it with a certificate configured, is served unwatched).
        if not isinstance(stream, trio.SocketStream):
            hooks = None
        self.hooks = hooks
        self.socket_stream = cast(trio.SocketStream, stream)
        # The peer's address (without the port): what per-client limits count.
        self.client: str | None = None
        self.phase: _Phase = "head"
        # Whether any byte of the pending head arrived: a connection that sent nothing has no
        # request to answer, and a timed-out one is then closed without an answer.
        self.head_started = False
        self._dropping = False
        # Made when the server starts closing the connection (``answer_and_close``), not
        # with every connection: an idle one would hold it for nothing.
        self._dropped_to_eof: trio.Event | None = None
        super().__init__(
            app, config, context, state, cast(Any, _ReadWatch(self) if hooks else stream)
        )

    async def run(self) -> None:
        """Serve the connection as hypercorn does, unless the hooks refuse it (it is then
        answered and closed). Cancelling it closes the connection."""
        hooks = self.hooks
        if hooks is None:
            await super().run()
            return
        try:
            self.client = str(self.socket_stream.socket.getpeername()[0])
        except (OSError, IndexError):
            self.client = None
        refusal = hooks.admit(self)
        if refusal is not None:
            await self._refuse(refusal)
            return
        try:
            hooks.head_pending(self)
            await super().run()
        finally:
            hooks.closed(self)

    async def protocol_send(self, event: HypercornEvent) -> None:
        if self.hooks is not None and isinstance(event, Updated):
            if not event.idle and self.phase == "head":
                self.phase = "request"
                self.hooks.head_received(self)
            elif event.idle:
                self.phase = "idle"
        await super().protocol_send(event)

    def bytes_arrived(self) -> None:
        """Called by the read watch with every read's data, before hypercorn sees it."""
        if self.phase == "head":
            self.head_started = True
        elif self.phase == "idle" and isinstance(
            getattr(self.protocol, "protocol", None), H11Protocol
        ):
            # The first bytes of the next request on a keep-alive connection (HTTP/1.1 only:
            # an idle HTTP/2 connection also receives pings and settings).
            self.phase = "head"
            self.head_started = True
            assert self.hooks is not None
            self.hooks.head_pending(self)

    @property
    def dropping(self) -> bool:
        return self._dropping

    def dropped_to_eof(self) -> None:
        if self._dropped_to_eof is not None:
            self._dropped_to_eof.set()

    async def answer_and_close(self, answer: bytes | None) -> None:
        """Write ``answer`` (if any), then close the connection, whatever hypercorn is doing
        with it: the reads hypercorn makes meanwhile get nothing, and the client's EOF (or
        ``LINGER_S``) is awaited so that it reads the answer rather than a reset. Cancelling
        it leaves the connection to hypercorn's own close."""
        self._dropping = True
        if self._dropped_to_eof is None:
            self._dropped_to_eof = trio.Event()
        dropped_to_eof = self._dropped_to_eof
        stream = self.socket_stream
        try:
            async with self.send_lock:
                with trio.CancelScope(shield=True):
                    if answer:
                        await stream.send_all(answer)
                    await stream.send_eof()
            with trio.move_on_after(LINGER_S):
                await dropped_to_eof.wait()
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError):
            pass
        # hypercorn's read then fails, and it closes its side of the connection as for a
        # client that went away; its idle timer would hold the connection's task until
        # keep_alive_timeout (see _ReadWatch.receive_some).
        await stream.aclose()
        await self.idle_task.stop()

    async def _refuse(self, answer: bytes) -> None:
        stream = self.socket_stream
        try:
            await stream.send_all(answer)
            await stream.send_eof()
            with trio.move_on_after(LINGER_S):
                dropped = 0
                while dropped < LINGER_BYTES:
                    data = await stream.receive_some(LINGER_BYTES)
                    if not data:
                        break
                    dropped += len(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass
        await stream.aclose()


class _ReadWatch:
    """The connection's stream as hypercorn reads it: every read is reported to the
    connection first, and once the connection is being closed by the server, what the
    client still sends is dropped rather than parsed. Everything else is the stream's own."""

    def __init__(self, connection: WatchedConnection) -> None:
        self._connection = connection
        self._stream = connection.socket_stream

    def __getattr__(self, name: str) -> Any:
        # hypercorn also uses the stream's socket, send_all, send_eof and aclose, and tells
        # TLS from plain TCP by the absence of do_handshake: all are the stream's own.
        return getattr(self._stream, name)

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """The next data, as the stream gives it; while the server closes the connection,
        everything up to the client's EOF is dropped. Cancelling it cancels the read."""
        connection = self._connection
        while True:
            data = await self._stream.receive_some(max_bytes)
            if not connection.dropping:
                if data:
                    connection.bytes_arrived()
                elif connection.phase == "head":
                    # The client closed before a whole request head. hypercorn would keep
                    # the connection's task (and its socket) until its idle timer ran out,
                    # keep_alive_timeout later: the timer started with the connection and
                    # nothing else stops it.
                    await connection.idle_task.stop()
                return data
            if not data:
                connection.dropped_to_eof()
                return data


def watch_connections(config: WatchedConfig, hooks: ConnectionHooks) -> None:
    """Make every connection served with ``config`` report to ``hooks``; hypercorn's trio
    worker builds WatchedConnection (instead of TCPServer) for every server from here on,
    which serves a connection whose config has no hooks exactly as TCPServer does."""
    config.connection_hooks = hooks
    cast(Any, hypercorn.trio.run).TCPServer = WatchedConnection


check_libraries()
