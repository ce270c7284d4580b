"""Clients that never finish their request (slowloris, slow bodies) and the connection caps,
tried with raw sockets against the real server."""

from __future__ import annotations

import json
from typing import Any

import trio
from trio_websocket import open_websocket_url

from tests.conftest import WAIT, StartTether, Tether
from tests.helpers import chat_body, until

# A bound, not a benchmark: how much later than its setting a timeout may act.
SLACK_S = 4.0

SLOW_HEAD = (
    b"POST /api/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"X-Padding: " + b"a" * 200 + b"\r\n\r\n"
)
HEALTH = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"


async def _connect(tether: Tether) -> trio.SocketStream:
    host, port = tether.base_url.removeprefix("http://").split(":")
    return await trio.open_tcp_stream(host, int(port))


async def _drip(stream: trio.SocketStream, data: bytes, pace_s: float) -> None:
    """Send ``data`` one byte every ``pace_s``, until it is all sent or the server closes."""
    try:
        for i in range(len(data)):
            await stream.send_all(data[i : i + 1])
            await trio.sleep(pace_s)
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        pass


async def _read_to_eof(stream: trio.SocketStream) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as the
    close)."""
    received = b""
    with trio.fail_after(WAIT):
        try:
            while chunk := await stream.receive_some(65536):
                received += chunk
        except trio.BrokenResourceError:
            pass
    return received


async def _exchange(stream: trio.SocketStream, request: bytes) -> bytes:
    """Send ``request`` and read one answer with a Content-Length body."""
    await stream.send_all(request)
    received = b""
    with trio.fail_after(WAIT):
        while b"\r\n\r\n" not in received:
            chunk = await stream.receive_some(65536)
            assert chunk, f"closed after {received!r}"
            received += chunk
        head, _, body = received.partition(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        while len(body) < length:
            body += await stream.receive_some(65536)
    return head + b"\r\n\r\n" + body


def _split(answer: bytes) -> tuple[bytes, dict[str, Any]]:
    head, _, body = answer.partition(b"\r\n\r\n")
    return head, json.loads(body)


def _sample(tether: Tether, name: str, labels: dict[str, str] | None = None) -> float:
    value = tether.runtime.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


async def test_a_head_dripped_past_the_bound_is_answered_408_and_closed(
    start_tether: StartTether,
) -> None:
    tether: Tether = await start_tether(request_head_timeout_s=1.0)
    async with await _connect(tether) as stream, trio.open_nursery() as nursery:
        started = trio.current_time()
        nursery.start_soon(_drip, stream, SLOW_HEAD, 0.2)
        answer = await _read_to_eof(stream)
        elapsed = trio.current_time() - started
        nursery.cancel_scope.cancel()
    head, body = _split(answer)
    assert head.startswith(b"HTTP/1.1 408 ")
    assert b"connection: close" in head.lower()
    assert body["error"]["code"] == "request_timeout"
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert 1.0 <= elapsed < 1.0 + SLACK_S
    assert _sample(tether, "tether_request_timeouts_total", {"part": "head"}) == 1
    await until(lambda: _gauge_is(tether, 0))


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(
    start_tether: StartTether,
) -> None:
    tether: Tether = await start_tether(request_head_timeout_s=0.5)
    async with await _connect(tether) as stream:
        started = trio.current_time()
        assert await _read_to_eof(stream) == b""
        assert trio.current_time() - started < 0.5 + SLACK_S
    await until(lambda: _gauge_is(tether, 0))


async def _gauge_is(tether: Tether, value: float) -> bool:
    return _sample(tether, "tether_connections_open") == value


async def test_a_keep_alive_connection_idles_past_the_head_bound_between_requests(
    start_tether: StartTether,
) -> None:
    tether: Tether = await start_tether(request_head_timeout_s=0.5)
    async with await _connect(tether) as stream:
        assert (await _exchange(stream, HEALTH)).startswith(b"HTTP/1.1 200 ")
        await trio.sleep(1.5)  # idle for three head bounds: only keep_alive_timeout applies
        assert (await _exchange(stream, HEALTH)).startswith(b"HTTP/1.1 200 ")


async def test_a_later_head_dripped_on_a_keep_alive_connection_is_timed_from_its_first_byte(
    start_tether: StartTether,
) -> None:
    tether: Tether = await start_tether(request_head_timeout_s=1.0)
    async with await _connect(tether) as stream, trio.open_nursery() as nursery:
        assert (await _exchange(stream, HEALTH)).startswith(b"HTTP/1.1 200 ")
        started = trio.current_time()
        nursery.start_soon(_drip, stream, SLOW_HEAD, 0.2)
        answer = await _read_to_eof(stream)
        elapsed = trio.current_time() - started
        nursery.cancel_scope.cancel()
    assert answer.startswith(b"HTTP/1.1 408 ")
    assert 1.0 <= elapsed < 1.0 + SLACK_S


async def test_a_websocket_lives_past_the_head_bound(start_tether: StartTether) -> None:
    tether: Tether = await start_tether(request_head_timeout_s=0.5)
    async with open_websocket_url(tether.ws_url) as ws:
        with trio.fail_after(WAIT):
            assert json.loads(await ws.get_message())["type"] == "session"
        await trio.sleep(1.5)  # three head bounds: the WebSocket is past its head
        await ws.send_message(json.dumps({"type": "ping"}))
        with trio.fail_after(WAIT):
            assert json.loads(await ws.get_message()) == {"type": "pong"}


async def test_a_body_trickled_below_the_floor_is_answered_408_and_closed(
    start_tether: StartTether,
) -> None:
    # 100 bytes a second over half-second windows: 50 bytes a window; 10 are sent.
    tether: Tether = await start_tether(request_body_min_rate=100, request_body_window_s=0.5)
    head = (
        b"POST /api/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nContent-Length: 1000\r\n\r\n"
    )
    async with await _connect(tether) as stream, trio.open_nursery() as nursery:
        await stream.send_all(head + b'{"model": ')
        started = trio.current_time()
        nursery.start_soon(_drip, stream, b" " * 990, 0.1)
        answer = await _read_to_eof(stream)
        elapsed = trio.current_time() - started
        nursery.cancel_scope.cancel()
    head_part, body = _split(answer)
    assert head_part.startswith(b"HTTP/1.1 408 ")
    assert body["error"]["code"] == "request_timeout"
    assert elapsed < 0.5 + SLACK_S
    assert _sample(tether, "tether_request_timeouts_total", {"part": "body"}) == 1


async def test_a_body_sent_above_the_floor_in_pieces_is_served(start_tether: StartTether) -> None:
    tether: Tether = await start_tether(request_body_min_rate=100, request_body_window_s=0.5)
    payload = json.dumps({**chat_body(), "background": True, "pad": " " * 400}).encode()
    head = (
        b"POST /api/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nContent-Length: " + str(len(payload)).encode() + b"\r\n\r\n"
    )
    async with await _connect(tether) as stream:
        await stream.send_all(head)
        pieces = [payload[i : i + 60] for i in range(0, len(payload), 60)]
        for piece in pieces[:-1]:  # 60 bytes every 0.2 s: 300 bytes a second
            await stream.send_all(piece)
            await trio.sleep(0.2)
        answer = await _exchange(stream, pieces[-1])
    assert answer.startswith(b"HTTP/1.1 202 "), answer


async def test_connections_past_the_cap_are_refused_503_and_the_count_comes_back(
    start_tether: StartTether,
) -> None:
    tether: Tether = await start_tether(max_connections=3)
    held = [await _connect(tether) for _ in range(3)]
    for stream in held:  # each one served: admitted, and kept open (keep-alive)
        assert (await _exchange(stream, HEALTH)).startswith(b"HTTP/1.1 200 ")
    assert _sample(tether, "tether_connections_open") == 3
    async with await _connect(tether) as refused:
        await refused.send_all(HEALTH)
        head, body = _split(await _read_to_eof(refused))
    assert head.startswith(b"HTTP/1.1 503 ")
    assert b"retry-after: 1" in head.lower()
    assert body["error"]["code"] == "too_many_connections"
    assert _sample(tether, "tether_connections_refused_total", {"reason": "max_connections"}) == 1
    await held.pop().aclose()
    await until(lambda: _gauge_is(tether, 2))
    async with await _connect(tether) as again:
        assert (await _exchange(again, HEALTH)).startswith(b"HTTP/1.1 200 ")
    for stream in held:
        await stream.aclose()
    await until(lambda: _gauge_is(tether, 0))


async def test_connections_past_the_cap_per_client_are_refused(start_tether: StartTether) -> None:
    tether: Tether = await start_tether(max_connections_per_client=2)
    async with await _connect(tether) as first, await _connect(tether) as second:
        for stream in (first, second):
            assert (await _exchange(stream, HEALTH)).startswith(b"HTTP/1.1 200 ")
        async with await _connect(tether) as third:
            head, body = _split(await _read_to_eof(third))
    assert head.startswith(b"HTTP/1.1 503 ")
    assert body["error"]["code"] == "too_many_connections"
    labels = {"reason": "max_connections_per_client"}
    assert _sample(tether, "tether_connections_refused_total", labels) == 1


async def test_requests_and_websockets_work_under_the_limits(start_tether: StartTether) -> None:
    tether: Tether = await start_tether(
        request_head_timeout_s=1.0, max_connections=10, max_connections_per_client=5
    )
    response = await tether.chat(chat_body())
    assert response.status_code == 200, response.text
    async with open_websocket_url(tether.ws_url) as ws:
        with trio.fail_after(WAIT):
            assert json.loads(await ws.get_message())["type"] == "session"
        await ws.send_message(json.dumps({"type": "ping"}))
        with trio.fail_after(WAIT):
            assert json.loads(await ws.get_message()) == {"type": "pong"}
    metrics = (await tether.client.get("/metrics")).text
    assert "tether_connections_open " in metrics
