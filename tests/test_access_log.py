"""The optional access log (TETHER_ACCESS_LOG, --access-log): one line per request with its
client, method, path and query (keys in the query hidden), status, duration and task."""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path
from typing import Any

import trio
from trio_websocket import open_websocket_url

from tests.conftest import WAIT, Fakes, Tether, base_settings
from tests.replicas import ROOT, Replica, free_port

KEY = "sk-access-log-secret"
LINE = re.compile(
    r"^\S+ \S+ (?P<client>127\.0\.0\.1:\d+) (?P<method>[A-Z]+) (?P<target>\S+) "
    r"(?P<status>\d{3}) (?P<ms>\d+\.\d)ms(?: task=(?P<task>\S+))?$"
)


async def _wait_for_line(path: Path, needle: str) -> re.Match[str]:
    """The first line of ``path`` that holds ``needle``, once written (it is written after
    the answer has gone out)."""
    with trio.fail_after(WAIT):
        while True:
            text = await trio.Path(path).read_text() if await trio.Path(path).exists() else ""
            for line in text.splitlines():
                if needle in line and (match := LINE.match(line)):
                    return match
            await trio.sleep(0.02)


async def test_access_log_file_has_a_line_per_request_with_its_fields(
    start_tether: Any, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    tether: Tether = await start_tether(
        access_log=str(log), api_keys={KEY: "alice"}, default_model="local"
    )
    auth = {"Authorization": f"Bearer {KEY}"}
    listed = await tether.client.get("/api/tasks?include_finished=true", headers=auth)
    assert listed.status_code == 200
    answer = await tether.client.post(
        "/api/chat/completions",
        headers=auth,
        json={"messages": [{"role": "user", "content": "hi"}]},
    )
    assert answer.status_code == 200
    refused = await tether.client.get("/api/tasks/task_nope", headers=auth)
    assert refused.status_code == 404
    async with open_websocket_url(f"{tether.ws_url}?token={KEY}&batch=1") as ws:
        await ws.get_message()

    line = await _wait_for_line(log, " /api/tasks?")
    assert (line["method"], line["target"], line["status"]) == (
        "GET",
        "/api/tasks?include_finished=true",
        "200",
    )
    assert float(line["ms"]) >= 0 and line["task"] is None
    line = await _wait_for_line(log, "/api/chat/completions")
    assert (line["method"], line["status"]) == ("POST", "200")
    assert line["task"] == answer.headers["X-Task-Id"]
    assert (await _wait_for_line(log, "task_nope"))["status"] == "404"
    line = await _wait_for_line(log, " /ws?")
    assert (line["method"], line["target"], line["status"]) == (
        "GET",
        "/ws?token=***&batch=1",
        "101",
    )
    assert KEY not in await trio.Path(log).read_text()


async def test_access_log_flag_writes_to_stdout(fakes: Fakes, tmp_path: Path) -> None:
    output = tmp_path / "output"
    replica = Replica(base_settings(fakes), args=("--access-log", "-"), output=output)
    try:
        await replica.start()
        response = await replica.client.get("/healthz")
        assert response.status_code == 200
        line = await _wait_for_line(output, " /healthz ")
        assert (line["method"], line["target"], line["status"]) == ("GET", "/healthz", "200")
    finally:
        await replica.close()


async def test_no_access_log_by_default(fakes: Fakes, tmp_path: Path) -> None:
    output = tmp_path / "output"
    replica = Replica(base_settings(fakes), output=output)
    try:
        await replica.start()
        assert (await replica.client.get("/healthz?probe=1")).status_code == 200
    finally:
        await replica.close()  # the process has ended: everything it wrote is there
    written = await trio.Path(output).read_text()
    assert "probe=1" not in written and "/readyz" not in written


async def test_an_access_log_that_cannot_be_opened_stops_the_start(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "-m",
        "server",
        "serve",
        "--port",
        str(free_port()),
        "--access-log",
        str(tmp_path / "missing" / "access.log"),
    ]
    with trio.fail_after(WAIT):
        result = await trio.run_process(
            command,
            cwd=ROOT,
            capture_stderr=True,
            check=False,
            env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT)},
        )
    assert result.returncode == 2
    assert b"TETHER_ACCESS_LOG=" in result.stderr and b"cannot be opened" in result.stderr
