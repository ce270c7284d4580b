"""The OpenAI Node SDK drives the Responses API: one background response read from its
stream, dropped and resumed with ``starting_after`` (no gap, no duplicate against a full
replay), and a second one cancelled mid-generation, whose model connection the fake sees
closed. The Node side is ``tests/node/responses.mjs``, run as a real ``node`` process
against the real server; its SDK is pinned in ``tests/node/package.json`` and
``package-lock.json``.

Without ``node`` (20 or later) the test is skipped, unless ``TETHER_TEST_REQUIRE_NODE=1``
(CI), which makes a missing node a failure. The first run installs the SDK with ``npm ci``
into ``tests/node/node_modules`` (it needs the npm registry once); later runs reuse it while
it holds the pinned version.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any, NoReturn

import pytest
import trio

from fakes.model import TextReply, last_user_text
from tests.conftest import WAIT, Fakes, Tether

pytestmark = pytest.mark.both_backends

NODE_DIR = Path(__file__).resolve().parent / "node"
SCRIPT = NODE_DIR / "responses.mjs"
NODE_MAJOR = 20  # the oldest Node the pinned SDK supports
NPM_CI_TIMEOUT_S = 300.0
NODE_RUN_TIMEOUT_S = 60.0  # the script takes about two seconds
RESUME_PROMPT = "node sdk: stream, drop and resume this one"
CANCEL_PROMPT = "node sdk: cancel this one"
RESUME_WORDS = [f"w{i} " for i in range(12)]


def _unavailable(reason: str) -> NoReturn:
    if os.environ.get("TETHER_TEST_REQUIRE_NODE") == "1":
        pytest.fail(reason + " (TETHER_TEST_REQUIRE_NODE=1)", pytrace=False)
    pytest.skip(reason)


def _pinned_sdk_version() -> str:
    return str(json.loads((NODE_DIR / "package.json").read_text())["dependencies"]["openai"])


def _installed_sdk_version() -> str | None:
    package = NODE_DIR / "node_modules" / "openai" / "package.json"
    if not package.is_file():
        return None
    return str(json.loads(package.read_text())["version"])


@pytest.fixture(scope="session")
def node() -> str:
    """The ``node`` to run, with tests/node's locked packages installed (``npm ci``, once,
    when ``node_modules`` lacks the pinned SDK)."""
    found = shutil.which("node")
    if found is None:
        _unavailable("no node on PATH: the Node SDK test needs Node.js 20 or later and npm")
    version = subprocess.run(
        [found, "--version"], capture_output=True, text=True, timeout=30, check=True
    ).stdout.strip()
    if int(version.lstrip("v").split(".")[0]) < NODE_MAJOR:
        _unavailable(f"node {version} is too old: the Node SDK test needs {NODE_MAJOR} or later")
    pinned = _pinned_sdk_version()
    if _installed_sdk_version() != pinned:
        npm = shutil.which("npm")
        if npm is None:
            _unavailable("no npm on PATH: the Node SDK test installs its SDK with npm ci")
        installed = subprocess.run(
            [npm, "ci", "--prefix", str(NODE_DIR), "--no-audit", "--no-fund"],
            capture_output=True,
            text=True,
            timeout=NPM_CI_TIMEOUT_S,
        )
        if installed.returncode != 0:
            pytest.fail(f"npm ci in {NODE_DIR} failed:\n{installed.stderr[-2000:]}")
        assert _installed_sdk_version() == pinned
    return found


async def run_node_script(node: str, tether: Tether) -> dict[str, Any]:
    """Run responses.mjs against ``tether``; its JSON summary. A run past the timeout is
    killed (trio ends the process when the wait is cancelled)."""
    with trio.fail_after(NODE_RUN_TIMEOUT_S):
        done = await trio.run_process(
            [node, str(SCRIPT), tether.base_url, "fake-model", RESUME_PROMPT, CANCEL_PROMPT],
            cwd=NODE_DIR,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
        )
    stderr = done.stderr.decode(errors="replace")
    assert done.returncode == 0, f"node exited {done.returncode}:\n{stderr}"
    summary: dict[str, Any] = json.loads(done.stdout)
    return summary


async def test_node_sdk_resumes_a_background_response_and_cancels_another(
    node: str, tether: Tether, fakes: Fakes
) -> None:
    # Paced, so that the first stream is dropped and resumed while the answer is still
    # coming; the second is long enough to be cancelled in the middle of its generation.
    fakes.model.add_rule(RESUME_PROMPT, TextReply(RESUME_WORDS, interval=0.05))
    fakes.model.add_rule(CANCEL_PROMPT, TextReply([f"c{i} " for i in range(2000)], interval=0.02))

    summary = await run_node_script(node, tether)

    resume, cancel = summary["resume"], summary["cancel"]
    assert summary["sdk"] == _pinned_sdk_version()
    # Background create answers queued at once; the stream resumed after the last event
    # the first one read continues it, and the two together are the full replay.
    assert resume["created_status"] == "queued" == cancel["created_status"]
    assert resume["first_types"][:3] == [
        "response.created",
        "response.queued",
        "response.in_progress",
    ]
    first, rest = resume["first_sequence_numbers"], resume["resumed_sequence_numbers"]
    assert resume["starting_after"] == first[-1]
    assert first + rest == resume["full_sequence_numbers"]
    assert resume["last_type"] == "response.completed"
    assert resume["status"] == "completed"
    assert resume["output_text"] == "".join(RESUME_WORDS)
    # The cancel ended the response mid-generation, with the text it had.
    assert cancel["types_before_cancel"][-1] == "response.output_text.delta"
    assert cancel["status"] == "cancelled" == cancel["retrieved_status"]
    assert cancel["second_cancel_status"] == "cancelled"
    assert cancel["output_text"].startswith("c0 ")
    assert cancel["last_response_status"] == "cancelled"

    # At the fake upstream: the cancelled response's model stream was closed, by Tether.
    (request,) = [
        r
        for r in fakes.model.requests_for("/v1/chat/completions")
        if last_user_text(r.json_body) == CANCEL_PROMPT
    ]
    with trio.fail_after(WAIT):
        closed = await fakes.model.wait_connection_closed(request.conn_id)
    assert closed.closed_by == "client"
    # The server agrees: both are tasks, one completed and one stopped.
    manager = tether.runtime.manager
    done = await manager.store.get(resume["id"])
    stopped = await manager.store.get(cancel["id"])
    assert done is not None and done.status == "completed"
    assert stopped is not None and stopped.status == "cancelled"
    assert stopped.cancel_reason == "stop"
