"""WebSocket /ws and the Origin header: another site's page cannot open a user's WebSocket."""

from __future__ import annotations

import json
from typing import Any

import pytest
from trio_websocket import ConnectionRejected, open_websocket_url

from server.api.origin import check_origin
from server.config import Settings, SettingsError
from server.schemas import RequestError
from tests.conftest import Tether

FOREIGN = "https://evil.example"


async def first_message(tether: Tether, headers: list[tuple[str, str]]) -> dict[str, Any]:
    async with open_websocket_url(tether.ws_url, extra_headers=headers) as ws:
        return dict(json.loads(await ws.get_message()))


async def refusal(tether: Tether, headers: list[tuple[str, str]]) -> ConnectionRejected:
    try:
        await first_message(tether, headers)
    except ConnectionRejected as exc:
        return exc
    raise AssertionError(f"connected with headers {headers}")


def own_origin(tether: Tether) -> str:
    return tether.base_url  # http://127.0.0.1:<port>, what a browser on the page sends


async def test_a_foreign_origin_is_refused_with_403_in_the_api_error_shape(
    tether: Tether,
) -> None:
    refused = await refusal(tether, [("Origin", FOREIGN)])
    assert refused.status_code == 403
    assert refused.body is not None
    error = json.loads(refused.body)["error"]
    assert error["code"] == "forbidden" and error["type"] == "permission_error"
    assert FOREIGN in error["message"] and "TETHER_WS_ALLOWED_ORIGINS" in error["message"]


async def test_the_servers_own_origin_and_clients_without_one_are_served(
    tether: Tether,
) -> None:
    assert (await first_message(tether, [("Origin", own_origin(tether))]))["type"] == "session"
    assert (await first_message(tether, []))["type"] == "session"


async def test_a_foreign_origin_is_refused_before_the_key_is_looked_at(
    start_tether: Any,
) -> None:
    tether: Tether = await start_tether(api_keys={"key-alice": "alice"})
    good_key = ("Authorization", "Bearer key-alice")
    assert (await refusal(tether, [("Origin", FOREIGN), good_key])).status_code == 403
    assert (await refusal(tether, [("Origin", FOREIGN)])).status_code == 403
    assert (await refusal(tether, [("Origin", own_origin(tether))])).status_code == 401
    served = await first_message(tether, [("Origin", own_origin(tether)), good_key])
    assert served["type"] == "session"


async def test_allowed_origins_are_served_and_others_still_refused(start_tether: Any) -> None:
    tether: Tether = await start_tether(ws_allowed_origins=("https://chat.example.com",))
    served = await first_message(tether, [("Origin", "https://chat.example.com")])
    assert served["type"] == "session"
    assert (await first_message(tether, [("Origin", own_origin(tether))]))["type"] == "session"
    assert (await refusal(tether, [("Origin", FOREIGN)])).status_code == 403


async def test_a_star_allows_every_origin(start_tether: Any) -> None:
    tether: Tether = await start_tether(ws_allowed_origins=("*",))
    assert (await first_message(tether, [("Origin", FOREIGN)]))["type"] == "session"


@pytest.mark.parametrize(
    ("origin", "host", "allowed"),
    [
        ("http://127.0.0.1:8080", "127.0.0.1:8080", True),
        ("http://127.0.0.1:8080", "127.0.0.1:8081", False),
        ("http://localhost:8080", "127.0.0.1:8080", False),  # another name is another origin
        ("HTTP://Example.COM", "example.com", True),
        ("https://example.com", "example.com", True),  # behind a TLS proxy: Host has no port
        ("https://example.com", "example.com:443", True),
        ("https://example.com", "example.com:8443", False),
        ("http://[::1]:8080", "[::1]:8080", True),
        ("https://example.com.evil.example", "example.com", False),
        ("null", "example.com", False),  # a sandboxed frame or a file:// page
        ("http://example.com:notaport", "example.com", False),
        ("http://example.com", None, False),
    ],
)
def test_same_origin_means_the_host_and_port_the_request_went_to(
    origin: str, host: str | None, allowed: bool
) -> None:
    try:
        check_origin(origin, host, ())
    except RequestError as exc:
        assert not allowed, exc.message
        assert exc.status == 403
    else:
        assert allowed


def test_the_allow_list_is_read_from_the_environment() -> None:
    settings = Settings.from_env(
        {"TETHER_WS_ALLOWED_ORIGINS": " https://Chat.Example.com/ , http://127.0.0.1:5173,"}
    )
    assert settings.ws_allowed_origins == ("https://chat.example.com", "http://127.0.0.1:5173")
    assert Settings.from_env({}).ws_allowed_origins == ()
    with pytest.raises(SettingsError, match="TETHER_WS_ALLOWED_ORIGINS"):
        Settings.from_env({"TETHER_WS_ALLOWED_ORIGINS": "chat.example.com"})
