"""Bad input gets the documented error; users cannot see each other's tasks."""

from __future__ import annotations

import logging
import sys
from typing import Any

import pytest
import trio

from fakes.model import DieMidwayReply, ErrorReply, HangReply
from server.config import FROM_OTEL, Settings, SettingsError, read_dotenv, unknown_variables
from tests.conftest import WAIT, Fakes, Tether
from tests.helpers import assert_log_well_formed, chat_body, until
from tests.replicas import ROOT

KEYS = {"key-alice": "alice", "key-bob": "bob"}


def assert_error(response: Any, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["message"]
    assert "Traceback" not in response.text
    return dict(error)


async def test_malformed_json_is_invalid_request(tether: Tether) -> None:
    response = await tether.client.post(
        "/api/chat/completions", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, "invalid_request")


async def test_missing_messages_is_invalid_request(tether: Tether) -> None:
    error = assert_error(await tether.chat({"model": "fake-model"}), 400, "invalid_request")
    assert error["param"] == "messages"


async def test_wrong_type_is_invalid_request(tether: Tether) -> None:
    error = assert_error(await tether.chat(chat_body(stream="yes")), 400, "invalid_request")
    assert error["param"] == "stream"
    error = assert_error(
        await tether.chat({"model": "fake-model", "messages": "hi"}), 400, "invalid_request"
    )
    assert error["param"] == "messages"
    assert_error(await tether.chat([1, 2]), 400, "invalid_request")  # type: ignore[arg-type]


async def test_unknown_model_is_model_not_found(tether: Tether) -> None:
    response = await tether.chat(chat_body(model="no-such-model"))
    error = assert_error(response, 404, "model_not_found")
    assert error["param"] == "model"


async def test_unknown_tool_id_is_invalid_request(tether: Tether) -> None:
    error = assert_error(await tether.chat(chat_body(tool_ids=["rm_rf"])), 400, "invalid_request")
    assert error["param"] == "tool_ids"


async def test_oversized_body_is_payload_too_large(start_tether: Any) -> None:
    tether: Tether = await start_tether(max_body_bytes=10_000)
    response = await tether.chat(chat_body("x" * 20_000))
    assert_error(response, 413, "payload_too_large")


async def test_unknown_route_and_task_are_not_found(tether: Tether) -> None:
    assert_error(await tether.client.get("/api/nothing"), 404, "not_found")
    assert_error(await tether.client.get("/api/tasks/task_nope"), 404, "not_found")
    assert_error(await tether.client.post("/api/tasks/task_nope/stop"), 404, "not_found")


async def test_upstream_500_fails_task_with_phase(tether: Tether, fakes: Fakes) -> None:
    fakes.model.push(ErrorReply(500, {"error": {"message": "model exploded"}}))
    task_id = await tether.background(chat_body())
    terminal = assert_log_well_formed(await tether.events(task_id))
    assert terminal["type"] == "task:failed"
    error = terminal["data"]["error"]
    assert error["type"] == "upstream_error"
    assert error["phase"] == "generating"
    assert "model exploded" in error["message"]
    fakes.model.push(ErrorReply(500, {"error": {"message": "model exploded"}}))
    assert_error(await tether.chat(chat_body()), 502, "upstream_error")


async def test_stream_dying_midway_fails_task_and_keeps_partial(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(DieMidwayReply(["partial ", "answer "]))
    task_id = await tether.background(chat_body())
    terminal = assert_log_well_formed(await tether.events(task_id))
    assert terminal["type"] == "task:failed"
    assert terminal["data"]["error"]["phase"] == "generating"
    assert terminal["data"]["content"] == "partial answer "


async def test_too_many_tasks_is_429_with_retry_after(start_tether: Any, fakes: Fakes) -> None:
    tether: Tether = await start_tether(max_active_tasks=10, max_active_tasks_per_user=2)
    fakes.model.configure(default_reply={"kind": "hang"})
    ids = [await tether.background(chat_body()) for _ in range(2)]
    response = await tether.chat(chat_body(background=True))
    assert_error(response, 429, "too_many_tasks")
    assert int(response.headers["Retry-After"]) >= 1
    await tether.client.post(f"/api/tasks/{ids[0]}/stop")
    assert (await tether.chat(chat_body(background=True))).status_code == 202
    for task in (await tether.client.get("/api/tasks")).json()["tasks"]:
        await tether.client.post(f"/api/tasks/{task['id']}/stop")


async def test_missing_or_wrong_key_is_unauthorized(start_tether: Any) -> None:
    tether: Tether = await start_tether(api_keys=KEYS)
    assert_error(await tether.chat(chat_body()), 401, "unauthorized")
    assert_error(await tether.chat(chat_body(), key="wrong"), 401, "unauthorized")
    assert (await tether.client.get("/healthz")).status_code == 200


async def test_another_users_task_is_not_found(start_tether: Any, fakes: Fakes) -> None:
    tether: Tether = await start_tether(api_keys=KEYS)
    fakes.model.push(HangReply())
    task_id = await tether.background(chat_body(chat_id="shared"), key="key-alice")
    with trio.fail_after(WAIT):
        await fakes.model.wait_for_request("/v1/chat/completions")
    bob = {"Authorization": "Bearer key-bob"}
    assert_error(await tether.client.get(f"/api/tasks/{task_id}", headers=bob), 404, "not_found")
    assert_error(
        await tether.client.post(f"/api/tasks/{task_id}/stop", headers=bob), 404, "not_found"
    )
    assert_error(
        await tether.client.get(f"/api/tasks/{task_id}/events", headers=bob), 404, "not_found"
    )
    assert (await tether.client.get("/api/tasks", headers=bob)).json()["tasks"] == []
    bob_stop = await tether.client.post("/api/chats/shared/stop", headers=bob)
    assert bob_stop.json()["tasks"] == []
    alice = {"Authorization": "Bearer key-alice"}
    task = (await tether.client.get(f"/api/tasks/{task_id}", headers=alice)).json()
    assert task["status"] == "running" and task["user"] == "alice"
    stopped = await tether.client.post(f"/api/tasks/{task_id}/stop", headers=alice)
    assert stopped.json()["status"] == "cancelled"


async def test_ended_task_stays_readable_for_retention_then_goes(
    start_tether: Any, fakes: Fakes
) -> None:
    tether: Tether = await start_tether(task_retention_s=0.2)
    task_id = await tether.background(chat_body())
    events = await tether.events(task_id)
    assert events[-1]["type"] == "task:completed"
    listed = (await tether.client.get("/api/tasks?include_finished=true")).json()["tasks"]
    assert task_id in [t["id"] for t in listed]

    async def forgotten() -> bool:
        return (await tether.client.get(f"/api/tasks/{task_id}")).status_code == 404

    await until(forgotten, timeout=WAIT)
    assert (await tether.client.get(f"/api/tasks/{task_id}")).status_code == 404


async def test_models_health_ready_and_metrics(tether: Tether) -> None:
    models = (await tether.client.get("/v1/models")).json()
    assert models["object"] == "list"
    ids = [m["id"] for m in models["data"]]
    assert "local" in ids and "fake-model" in ids
    assert (await tether.client.get("/healthz")).json() == {"status": "ok"}
    health = await tether.client.get("/health")  # vLLM's name, which load testers probe
    assert health.json() == {"status": "ok"}
    assert health.text.endswith("}\n")  # curl output does not run into the prompt
    assert (await tether.client.get("/readyz")).status_code == 200
    await tether.chat(chat_body())
    metrics = (await tether.client.get("/metrics")).text
    for name in (
        "tether_tasks_active",
        "tether_time_to_task_id_seconds",
        "tether_task_cancels",
        "tether_upstream_errors",
    ):
        assert name in metrics


async def test_events_after_the_terminal_seq_end_at_once(tether: Tether) -> None:
    task_id = await tether.background(chat_body())
    events = await tether.events(task_id)
    last = events[-1]["seq"]
    with trio.fail_after(WAIT):
        assert await tether.events(task_id, after=last) == []
        assert await tether.events(task_id, after=last + 100) == []
        async with tether.client.stream(
            "GET", f"/api/tasks/{task_id}/events", headers={"Last-Event-ID": str(last - 1)}
        ) as response:
            body = (await response.aread()).decode()
    assert f"id: {last}\n" in body and body.count("data: ") == 1
    assert (await tether.client.get("/healthz")).status_code == 200


async def test_bad_stream_options_is_invalid_request_and_spawns_nothing(tether: Tether) -> None:
    for value in ("x", [1], True):
        error = assert_error(
            await tether.chat(chat_body(stream=True, stream_options=value)), 400, "invalid_request"
        )
        assert error["param"] == "stream_options"
    listed = (await tether.client.get("/api/tasks?include_finished=true")).json()["tasks"]
    assert listed == []


async def test_deeply_nested_json_is_invalid_request(tether: Tether) -> None:
    response = await tether.client.post(
        "/api/chat/completions", content=b"[" * 50_000, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, "invalid_request")


async def test_session_request_with_nobody_connected_and_zero_grace_is_cancelled(
    tether: Tether, fakes: Fakes
) -> None:
    fakes.model.push(HangReply())
    response = await tether.chat(chat_body(session_id="sess_nobody"))
    assert response.status_code == 202
    events = await tether.events(response.json()["task_id"])
    terminal = assert_log_well_formed(events)
    assert terminal["type"] == "task:cancelled"
    assert terminal["data"]["cancel_reason"] == "disconnect"


async def _answer_before_the_body(tether: Tether, head: bytes) -> tuple[bytes, bytes]:
    """Send ``head`` and a first slice of a body it declares far larger, as a keep-alive
    client would; return the answer's head and whatever came after it before the server
    closed the connection (b"" if it did not close)."""
    host, port = tether.base_url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    async with stream:
        await stream.send_all(head + b"{" + b" " * 65536)
        received = b""
        with trio.fail_after(WAIT):
            while b"\r\n\r\n" not in received:
                received += await stream.receive_some(65536)
            answer, _, rest = received.partition(b"\r\n\r\n")
            while chunk := await stream.receive_some(65536):  # until the server closes
                rest += chunk
    return answer, rest


async def _assert_closed_before_the_body(
    tether: Tether, length: int, status: bytes, code: bytes
) -> None:
    head = (
        b"POST /api/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
        b"\r\nContent-Length: " + str(length).encode() + b"\r\n\r\n"
    )
    answer, body = await _answer_before_the_body(tether, head)
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert b"connection: close" in answer.lower()
    assert code in body


async def test_a_413_before_the_body_closes_the_keep_alive_connection(tether: Tether) -> None:
    await _assert_closed_before_the_body(tether, 30_000_000, b"413", b"payload_too_large")


async def test_a_401_before_the_body_closes_the_keep_alive_connection(
    start_tether: Any,
) -> None:
    tether: Tether = await start_tether(api_keys={"key-alice": "alice"})
    await _assert_closed_before_the_body(tether, 500_000, b"401", b"unauthorized")


async def test_a_small_unread_body_keeps_the_connection(tether: Tether, fakes: Fakes) -> None:
    """A stop with a `{}` body (the route reads none) keeps its keep-alive connection."""
    fakes.model.push(HangReply())
    task_id = await tether.background(chat_body())
    stop = await tether.client.post(f"/api/tasks/{task_id}/stop", json={})
    assert stop.status_code == 200
    assert stop.headers.get("connection", "").lower() != "close"


async def test_each_task_logs_one_line_when_it_starts_and_one_when_it_ends(
    tether: Tether, fakes: Fakes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="tether.tasks")
    fakes.model.push(HangReply())
    task_id = await tether.background(chat_body())
    await tether.client.post(f"/api/tasks/{task_id}/stop")
    lines = [r.getMessage() for r in caplog.records if f"task={task_id}" in r.getMessage()]
    assert len(lines) == 2
    assert lines[0].startswith(f"task={task_id} started mode=background")
    assert lines[1].startswith(f"task={task_id} cancelled mode=background")
    assert "reason=stop" in lines[1] and "run_s=" in lines[1]


async def test_help_lists_every_setting_with_its_default_and_names_the_docs() -> None:
    result = await trio.run_process(
        [sys.executable, "-m", "server", "--help"],
        cwd=ROOT,
        capture_stdout=True,
        env={"PATH": "/usr/bin:/bin"},
    )
    out = result.stdout.decode()
    for name in Settings.model_fields:
        if name in FROM_OTEL:  # not TETHER_* variables: OTEL_* decide
            assert f"TETHER_{name.upper()} " not in out, name
            continue
        assert f"TETHER_{name.upper()} " in out, name
    assert "TETHER_BACKEND" in out and "memory" in out
    assert "docs/settings.md" in out and "API.md" in out


async def test_a_busy_port_and_an_unknown_setting_are_each_one_clear_line() -> None:
    """A misspelt TETHER_* variable is named with the setting it was likely meant for; a
    port that is taken ends the start with one line and status 2, no traceback."""
    with trio.socket.socket() as taken:
        await taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = await trio.run_process(
            [sys.executable, "-m", "server", "serve", "--port", str(port)],
            cwd=ROOT,
            capture_stdout=True,
            capture_stderr=True,
            check=False,
            env={
                "PATH": "/usr/bin:/bin",
                "TETHER_SEARCH_PROVIDR": "searxng",
                "TETHER_TEST_ANYTHING": "1",
            },
        )
    err = result.stderr.decode()
    assert result.returncode == 2
    assert (
        "TETHER_SEARCH_PROVIDR is not a setting and is ignored "
        "(did you mean TETHER_SEARCH_PROVIDER?)"
    ) in err
    assert "TETHER_TEST_ANYTHING" not in err  # the test suite's own variables
    assert f"cannot listen on 127.0.0.1:{port}" in err and "Traceback" not in err


def test_secrets_are_left_out_of_the_settings_repr() -> None:
    settings = Settings(
        llm_api_key="sk-upstream-secret",
        api_keys={"key-of-alice": "alice"},
        brave_api_key="brave-secret",
        tavily_api_key="tavily-secret",
        redis_url="redis://:redis-password@127.0.0.1:6379/0",
    )
    text = repr(settings)
    for secret in (
        "sk-upstream-secret",
        "key-of-alice",
        "brave-secret",
        "tavily-secret",
        "redis-password",
    ):
        assert secret not in text
    assert "port=8080" in text  # the rest is still there


def test_settings_read_the_given_mapping_in_their_text_forms(
    tmp_path: Any, monkeypatch: Any
) -> None:
    """Bools in their words, numbers as int() and float() read them, comma lists, key=user
    pairs (and a file of them); names in any case; an empty value is the default; the
    process's environment is read only when no mapping is given, never by ``Settings()``."""
    keys_file = tmp_path / "keys"
    keys_file.write_text("# team\nkey-of-bob=bob\n")
    settings = Settings.from_env(
        {
            "TETHER_INSECURE": " Yes",
            "TETHER_SEARCH_FETCH_PAGES": "off",
            "TETHER_PORT": " 81 ",
            "TETHER_LLM_TIMEOUT_S": "2.5",
            "TETHER_HOST": "",
            "TETHER_API_KEYS": "k1=alice, k2=carol",
            "TETHER_API_KEYS_FILE": str(keys_file),
            "tether_Workers": "3",
            "TETHER_WS_ALLOWED_ORIGINS": "https://Chat.example.com/, http://127.0.0.1:3000",
        }
    )
    assert settings.insecure is True and settings.search_fetch_pages is False
    assert settings.port == 81 and settings.llm_timeout_s == 2.5 and settings.workers == 3
    assert settings.host == "127.0.0.1"
    assert settings.api_keys == {"k1": "alice", "k2": "carol", "key-of-bob": "bob"}
    assert settings.ws_allowed_origins == ("https://chat.example.com", "http://127.0.0.1:3000")
    monkeypatch.setenv("TETHER_PORT", "9999")
    assert Settings().port == 8080 and Settings.from_env({}).port == 8080
    assert Settings.from_env().port == 9999


def test_a_dotenv_file_gives_its_tether_lines_in_any_case(tmp_path: Any) -> None:
    """``.env`` as python-dotenv reads it: comments, ``export``, quotes; only ``TETHER_*``
    names (in any case), a ``${VAR}`` kept as written; a misspelt name is reported like
    one in the environment."""
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# settings\nexport TETHER_PORT=81\ntether_host = '0.0.0.0'\n"
        'TETHER_LLM_API_KEY="sk-${NOT_EXPANDED}"\nOTHER=1\nTETHER_SEARCH_PROVIDR=x\n'
        "TETHER_NO_VALUE\n"
    )
    values = read_dotenv(dotenv)
    assert values == {
        "TETHER_PORT": "81",
        "tether_host": "0.0.0.0",
        "TETHER_LLM_API_KEY": "sk-${NOT_EXPANDED}",
        "TETHER_SEARCH_PROVIDR": "x",
    }
    assert unknown_variables(values) == [
        "TETHER_SEARCH_PROVIDR is not a setting and is ignored "
        "(did you mean TETHER_SEARCH_PROVIDER?)"
    ]
    del values["TETHER_SEARCH_PROVIDR"]
    settings = Settings.from_env(values)
    assert (settings.port, settings.host) == (81, "0.0.0.0")
    assert settings.llm_api_key == "sk-${NOT_EXPANDED}"
    assert read_dotenv(tmp_path / "absent") == {}


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"TETHER_PORT": "80x"}, "TETHER_PORT='80x' is not a valid int"),
        ({"TETHER_PORT": "1.0"}, "TETHER_PORT='1.0' is not a valid int"),
        ({"TETHER_TASK_TIMEOUT_S": "soon"}, "TETHER_TASK_TIMEOUT_S='soon' is not a valid float"),
        ({"TETHER_INSECURE": "t"}, "TETHER_INSECURE='t' is not a valid bool"),
        ({"TETHER_API_KEYS": "k1=alice,nouser"}, "TETHER_API_KEYS: API key entry 'nouser'"),
        ({"TETHER_BACKEND": "disk"}, "TETHER_BACKEND='disk' is not memory or redis"),
        ({"TETHER_BACKEND": "redis"}, "TETHER_BACKEND=redis needs TETHER_REDIS_URL"),
        ({"TETHER_REDIS_MODE": "sharded"}, "TETHER_REDIS_MODE='sharded' is not auto, single"),
    ],
)
def test_an_unusable_setting_is_one_line_naming_its_variable(
    env: dict[str, str], message: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(env)
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)


def test_overrides_are_validated_and_make_a_new_settings() -> None:
    settings = Settings()
    changed = settings.with_overrides(port="9000", insecure=True)
    assert (changed.port, changed.insecure) == (9000, True)
    assert (settings.port, settings.insecure) == (8080, False)
    with pytest.raises(SettingsError, match="TETHER_PORT='x' is not a valid int"):
        settings.with_overrides(port="x")
    with pytest.raises(SettingsError, match="TETHER_PORTT is not a setting"):
        settings.with_overrides(portt=1)
    with pytest.raises(ValueError):
        settings.port = 1  # type: ignore[misc]
