"""Responses with Tether's tools, on both task backends: a web search as a
``web_search_call`` item whose sources the answer cites as ``url_citation`` annotations, an
MCP server's tools as ``mcp_list_tools`` and ``mcp_call`` items, and a cancel or a skip
during each of them, checked closed at the fake search engine and at the MCP server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import trio
from openai.types.responses import Response

from fakes.mcp_server import McpHttpFake, McpRecorder
from fakes.model import TextReply, ToolCallReply
from tests.conftest import WAIT, Fakes, Tether
from tests.helpers import assert_log_well_formed
from tests.spec_check import assert_spec_valid
from tests.test_mcp import MCP_WAIT, _assert_cancelled_on_server, _start, http_mcp, recorder
from tests.test_responses import _events, sdk

__all__ = ["http_mcp", "recorder"]  # fixtures, used by name

pytestmark = pytest.mark.both_backends

MCP_TOOL = {"type": "mcp", "server_label": "files", "require_approval": "never"}


async def test_web_search_is_a_web_search_call_and_the_answer_cites_its_sources(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(TextReply(["Trio nurseries wait [1]."]))
    async with sdk(tether) as client:
        with trio.fail_after(WAIT):
            created = await client.responses.create(
                model="fake-model",
                input="What do nurseries do?",
                tools=[{"type": "web_search"}],
                background=True,
            )
        events = await _events(tether, f"/v1/responses/{created.id}?stream=true")
        done = await client.responses.retrieve(created.id)
    kinds = [e["type"] for e in events]
    for kind in ("in_progress", "searching", "completed"):
        assert f"response.web_search_call.{kind}" in kinds
    search, message = done.output
    assert search.type == "web_search_call" and search.status == "completed"
    assert message.type == "message" and message.content[0].type == "output_text"
    (citation,) = message.content[0].annotations
    task = (await tether.client.get(f"/api/tasks/{created.id}")).json()
    assert citation.type == "url_citation" and citation.url == task["sources"][0]["url"]
    assert done.output_text[citation.start_index : citation.end_index] == "[1]"


async def test_cancel_during_the_search_closes_its_connection(tether: Tether, fakes: Fakes) -> None:
    fakes.search.configure(delay=30)
    async with sdk(tether) as client:
        created = await client.responses.create(
            model="fake-model", input="x", tools=[{"type": "web_search"}], background=True
        )
        with trio.fail_after(WAIT):
            request = await fakes.search.wait_for_request("/search")
            cancelled = await client.responses.cancel(created.id)
            await fakes.search.wait_connection_closed(request.conn_id)
    assert cancelled.status == "cancelled"
    (search,) = cancelled.output
    assert search.type == "web_search_call" and search.status == "failed"
    assert not fakes.model.chat_requests
    terminal = assert_log_well_formed(await tether.events(created.id))
    assert terminal["data"]["phase"] == "web_search"


async def _mcp_tether(start_tether: Any, tmp_path: Path, http_mcp: McpHttpFake) -> Tether:
    return await _start(start_tether, tmp_path, {"files": {"url": http_mcp.url}})


async def test_mcp_tools_are_listed_and_called_as_items(
    start_tether: Any, tmp_path: Path, fakes: Fakes, http_mcp: McpHttpFake
) -> None:
    tether = await _mcp_tether(start_tether, tmp_path, http_mcp)
    fakes.model.push(
        ToolCallReply([("mcp__files__echo", {"text": "hello"})]), TextReply(["It said hello."])
    )
    async with sdk(tether) as client:
        with trio.fail_after(MCP_WAIT):
            done = await client.responses.create(
                model="fake-model", input="echo hello", tools=[MCP_TOOL]
            )
    Response.model_validate(done.model_dump())
    listed, call, message = done.output
    assert listed.type == "mcp_list_tools" and listed.server_label == "files"
    assert "echo" in [t.name for t in listed.tools]
    assert call.type == "mcp_call" and call.name == "echo" and call.status == "completed"
    assert call.output == "echo: hello"
    assert message.type == "message" and done.output_text == "It said hello."


async def test_cancel_during_an_mcp_call_cancels_it_on_the_server(
    start_tether: Any,
    tmp_path: Path,
    fakes: Fakes,
    http_mcp: McpHttpFake,
    recorder: McpRecorder,
) -> None:
    tether = await _mcp_tether(start_tether, tmp_path, http_mcp)
    fakes.model.push(ToolCallReply([("mcp__files__slow", {"seconds": 30})]))
    async with sdk(tether) as client:
        created = await client.responses.create(
            model="fake-model", input="wait", tools=[MCP_TOOL], background=True
        )
        with trio.fail_after(MCP_WAIT):
            call = await recorder.wait_for("call", server="web", tool="slow")
            cancelled = await client.responses.cancel(created.id)
    await _assert_cancelled_on_server(recorder, "web", call)
    assert cancelled.status == "cancelled"
    mcp_call = [item for item in cancelled.output if item.type == "mcp_call"][0]
    assert mcp_call.status == "incomplete"


async def test_an_mcp_server_that_is_not_configured_is_refused_and_never_reached(
    tether: Tether, fakes: Fakes
) -> None:
    response = await tether.client.post(
        "/v1/responses",
        json={
            "model": "fake-model",
            "input": "x",
            "tools": [{**MCP_TOOL, "server_url": "http://127.0.0.1:9/mcp"}],
        },
    )
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "tools[0].server_label"
    assert not fakes.model.chat_requests


async def test_a_skipped_search_ends_its_web_search_call_incomplete_and_the_answer_comes(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.search.configure(delay=30)
    fakes.model.push(TextReply(["Without the search."]))
    async with sdk(tether) as client:
        created = await client.responses.create(
            model="fake-model", input="x", tools=[{"type": "web_search"}], background=True
        )
        with trio.fail_after(WAIT):
            request = await fakes.search.wait_for_request("/search")
            skipped = await tether.client.post(
                f"/api/tasks/{created.id}/skip", json={"step": "web_search"}
            )
            await fakes.search.wait_connection_closed(request.conn_id)
        assert skipped.status_code == 200
        await _events(tether, f"/v1/responses/{created.id}?stream=true")
        done = await client.responses.retrieve(created.id)
    assert done.status == "completed" and done.output_text == "Without the search."
    assert_spec_valid("Response", done.model_dump(exclude_unset=True))
    search = done.output[0]
    assert search.type == "web_search_call" and search.status == "completed"
    assert search.model_extra == {"skipped": True}


async def test_skipping_an_mcp_call_cancels_it_on_the_server_and_the_answer_goes_on(
    start_tether: Any,
    tmp_path: Path,
    fakes: Fakes,
    http_mcp: McpHttpFake,
    recorder: McpRecorder,
) -> None:
    tether = await _mcp_tether(start_tether, tmp_path, http_mcp)
    fakes.model.push(
        ToolCallReply([("mcp__files__slow", {"seconds": 30})]), TextReply(["Skipped it."])
    )
    async with sdk(tether) as client:
        created = await client.responses.create(
            model="fake-model", input="wait", tools=[MCP_TOOL], background=True
        )
        with trio.fail_after(MCP_WAIT):
            call = await recorder.wait_for("call", server="web", tool="slow")
            skipped = await tether.client.post(
                f"/api/tasks/{created.id}/skip", json={"step": "call_fake_0"}
            )
        assert skipped.status_code == 200
        await _assert_cancelled_on_server(recorder, "web", call)
        await _events(tether, f"/v1/responses/{created.id}?stream=true")
        done = await client.responses.retrieve(created.id)
    assert done.output_text == "Skipped it."
    assert_spec_valid("Response", done.model_dump(exclude_unset=True))
    mcp_call = [item for item in done.output if item.type == "mcp_call"][0]
    assert mcp_call.status == "incomplete" and mcp_call.model_extra == {"skipped": True}
