"""The README's WebSocket example is the file in examples/, and it runs as printed."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import trio

from tests.conftest import Tether

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "ws_chat.py"


def _readme_python_block() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("```python\n") + len("```python\n")
    return readme[start : readme.index("```", start)]


def test_readme_example_is_examples_ws_chat() -> None:
    source = EXAMPLE.read_text()
    body = source[source.index('"""', 3) + 3 :].lstrip("\n")
    assert _readme_python_block() == body


async def test_ws_example_chats_with_web_search_and_stops(start_tether: Any) -> None:
    tether: Tether = await start_tether(
        llm_base_url=None,
        default_model="local",
        search_provider="local",
        local_model_tokens_per_s=200,
    )
    env = {**os.environ, "TETHER_WS_URL": tether.ws_url}
    with trio.fail_after(30):
        result = await trio.run_process(
            [sys.executable, str(EXAMPLE), "What is a cancel scope?"],
            env=env,
            capture_stdout=True,
            capture_stderr=True,
        )
    output = result.stdout.decode()
    assert "status: Searching" in output
    assert "source [1]" in output
    # The stop goes out after the 8th delta; one the model had already sent may still come.
    assert 8 <= output.count("delta:") <= 10
    assert "task:cancelled: phase=generating reason=stop" in output.splitlines()[-1]
