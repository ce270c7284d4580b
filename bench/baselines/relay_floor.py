"""The relay floor: the least any server on this stack can do per streamed event.

A raw ASGI app on hypercorn (trio worker), with no framework, no task runtime, no event log
and no validation. One WebSocket route, ``/ws``: on connect it sends
``{"type": "session", "session_id": "x"}``; for each client message
``{"type": "chat", "request": {...}}`` it opens one streaming POST (httpx2) to the model's
``/chat/completions`` with that request (``stream`` forced on), reads the body raw, splits the
SSE stream into events at blank lines, and sends each event's data (the chunk JSON text) to
the WebSocket as one text frame (one ASGI ``websocket.send``), then ``{"type": "done"}`` when
``[DONE]`` arrives (``{"type": "failed"}`` if the model request fails).
``GET /healthz`` answers ``{"status": "ok"}``.

The bench runs the same streams against it and against Tether and divides each server's CPU
time by the model tokens that reached the clients: Tether's figure over this one is what its
task runtime, event log and fan-out cost per token.

    python -m bench.baselines.relay_floor --port 0 --llm-base-url URL/v1

prints ``READY <port>`` once listening.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Awaitable, Callable
from typing import Any

import httpx2
import trio

from bench.baselines import hosting

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

SESSION = json.dumps({"type": "session", "session_id": "x"})
DONE = json.dumps({"type": "done"})
FAILED = json.dumps({"type": "failed"})
HEALTHZ = b'{"status": "ok"}'


class RelayFloor:
    def __init__(self, llm_base_url: str) -> None:
        self.url = llm_base_url.rstrip("/") + "/chat/completions"
        self.http: httpx2.AsyncClient | None = None

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket" and scope["path"] == "/ws":
            await self._websocket(receive, send)
        elif kind == "websocket":
            await receive()
            await send({"type": "websocket.close", "code": 1008})

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.http = httpx2.AsyncClient(
                    limits=httpx2.Limits(max_connections=5000, max_keepalive_connections=5000),
                    timeout=httpx2.Timeout(300.0, connect=10.0),
                    trust_env=False,
                )
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.http is not None:
                    await self.http.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _http(self, scope: Message, receive: Receive, send: Send) -> None:
        while (await receive()).get("more_body"):
            pass
        found = scope["path"] == "/healthz"
        body = HEALTHZ if found else b'{"error": "not found"}'
        await send(
            {
                "type": "http.response.start",
                "status": 200 if found else 404,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def _websocket(self, receive: Receive, send: Send) -> None:
        if (await receive())["type"] != "websocket.connect":
            return
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.send", "text": SESSION})
        async with trio.open_nursery() as nursery:
            while True:
                message = await receive()
                if message["type"] != "websocket.receive":
                    break  # websocket.disconnect
                try:
                    command = json.loads(message.get("text") or message.get("bytes") or "")
                except ValueError:
                    continue
                if (
                    isinstance(command, dict)
                    and command.get("type") == "chat"
                    and isinstance(command.get("request"), dict)
                ):
                    nursery.start_soon(self._relay, command["request"], send)
            nursery.cancel_scope.cancel()

    async def _relay(self, request: dict[str, Any], send: Send) -> None:
        """One model stream to one WebSocket: each SSE event's data as one text frame."""
        body = {**request, "stream": True}
        try:
            await self._stream(body, send)
        except httpx2.HTTPError:
            await send({"type": "websocket.send", "text": FAILED})

    async def _stream(self, body: dict[str, Any], send: Send) -> None:
        assert self.http is not None
        buffer = b""
        async with self.http.stream("POST", self.url, json=body) as answer:
            async for raw in answer.aiter_raw():
                buffer += raw
                *events, buffer = buffer.split(b"\n\n")
                for event in events:
                    for line in event.split(b"\n"):
                        if not line.startswith(b"data:"):
                            continue
                        data = line[5:].strip()
                        if data == b"[DONE]":
                            await send({"type": "websocket.send", "text": DONE})
                            return
                        await send({"type": "websocket.send", "text": data.decode()})


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--llm-base-url", required=True)
    args = parser.parse_args(argv)
    hosting.run(RelayFloor(args.llm_base_url), args.port, mode="asgi")


if __name__ == "__main__":
    main()
