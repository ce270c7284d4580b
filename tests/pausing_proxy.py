"""A TCP proxy on loopback that can pause: it forwards bytes between its clients and one
upstream until ``pause()``, then holds what it reads (in both directions, and from new
connections too) without closing anything, until ``resume()`` sends it on. A process
behind it sees a network partition: its connections stay open and go silent, and what it
sent meanwhile arrives late, as after a partition heals. ``refuse()`` is the other kind of
partition: every connection is closed, and new ones are closed as they come, until
``resume()``; what was sent is lost, and the process behind it sees its calls fail."""

from __future__ import annotations

from functools import partial

import trio


class PausingProxy:
    def __init__(self, upstream_port: int) -> None:
        self._upstream_port = upstream_port
        self._flowing = trio.Event()
        self._flowing.set()
        self.port = 0
        self.connections = 0
        self._refusing = False
        self._open: set[trio.CancelScope] = set()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def pause(self) -> None:
        """Stop forwarding (synchronous): bytes read from here on wait for ``resume``."""
        if self._flowing.is_set():
            self._flowing = trio.Event()

    @property
    def paused(self) -> bool:
        return not self._flowing.is_set()

    def refuse(self) -> None:
        """Close every connection, and each new one as it comes, until ``resume``."""
        self._refusing = True
        for scope in self._open:
            scope.cancel()

    def resume(self) -> None:
        self._refusing = False
        self._flowing.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Accept and forward until cancelled; cancelling it closes every connection."""
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        task_status.started()
        await trio.serve_listeners(self._forward, listeners)

    async def _forward(self, client: trio.SocketStream) -> None:
        self.connections += 1
        if self._refusing:
            await client.aclose()
            return
        with trio.CancelScope() as scope:  # ``refuse`` cancels it: both sides close
            self._open.add(scope)
            try:
                async with (
                    client,
                    await trio.open_tcp_stream("127.0.0.1", self._upstream_port) as up,
                    trio.open_nursery() as nursery,
                ):
                    done = partial(nursery.cancel_scope.cancel)
                    nursery.start_soon(self._pump, client, up, done)
                    nursery.start_soon(self._pump, up, client, done)
            finally:
                self._open.discard(scope)

    async def _pump(
        self, source: trio.SocketStream, sink: trio.SocketStream, done: partial[None]
    ) -> None:
        try:
            while data := await source.receive_some():
                await self._flowing.wait()
                await sink.send_all(data)
        except trio.BrokenResourceError:
            pass
        done()
