"""The start-up check: after start-up, in the background, the log says whether the upstream
model endpoint and the search provider answer (a WARNING per one that does not, naming its
setting; one INFO line when all do), and the server serves meanwhile either way."""

from __future__ import annotations

import logging
from typing import Any

import pytest
import trio

from tests.conftest import WAIT, Fakes, Tether
from tests.replicas import free_port

LOGGER = "tether.startup"


async def _startup_lines(
    caplog: pytest.LogCaptureFixture, levelno: int, needle: str
) -> list[logging.LogRecord]:
    """Wait until the check has logged a line at ``levelno`` holding ``needle``; return
    every line it has logged."""
    with trio.fail_after(WAIT):
        while True:
            lines = [r for r in caplog.records if r.name == LOGGER]
            if any(r.levelno == levelno and needle in r.getMessage() for r in lines):
                return lines
            await trio.sleep(0.02)


@pytest.fixture(autouse=True)
def _capture(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)


async def test_an_upstream_that_refuses_connections_is_a_warning_and_the_server_serves(
    start_tether: Any, caplog: pytest.LogCaptureFixture
) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    tether: Tether = await start_tether(llm_base_url=closed, default_model="local")
    lines = await _startup_lines(caplog, logging.WARNING, "TETHER_LLM_BASE_URL")
    [warning] = [r for r in lines if r.levelno == logging.WARNING]
    message = warning.getMessage()
    assert f"TETHER_LLM_BASE_URL={closed}" in message
    assert "GET /models" in message and "ConnectError" in message
    assert not any(r.levelno == logging.INFO for r in lines)
    assert (await tether.client.get("/healthz")).json() == {"status": "ok"}
    answer = await tether.client.post(
        "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
    )
    assert answer.status_code == 200


async def test_a_search_provider_that_refuses_connections_is_a_warning(
    start_tether: Any, caplog: pytest.LogCaptureFixture
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    tether: Tether = await start_tether(searxng_url=closed)
    lines = await _startup_lines(caplog, logging.WARNING, "TETHER_SEARXNG_URL")
    [warning] = [r for r in lines if r.levelno == logging.WARNING]
    assert f"searxng search provider (TETHER_SEARXNG_URL={closed})" in warning.getMessage()
    assert "ConnectError" in warning.getMessage()
    assert (await tether.client.get("/healthz")).status_code == 200


async def test_a_refused_key_is_a_warning_with_the_upstreams_words(
    start_tether: Any, fakes: Fakes, caplog: pytest.LogCaptureFixture
) -> None:
    fakes.model.configure(require_api_key="sk-right")
    await start_tether(llm_api_key="sk-wrong")
    lines = await _startup_lines(caplog, logging.WARNING, "TETHER_LLM_BASE_URL")
    [warning] = [r for r in lines if r.levelno == logging.WARNING]
    assert "bad api key" in warning.getMessage()
    assert "sk-wrong" not in warning.getMessage()


async def test_working_upstream_and_search_give_one_info_line_and_no_warning(
    start_tether: Any, fakes: Fakes, caplog: pytest.LogCaptureFixture
) -> None:
    await start_tether()
    lines = await _startup_lines(caplog, logging.INFO, "answer")
    [info] = lines
    message = info.getMessage()
    assert f"TETHER_LLM_BASE_URL={fakes.model.base_url}/v1" in message
    assert f"TETHER_SEARXNG_URL={fakes.search.base_url}" in message
    # The check asked the model list with the key, and the search engine without one.
    [models] = fakes.model.requests_for("/v1/models")
    assert models.headers["authorization"] == "Bearer sk-fake"
    [probe] = fakes.search.requests
    assert probe.path == "/" and "authorization" not in probe.headers


async def test_the_check_does_not_hold_up_the_first_answer(
    start_tether: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # An upstream that takes the connection and never answers: its check is still
    # waiting while the server answers.
    silent = trio.socket.socket()
    await silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    port = silent.getsockname()[1]
    try:
        tether: Tether = await start_tether(
            llm_base_url=f"http://127.0.0.1:{port}/v1", default_model="local"
        )
        assert (await tether.client.get("/healthz")).status_code == 200
        answer = await tether.client.post(
            "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}
        )
        assert answer.status_code == 200
        assert not [r for r in caplog.records if r.name == LOGGER]
    finally:
        silent.close()
