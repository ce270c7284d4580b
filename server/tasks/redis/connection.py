"""The connections to one Redis, shared by the store, admission and the cluster."""

from __future__ import annotations

import coredis

from server.library_internals import SlotKeepingPool
from server.tasks.redis import scripts
from server.tasks.redis.keys import Keys


class RedisConnection:
    """Two clients. Commands share a few multiplexed connections; a blocking read (a
    reader waiting on a log written elsewhere, the control stream) holds one of its own
    until it returns. Apart, a crowd of waiting readers can never leave the appends and
    the heartbeat without a connection. Their connections live while the cluster serves
    (``RedisCluster.serve``)."""

    def __init__(self, url: str, *, prefix: str, timeout_s: float, max_connections: int) -> None:
        self.url = url
        self.keys = Keys(prefix)
        self.timeout_s = timeout_s
        self.commands = coredis.Redis(
            connection_pool=SlotKeepingPool.from_url(
                url, decode_responses=True, max_connections=64
            ),
            decode_responses=True,
        )
        self.waiting = coredis.Redis(
            connection_pool=SlotKeepingPool.from_url(
                url, decode_responses=True, max_connections=max_connections
            ),
            decode_responses=True,
        )
        self.reserve = self.commands.register_script(scripts.RESERVE)
        self.release = self.commands.register_script(scripts.RELEASE)
        self.create = self.commands.register_script(scripts.CREATE)
        self.append = self.commands.register_script(scripts.APPEND)
        self.finish = self.commands.register_script(scripts.FINISH)
        self.session = self.commands.register_script(scripts.SESSION)
