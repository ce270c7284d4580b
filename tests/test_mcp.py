"""Tools of MCP servers: real servers built with the SDK (fakes/mcp_server.py), over
stdio (a subprocess) and over streamable HTTP (on a loopback port), called by the model
through Tether, and cancelled on the server when the task is stopped."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import mcp_types
import pytest
import trio

from fakes.mcp_server import McpHttpFake, McpRecorder, stdio_command
from fakes.model import TextReply, ToolCallReply
from server.config import McpHttpServer, McpStdioServer, SettingsError, read_mcp_config
from server.providers.tools.mcp import function_name, result_text
from tests.conftest import WAIT, Fakes, Tether
from tests.helpers import assert_log_well_formed, chat_body

# Starting a stdio server is starting a Python process that imports the SDK: about a second.
MCP_WAIT = WAIT * 2

TRANSPORTS = ("stdio", "http")


@pytest.fixture
async def recorder(nursery: trio.Nursery) -> McpRecorder:
    recorder = McpRecorder()
    await recorder.start(nursery)
    return recorder


@pytest.fixture
async def http_mcp(nursery: trio.Nursery, recorder: McpRecorder) -> AsyncIterator[McpHttpFake]:
    server = McpHttpFake("web", recorder)
    await server.start(nursery)
    yield server
    server.stop()


def _stdio_entry(label: str, recorder: McpRecorder) -> dict[str, Any]:
    command, args = stdio_command(label, recorder)
    return {"command": command, "args": args}


def _write_config(tmp_path: Path, servers: dict[str, Any]) -> str:
    path = tmp_path / "mcp.json"
    path.write_text(json.dumps({"mcpServers": servers}))
    return str(path)


async def _start(
    start_tether: Any, tmp_path: Path, servers: dict[str, Any], **overrides: Any
) -> Tether:
    with trio.fail_after(MCP_WAIT):
        tether: Tether = await start_tether(
            mcp_config=_write_config(tmp_path, servers), **overrides
        )
    return tether


@pytest.fixture
def servers(
    request: pytest.FixtureRequest, recorder: McpRecorder, http_mcp: McpHttpFake
) -> dict[str, Any]:
    """One server named "files" on the transport the test is parametrized with."""
    if getattr(request, "param", "stdio") == "http":
        return {"files": {"url": http_mcp.url}}
    return {"files": _stdio_entry("files-stdio", recorder)}


def _label(servers: dict[str, Any]) -> str:
    """The recorder's name for the "files" server."""
    return "web" if "url" in servers["files"] else "files-stdio"


def _tool_messages(fakes: Fakes) -> list[dict[str, Any]]:
    return [m for m in fakes.model.chat_requests[-1]["messages"] if m["role"] == "tool"]


# ----------------------------------------------------------------------------- calls


@pytest.mark.parametrize("servers", TRANSPORTS, indirect=True)
async def test_mcp_tool_result_reaches_the_model_and_the_answer(
    start_tether: Any, tmp_path: Path, fakes: Fakes, servers: dict[str, Any]
) -> None:
    tether = await _start(start_tether, tmp_path, servers)
    fakes.model.push(
        ToolCallReply([("mcp__files__echo", {"text": "hello"})]),
        TextReply(["The tool said ", "echo: hello."]),
    )
    task_id = await tether.background(chat_body("echo it", tool_ids=["mcp:files:echo"]))
    events = await tether.events(task_id)
    terminal = assert_log_well_formed(events)
    assert terminal["type"] == "task:completed"
    assert terminal["data"]["content"] == "The tool said echo: hello."
    offered = fakes.model.chat_requests[0]["tools"]
    assert [t["function"]["name"] for t in offered] == ["mcp__files__echo"]
    assert offered[0]["function"]["parameters"]["properties"]["text"]["type"] == "string"
    assert [m["content"] for m in _tool_messages(fakes)] == ["echo: hello"]
    calls = [e["data"] for e in events if e["type"] == "status"]
    assert calls[0]["description"] == "Calling echo on MCP server files"
    assert calls[-1]["done"] is True and "error" not in calls[-1]
    for status in calls:
        assert status["mcp_server"] == "files" and status["mcp_tool"] == "echo"
        assert status["tool_id"] == "mcp:files:echo"
    assert terminal["data"]["tool_calls"][0]["result"] == "echo: hello"


async def test_structured_content_and_progress_reach_the_task(
    start_tether: Any, tmp_path: Path, fakes: Fakes, http_mcp: McpHttpFake
) -> None:
    tether = await _start(start_tether, tmp_path, {"web": {"url": http_mcp.url}})
    fakes.model.push(
        ToolCallReply(
            [
                ("mcp__web__add", {"a": 2, "b": 40}),
                ("mcp__web__slow", {"seconds": 0.02, "steps": 2}),
            ]
        ),
        TextReply(["ok"]),
    )
    task_id = await tether.background(chat_body("add", tool_ids=["mcp:web:add", "mcp:web:slow"]))
    events = await tether.events(task_id)
    assert assert_log_well_formed(events)["type"] == "task:completed"
    added, slept = (m["content"] for m in _tool_messages(fakes))
    assert json.loads(added) == {"sum": 42}
    assert slept == "slept 0.02 s"
    progress = [e["data"] for e in events if e["type"] == "status" and "progress" in e["data"]]
    assert [(p["progress"], p["total"]) for p in progress] == [(1, 2), (2, 2)]
    assert progress[0]["description"] == "slow on MCP server web: step 1 of 2"
    assert all(p["mcp_server"] == "web" and p["done"] is False for p in progress)


@pytest.mark.parametrize("servers", TRANSPORTS, indirect=True)
async def test_mcp_tool_errors_give_the_model_error_results(
    start_tether: Any, tmp_path: Path, fakes: Fakes, servers: dict[str, Any]
) -> None:
    tether = await _start(start_tether, tmp_path, servers)
    fakes.model.push(
        ToolCallReply(
            [
                ("mcp__files__fail", {"message": "disk on fire"}),
                ("mcp__files__refuse", {"message": "quota exceeded"}),
            ]
        ),
        TextReply(["sorry"]),
    )
    task_id = await tether.background(
        chat_body("go", tool_ids=["mcp:files:fail", "mcp:files:refuse"])
    )
    events = await tether.events(task_id)
    assert assert_log_well_formed(events)["type"] == "task:completed"
    failed, refused = (m["content"] for m in _tool_messages(fakes))
    assert failed == "Error: Error executing tool fail: disk on fire"
    assert refused == ("Error: MCP server files answered refuse with an error: quota exceeded")
    ends = [e["data"] for e in events if e["type"] == "status" and e["data"]["done"]]
    assert sorted(end["description"] for end in ends) == [
        "fail on MCP server files failed",
        "refuse on MCP server files failed",
    ]
    assert all(end["error"] is True for end in ends)


async def test_api_tools_lists_the_builtins_and_every_mcp_tool(
    start_tether: Any, tmp_path: Path, recorder: McpRecorder, http_mcp: McpHttpFake
) -> None:
    tether = await _start(
        start_tether,
        tmp_path,
        {"files": _stdio_entry("files-stdio", recorder), "web": {"url": http_mcp.url}},
        api_keys={"sk-a": "alice"},
    )
    assert (await tether.client.get("/api/tools")).status_code == 401
    response = await tether.client.get("/api/tools", headers={"Authorization": "Bearer sk-a"})
    assert response.status_code == 200
    tools = {t["id"]: t for t in response.json()["tools"]}
    assert {"calculator", "current_time", "fetch_url"} <= set(tools)
    for server in ("files", "web"):
        for name in ("echo", "add", "slow", "fail", "stubborn", "block"):
            assert f"mcp:{server}:{name}" in tools
    echo = tools["mcp:web:echo"]
    assert echo["server"] == "web" and echo["name"] == "mcp__web__echo"
    assert echo["description"] == "Say the text back."
    assert echo["parameters"]["required"] == ["text"]
    assert "server" not in tools["calculator"]
    # Every id listed is accepted in tool_ids.
    body = chat_body(tool_ids=list(tools), background=True)
    accepted = await tether.chat(body, key="sk-a")
    assert accepted.status_code == 202, accepted.text


async def test_a_server_down_at_start_up_is_reported_and_the_rest_works(
    start_tether: Any, tmp_path: Path, fakes: Fakes, recorder: McpRecorder
) -> None:
    with socket.socket() as probe:  # a loopback port that nothing listens on
        probe.bind(("127.0.0.1", 0))
        dead_port = probe.getsockname()[1]
    tether = await _start(
        start_tether,
        tmp_path,
        {
            "files": _stdio_entry("files-stdio", recorder),
            "gone": {"url": f"http://127.0.0.1:{dead_port}/mcp"},
            "crashy": {"command": sys.executable, "args": ["-c", "raise SystemExit(3)"]},
            "missing": {"command": str(tmp_path / "no-such-server")},
        },
    )
    ready = await tether.client.get("/readyz")
    assert ready.status_code == 200
    mcp = ready.json()["mcp"]
    assert mcp["files"] == {"status": "ready", "error": None}
    for name in ("gone", "crashy", "missing"):
        assert mcp[name]["status"] == "down" and mcp[name]["error"], (name, mcp[name])
    assert "No such file" in mcp["missing"]["error"]
    refused = await tether.chat(chat_body(tool_ids=["mcp:gone:echo"]))
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "tool_ids"
    fakes.model.push(
        ToolCallReply([("mcp__files__echo", {"text": "still here"})]), TextReply(["fine"])
    )
    answer = await tether.chat(chat_body("go", tool_ids=["mcp:files:echo"]))
    assert answer.status_code == 200
    assert [m["content"] for m in _tool_messages(fakes)] == ["echo: still here"]


# ----------------------------------------------------------------------------- cancellation


async def _start_slow_call(
    tether: Tether,
    fakes: Fakes,
    recorder: McpRecorder,
    label: str,
    tool: str = "slow",
    **extra: Any,
) -> tuple[str, dict[str, Any]]:
    """Start a background task whose model calls ``tool`` for 30 s on "files"; returns the
    task id and the server's record of the call once it runs."""
    fakes.model.push(ToolCallReply([(f"mcp__files__{tool}", {"seconds": 30})]))
    task_id = await tether.background(chat_body("wait", tool_ids=[f"mcp:files:{tool}"], **extra))
    with trio.fail_after(MCP_WAIT):
        call = await recorder.wait_for("call", server=label, tool=tool)
    return task_id, call


async def _assert_cancelled_on_server(
    recorder: McpRecorder, label: str, call: dict[str, Any]
) -> None:
    with trio.fail_after(WAIT):
        await recorder.wait_for(
            "notification_cancelled", server=label, request_id=call["request_id"]
        )
        await recorder.wait_for("cancelled", server=label, request_id=call["request_id"])
        if label == "web":
            await recorder.wait_for("stream_closed", server=label, request_id=call["request_id"])
    assert not recorder.of("finished", server=label, request_id=call["request_id"])


async def _assert_next_call_works(tether: Tether, fakes: Fakes, text: str = "again") -> None:
    fakes.model.push(ToolCallReply([("mcp__files__echo", {"text": text})]), TextReply(["ok"]))
    with trio.fail_after(MCP_WAIT):
        response = await tether.chat(chat_body("again", tool_ids=["mcp:files:echo"]))
    assert response.status_code == 200
    assert [m["content"] for m in _tool_messages(fakes)] == [f"echo: {text}"]


@pytest.mark.parametrize("servers", TRANSPORTS, indirect=True)
async def test_stop_during_mcp_call_cancels_it_on_the_server(
    start_tether: Any, tmp_path: Path, fakes: Fakes, recorder: McpRecorder, servers: dict[str, Any]
) -> None:
    tether = await _start(start_tether, tmp_path, servers)
    label = _label(servers)
    task_id, call = await _start_slow_call(tether, fakes, recorder, label)
    response = await tether.client.post(f"/api/tasks/{task_id}/stop")
    assert response.status_code == 200
    task = response.json()
    assert (task["status"], task["cancel_reason"], task["phase"]) == ("cancelled", "stop", "tools")
    await _assert_cancelled_on_server(recorder, label, call)
    terminal = assert_log_well_formed(await tether.events(task_id))
    assert terminal["type"] == "task:cancelled" and terminal["data"]["phase"] == "tools"
    # The session lives on: the next call goes through it, with no new session.
    await _assert_next_call_works(tether, fakes)
    connection = tether.runtime.mcp.connections["files"]  # type: ignore[union-attr]
    assert connection.sessions_opened == 1


@pytest.mark.parametrize("servers", TRANSPORTS, indirect=True)
async def test_client_disconnect_during_mcp_call_cancels_it_on_the_server(
    start_tether: Any, tmp_path: Path, fakes: Fakes, recorder: McpRecorder, servers: dict[str, Any]
) -> None:
    tether = await _start(start_tether, tmp_path, servers)
    label = _label(servers)
    fakes.model.push(ToolCallReply([("mcp__files__slow", {"seconds": 30})]))
    async with tether.client.stream(
        "POST",
        "/api/chat/completions",
        json=chat_body("wait", stream=True, tool_ids=["mcp:files:slow"]),
    ) as response:
        task_id = response.headers["X-Task-Id"]
        with trio.fail_after(MCP_WAIT):
            call = await recorder.wait_for("call", server=label, tool="slow")
    # Leaving the block closed the client's connection.
    await _assert_cancelled_on_server(recorder, label, call)
    terminal = assert_log_well_formed(await tether.events(task_id))
    assert terminal["type"] == "task:cancelled"
    assert (terminal["data"]["cancel_reason"], terminal["data"]["phase"]) == ("disconnect", "tools")


@pytest.mark.parametrize("servers", TRANSPORTS, indirect=True)
async def test_task_timeout_during_mcp_call_cancels_it_on_the_server(
    start_tether: Any, tmp_path: Path, fakes: Fakes, recorder: McpRecorder, servers: dict[str, Any]
) -> None:
    tether = await _start(start_tether, tmp_path, servers, task_timeout_s=3)
    label = _label(servers)
    task_id, call = await _start_slow_call(tether, fakes, recorder, label)
    await _assert_cancelled_on_server(recorder, label, call)
    terminal = assert_log_well_formed(await tether.events(task_id))
    # The task deadline ends the task with what it has, not as a cancel.
    assert terminal["type"] == "task:completed"
    assert (terminal["data"]["deadline"], terminal["data"]["phase"]) == ("task", "tools")


async def test_tool_timeout_cancels_the_call_and_the_model_gets_an_error(
    start_tether: Any, tmp_path: Path, fakes: Fakes, recorder: McpRecorder, http_mcp: McpHttpFake
) -> None:
    tether = await _start(
        start_tether, tmp_path, {"files": {"url": http_mcp.url}}, tool_timeout_s=0.5
    )
    fakes.model.push(ToolCallReply([("mcp__files__slow", {"seconds": 30})]), TextReply(["ok"]))
    task_id = await tether.background(chat_body("wait", tool_ids=["mcp:files:slow"]))
    terminal = assert_log_well_formed(await tether.events(task_id))
    assert terminal["type"] == "task:completed"
    [message] = _tool_messages(fakes)
    assert message["content"] == "Error: mcp__files__slow timed out after 0.5 s"
    call = recorder.of("call", server="web", tool="slow")[0]
    await _assert_cancelled_on_server(recorder, "web", call)


async def test_one_stop_cancels_two_mcp_calls_of_one_round(
    start_tether: Any, tmp_path: Path, fakes: Fakes, recorder: McpRecorder, http_mcp: McpHttpFake
) -> None:
    tether = await _start(
        start_tether,
        tmp_path,
        {"files": _stdio_entry("files-stdio", recorder), "web": {"url": http_mcp.url}},
    )
    fakes.model.push(
        ToolCallReply([("mcp__files__slow", {"seconds": 30}), ("mcp__web__slow", {"seconds": 30})])
    )
    task_id = await tether.background(
        chat_body("wait", tool_ids=["mcp:files:slow", "mcp:web:slow"])
    )
    with trio.fail_after(MCP_WAIT):
        calls = [
            await recorder.wait_for("call", server=label, tool="slow")
            for label in ("files-stdio", "web")
        ]
    task = (await tether.client.post(f"/api/tasks/{task_id}/stop")).json()
    assert (task["status"], task["phase"]) == ("cancelled", "tools")
    for label, call in zip(("files-stdio", "web"), calls, strict=True):
        await _assert_cancelled_on_server(recorder, label, call)


async def test_stdio_server_killed_mid_call_gives_an_error_and_the_next_call_works(
    start_tether: Any, tmp_path: Path, fakes: Fakes, recorder: McpRecorder
) -> None:
    tether = await _start(start_tether, tmp_path, {"files": _stdio_entry("files-stdio", recorder)})
    pid = recorder.of("started", server="files-stdio")[0]["pid"]
    fakes.model.push(
        ToolCallReply([("mcp__files__slow", {"seconds": 30})]), TextReply(["it broke"])
    )
    task_id = await tether.background(chat_body("wait", tool_ids=["mcp:files:slow"]))
    with trio.fail_after(MCP_WAIT):
        await recorder.wait_for("call", server="files-stdio", tool="slow")
    os.kill(pid, signal.SIGKILL)
    terminal = assert_log_well_formed(await tether.events(task_id))
    assert terminal["type"] == "task:completed"
    [message] = _tool_messages(fakes)
    assert message["content"].startswith("Error: MCP server files")
    await _assert_next_call_works(tether, fakes)
    assert len(recorder.of("started", server="files-stdio")) == 2
    await _wait_reaped(pid)


async def test_wedged_stdio_server_is_restarted_after_a_stop(
    start_tether: Any, tmp_path: Path, fakes: Fakes, recorder: McpRecorder
) -> None:
    tether = await _start(
        start_tether,
        tmp_path,
        {"files": _stdio_entry("files-stdio", recorder)},
        mcp_ping_timeout_s=0.5,
    )
    pid = recorder.of("started", server="files-stdio")[0]["pid"]
    task_id, _ = await _start_slow_call(tether, fakes, recorder, "files-stdio", tool="block")
    task = (await tether.client.post(f"/api/tasks/{task_id}/stop")).json()
    assert (task["status"], task["phase"]) == ("cancelled", "tools")
    # The blocked server answers no ping: its process is ended and a new one started.
    with trio.fail_after(MCP_WAIT):
        await recorder.wait_for("started", count=2, server="files-stdio")
    await _wait_reaped(pid)
    await _assert_next_call_works(tether, fakes)


@pytest.mark.parametrize("json_response", [False, True], ids=["sse", "json"])
async def test_http_tool_that_ignores_the_cancel_has_its_stream_closed_by_tether(
    start_tether: Any,
    tmp_path: Path,
    fakes: Fakes,
    recorder: McpRecorder,
    nursery: trio.Nursery,
    json_response: bool,
) -> None:
    # Over SSE the answer's stream is open when the stop comes; in JSON mode nothing of the
    # answer has come yet. Either way Tether closes the POST itself.
    http_mcp = McpHttpFake("web", recorder, json_response=json_response)
    await http_mcp.start(nursery)
    tether = await _start(start_tether, tmp_path, {"files": {"url": http_mcp.url}})
    task_id, call = await _start_slow_call(tether, fakes, recorder, "web", tool="stubborn")
    task = (await tether.client.post(f"/api/tasks/{task_id}/stop")).json()
    assert (task["status"], task["phase"]) == ("cancelled", "tools")
    with trio.fail_after(WAIT):
        await recorder.wait_for(
            "notification_cancelled", server="web", request_id=call["request_id"]
        )
        closed = await recorder.wait_for(
            "stream_closed", server="web", request_id=call["request_id"]
        )
    assert closed["by"] == "client"
    assert not recorder.of("finished", server="web", request_id=call["request_id"])
    await _assert_next_call_works(tether, fakes)
    http_mcp.stop()


async def test_calls_beyond_the_per_server_limit_wait_their_turn(
    start_tether: Any, tmp_path: Path, fakes: Fakes, recorder: McpRecorder, http_mcp: McpHttpFake
) -> None:
    tether = await _start(
        start_tether, tmp_path, {"files": {"url": http_mcp.url}}, mcp_max_concurrent_calls=1
    )
    fakes.model.push(
        ToolCallReply(
            [
                ("mcp__files__slow", {"seconds": 0.3, "steps": 1}),
                ("mcp__files__echo", {"text": "second"}),
            ]
        ),
        TextReply(["ok"]),
    )
    response = await tether.chat(chat_body("go", tool_ids=["mcp:files:slow", "mcp:files:echo"]))
    assert response.status_code == 200
    order = [(e["event"], e["tool"]) for e in recorder.events if e["event"] in ("call", "finished")]
    assert order in (
        [("call", "slow"), ("finished", "slow"), ("call", "echo"), ("finished", "echo")],
        [("call", "echo"), ("finished", "echo"), ("call", "slow"), ("finished", "slow")],
    )


async def test_shutdown_ends_the_stdio_server_process(
    start_tether: Any, tmp_path: Path, recorder: McpRecorder
) -> None:
    tether = await _start(start_tether, tmp_path, {"files": _stdio_entry("files-stdio", recorder)})
    pid = recorder.of("started", server="files-stdio")[0]["pid"]
    assert _alive(pid)
    tether.stop_serving.set()
    await _wait_reaped(pid)


def _alive(pid: int) -> bool:
    """Whether the process exists and is not a zombie (a child not reaped)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


async def _wait_reaped(pid: int) -> None:
    """Wait until the process is gone altogether: dead and reaped, no zombie left."""
    with trio.fail_after(MCP_WAIT):
        # /proc tells no one when a process is reaped: polling is the only way to watch.
        while await trio.Path(f"/proc/{pid}").exists():  # noqa: ASYNC110
            await trio.sleep(0.02)


# ----------------------------------------------------------------------------- pieces


def test_function_names_are_valid_unique_and_stable() -> None:
    taken: set[str] = {"calculator"}
    plain = function_name("files", "read_file", taken)
    assert plain == "mcp__files__read_file"
    odd = function_name("files", "read.file", taken)
    assert odd.startswith("mcp__files__read_file_") and odd != plain
    long = function_name("a-very-long-server-name", "x" * 80, taken)
    assert len(long) == 64
    assert long == function_name("a-very-long-server-name", "x" * 80, set(taken))
    taken.add(plain)
    again = function_name("files", "read_file", taken)
    assert again != plain and len(again) <= 64
    for name in (odd, long, again):
        assert all(c.isalnum() or c in "_-" for c in name)


def test_results_map_text_structure_and_media_and_are_capped() -> None:
    text = mcp_types.CallToolResult(
        content=[mcp_types.TextContent(text="one"), mcp_types.TextContent(text="two")],
        structured_content={"n": 2},
    )
    assert result_text(text, 100) == ("one\n\ntwo", False)
    structured = mcp_types.CallToolResult(content=[], structured_content={"n": 2})
    assert result_text(structured, 100) == ('{"n": 2}', False)
    image = mcp_types.CallToolResult(
        content=[mcp_types.ImageContent(data="AAAA", mime_type="image/png")]
    )
    assert result_text(image, 100) == ("[image (image/png), not shown]", False)
    failed = mcp_types.CallToolResult(content=[mcp_types.TextContent(text="no")], is_error=True)
    assert result_text(failed, 100) == ("no", True)
    long = mcp_types.CallToolResult(content=[mcp_types.TextContent(text="x" * 50)])
    assert result_text(long, 10) == ("x" * 10 + "\n\n[cut short]", False)


def test_mcp_config_reads_both_shapes_and_refuses_bad_ones(tmp_path: Path) -> None:
    path = _write_config(
        tmp_path,
        {
            "files": {"command": "npx", "args": ["-y", "server"], "env": {"KEY": "v"}},
            "web": {"url": "https://mcp.example.com/mcp", "headers": {"Authorization": "Bearer t"}},
        },
    )
    assert read_mcp_config(path) == (
        McpStdioServer("files", "npx", ("-y", "server"), {"KEY": "v"}),
        McpHttpServer("web", "https://mcp.example.com/mcp", {"Authorization": "Bearer t"}),
    )
    for bad, message in (
        ({"x y": {"command": "a"}}, "server 'x y': a name is 1 to 64 of"),
        ({"a": {"args": []}}, 'server \'a\' needs a "command" (stdio) or a "url"'),
        ({"a": {"url": "ftp://x"}}, "server 'a': url must be an http(s) URL"),
        ({"a": {"command": "a", "args": "-v"}}, "server 'a': args must be a list of strings"),
        ({"a": {"command": "a", "args": ["-v", 1]}}, "args must be a list of strings"),
        ({"a": {"command": "a", "env": {"K": 1}}}, "env must be an object of strings"),
        ({"a": {"url": "http://x", "headers": []}}, "headers must be an object of strings"),
        ({"a": "npx"}, "server 'a' is not an object"),
        ({"a": {"type": "sse", "url": "http://x"}}, "HTTP+SSE transport is not supported"),
    ):
        with pytest.raises(SettingsError) as caught:
            read_mcp_config(_write_config(tmp_path, bad))
        assert message in str(caught.value) and "\n" not in str(caught.value)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(SettingsError):
        read_mcp_config(str(tmp_path / "broken.json"))
    with pytest.raises(SettingsError):
        read_mcp_config(str(tmp_path / "absent.json"))


async def test_an_unreadable_mcp_config_stops_the_start(tmp_path: Path) -> None:
    env = {**os.environ, "TETHER_MCP_CONFIG": str(tmp_path / "absent.json"), "TETHER_PORT": "0"}
    with trio.fail_after(MCP_WAIT):
        result = await trio.run_process(
            [sys.executable, "-m", "server", "serve"], env=env, capture_stderr=True, check=False
        )
    assert result.returncode == 2
    assert b"TETHER_MCP_CONFIG" in result.stderr


async def test_a_lost_http_server_gives_error_results_and_shows_down(
    start_tether: Any, tmp_path: Path, fakes: Fakes, recorder: McpRecorder, nursery: trio.Nursery
) -> None:
    first = McpHttpFake("web", recorder)
    await first.start(nursery)
    tether = await _start(start_tether, tmp_path, {"files": {"url": first.url}})
    first.stop()
    fakes.model.push(ToolCallReply([("mcp__files__echo", {"text": "x"})]), TextReply(["ok"]))
    response = await tether.chat(chat_body("go", tool_ids=["mcp:files:echo"]))
    assert response.status_code == 200
    [message] = _tool_messages(fakes)
    assert message["content"].startswith("Error: MCP server files")
    with trio.fail_after(MCP_WAIT):
        # What a probe would do: ask /readyz until it says so.
        while not _refused((await tether.client.get("/readyz")).json()["mcp"]["files"]):  # noqa: ASYNC110
            await trio.sleep(0.02)


def _refused(status: dict[str, Any]) -> bool:
    return status["status"] == "down" and "attempts to connect" in (status["error"] or "")
