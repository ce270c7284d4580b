"""A real Redis Sentinel set-up for the tests, on loopback: a primary, one replica of it
(``--replicaof``) and three sentinels (``redis-server <conf> --sentinel``) that monitor it
with a quorum of two, and fail it over half a second after it stops answering. Every
process is a ``RedisServer`` (the same binary), stopped by pid.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from fakes.redis_server import RedisServer, ask

SERVICE = "tether"
# How long the sentinels wait for an unanswering primary before they agree it is down,
# and how long a failover may take before they try again.
DOWN_AFTER_MS = 500
FAILOVER_TIMEOUT_MS = 3000


def _sentinel_config(primary_port: int, password: str | None, sentinel_password: str | None) -> str:
    config = (
        f"sentinel monitor {SERVICE} 127.0.0.1 {primary_port} 2\n"
        f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
        f"sentinel failover-timeout {SERVICE} {FAILOVER_TIMEOUT_MS}\n"
        f"sentinel parallel-syncs {SERVICE} 1\n"
    )
    if password is not None:  # the primary's and its replica's
        config += f"sentinel auth-pass {SERVICE} {password}\n"
    if sentinel_password is not None:  # the sentinels' own, which they use among themselves
        config += f"requirepass {sentinel_password}\nsentinel sentinel-pass {sentinel_password}\n"
    return config


class SentinelSet:
    """A primary, its replica and three sentinels: ``start()``, ``kill_primary()`` (SIGKILL,
    as a crash), ``wait_for_failover()``, ``stop()``."""

    def __init__(
        self, *, password: str | None = None, sentinel_password: str | None = None
    ) -> None:
        """``password``: the primary's and its replica's (``requirepass``, and
        ``masterauth`` to copy a primary); ``sentinel_password``: the sentinels' own."""
        self.password = password
        self.sentinel_password = sentinel_password
        auth = () if password is None else ("--requirepass", password, "--masterauth", password)
        self.first_primary = RedisServer(args=auth)
        # Their options name the primary's port when they start: it is sure only then.
        primary = self.first_primary
        self.first_replica = RedisServer(
            args=lambda: ("--replicaof", "127.0.0.1", str(primary.port), *auth)
        )
        self.sentinels = [
            RedisServer(
                config=lambda: _sentinel_config(primary.port, password, sentinel_password),
                args=("--sentinel",),
            )
            for _ in range(3)
        ]

    @property
    def addresses(self) -> str:
        """The sentinels, as ``TETHER_REDIS_SENTINELS`` names them."""
        return ",".join(f"127.0.0.1:{s.port}" for s in self.sentinels)

    def settings(self) -> dict[str, object]:
        """Tether's settings for this set (without a key prefix)."""
        return {
            "backend": "redis",
            "redis_sentinels": self.addresses,
            "redis_sentinel_service": SERVICE,
            "redis_sentinel_password": self.sentinel_password,
            "redis_password": self.password,
        }

    def start(self, *, agree: bool = True, timeout: float = 30.0) -> None:
        """Start every process. With ``agree``, return once the replica copies the
        primary and every sentinel knows the replica and the two other sentinels (they
        find each other through the primary, every two seconds: about 5 s), as a failover
        needs; without, as soon as they answer (enough to find the primary)."""
        try:
            self.first_primary.start()
            self.first_replica.start()
            for sentinel in self.sentinels:
                sentinel.start()
            if agree:
                self._wait(self._agreed, timeout, "the sentinels did not agree on the set")
        except BaseException:
            self.stop()
            raise

    def _agreed(self) -> bool:
        info = ask(self.first_replica.port, "INFO", "replication", password=self.password)
        if not isinstance(info, str) or "master_link_status:up" not in info:
            return False
        for sentinel in self.sentinels:
            others = self._ask_sentinel(sentinel.port, "SENTINEL", "SENTINELS", SERVICE)
            replicas = self._ask_sentinel(sentinel.port, "SENTINEL", "REPLICAS", SERVICE)
            if not isinstance(others, list) or len(others) != 2:
                return False
            if not isinstance(replicas, list) or len(replicas) != 1:
                return False
        return True

    def _ask_sentinel(self, port: int, *words: str) -> object:
        return ask(port, *words, password=self.sentinel_password)

    def primary_port(self) -> int | None:
        """The primary's port, as the first sentinel that answers says."""
        for sentinel in self.sentinels:
            try:
                reply = self._ask_sentinel(
                    sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
                )
            except OSError:
                continue
            if isinstance(reply, list) and len(reply) == 2:
                return int(str(reply[1]))
        return None

    def kill_primary(self) -> None:
        """SIGKILL the first primary, as a crash."""
        self.first_primary.kill()

    def wait_for_failover(self, timeout: float = 30.0) -> int:
        """Wait until every sentinel names the replica as the primary and it answers as
        one; returns its port."""
        new = self.first_replica.port

        def promoted() -> bool:
            for sentinel in self.sentinels:
                reply = self._ask_sentinel(
                    sentinel.port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", SERVICE
                )
                if not isinstance(reply, list) or int(str(reply[1])) != new:
                    return False
            role = ask(new, "ROLE", password=self.password)
            return isinstance(role, list) and role[0] == "master"

        self._wait(promoted, timeout, "the sentinels did not fail the primary over")
        return new

    @staticmethod
    def _wait(condition: Callable[[], bool], timeout: float, failure: str) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if condition():
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(failure)
            time.sleep(0.05)

    def stop(self) -> None:
        for server in (*self.sentinels, self.first_replica, self.first_primary):
            server.stop()
