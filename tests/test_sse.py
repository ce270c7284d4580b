"""The one SSE encoder: hostile text cannot break a stream's framing. Read back with
httpx2's own event-stream parser."""

from __future__ import annotations

import httpx2
import pytest

from server.api import sse

HOSTILE = [
    "plain",
    "line\nbreak",
    "carriage\rreturn",
    "crlf\r\nbreak",
    "url http://x/\r\ndata: injected",
    "trailing\r",
    "\n\nleading blank lines",
    "ends with data: [DONE]\r",
]


def _parse(text: str) -> list[httpx2.ServerSentEvent]:
    response = httpx2.Response(
        200,
        headers={"content-type": "text/event-stream"},
        content=text.encode(),
        request=httpx2.Request("GET", "http://x"),
    )
    return list(httpx2.EventSource(response))


@pytest.mark.parametrize("text", HOSTILE)
def test_a_comment_carrying_any_line_break_stays_one_comment(text: str) -> None:
    stream = sse.comment(text) + sse.event("after")
    assert [e.data for e in _parse(stream)] == ["after"]


@pytest.mark.parametrize("text", HOSTILE)
def test_data_with_any_line_break_comes_back_with_its_lines(text: str) -> None:
    [parsed] = _parse(sse.event(text, id=7))
    expected = text.replace("\r\n", "\n").replace("\r", "\n")
    assert parsed.data == expected
    assert parsed.id == "7"


def test_an_id_with_a_line_break_cannot_add_a_field() -> None:
    [parsed] = _parse(sse.event("x", id="1\rdata: injected"))
    assert parsed.data == "x"
