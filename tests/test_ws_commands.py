"""The ``/ws`` client messages as one discriminated union: parsing, refusals, the schema."""

from __future__ import annotations

from typing import Any

import pytest

from server.api.openapi import document
from server.api.ws_commands import (
    ChatCommand,
    PingCommand,
    StopCommand,
    SubscribeCommand,
    UnsubscribeCommand,
    message_object,
    parse_command,
    ws_command_schema,
)
from server.schemas import RequestError


def refusal(message: dict[str, Any]) -> tuple[str, str, str | None]:
    with pytest.raises(RequestError) as caught:
        parse_command(message)
    return caught.value.code, caught.value.message, caught.value.param


def test_each_command_type_parses_to_its_model() -> None:
    assert parse_command({"type": "ping"}) == PingCommand(type="ping")
    assert parse_command({"type": "chat", "request": {"model": "m"}}) == ChatCommand(
        type="chat", request={"model": "m"}
    )
    assert parse_command({"type": "subscribe", "task_id": "t", "after": 3}) == (
        SubscribeCommand(type="subscribe", task_id="t", after=3)
    )
    assert parse_command({"type": "unsubscribe", "task_id": "t"}) == UnsubscribeCommand(
        type="unsubscribe", task_id="t"
    )
    assert parse_command({"type": "stop", "task_id": "t"}) == StopCommand(type="stop", task_id="t")


def test_subscribe_after_defaults_to_zero() -> None:
    command = parse_command({"type": "subscribe", "task_id": "t"})
    assert isinstance(command, SubscribeCommand) and command.after == 0


def test_fields_a_command_does_not_name_are_ignored() -> None:
    assert parse_command({"type": "stop", "task_id": "t", "after": "x"}) == StopCommand(
        type="stop", task_id="t"
    )


def test_text_that_is_not_json_is_invalid_json() -> None:
    for raw in ("not json", b"\xff\xfe", "[" * 50_000):
        with pytest.raises(RequestError) as caught:
            message_object(raw)
        assert caught.value.code == "invalid_json"


def test_json_that_is_not_an_object_is_invalid_request() -> None:
    with pytest.raises(RequestError) as caught:
        message_object("[1, 2]")
    assert (caught.value.code, caught.value.message) == (
        "invalid_request",
        "A message must be a JSON object.",
    )


def test_a_missing_type_is_invalid_request_naming_type() -> None:
    expected = ("invalid_request", "Missing field 'type'.", "type")
    assert refusal({"task_id": "x"}) == expected
    assert refusal({"type": None}) == expected


def test_an_unknown_type_is_unknown_type() -> None:
    assert refusal({"type": "dance"}) == ("unknown_type", "Unknown message type 'dance'.", "type")
    assert refusal({"type": 5})[0] == "unknown_type"
    assert refusal({"type": ["ping"]})[0] == "unknown_type"


def test_a_missing_or_empty_task_id_is_invalid_request_naming_task_id() -> None:
    expected = ("invalid_request", "Missing field 'task_id'.", "task_id")
    for kind in ("subscribe", "unsubscribe", "stop"):
        assert refusal({"type": kind}) == expected
        assert refusal({"type": kind, "task_id": ""}) == expected
        assert refusal({"type": kind, "task_id": 7}) == expected


@pytest.mark.parametrize("after", [-1, True, 1.0, "1", None, [1]])
def test_after_must_be_a_non_negative_integer(after: Any) -> None:
    assert refusal({"type": "subscribe", "task_id": "t", "after": after}) == (
        "invalid_request",
        "'after' must be a non-negative integer.",
        "after",
    )


def test_chat_without_a_request_object_is_invalid_request_naming_request() -> None:
    expected = ("invalid_request", "Missing field 'request' (an object).", "request")
    assert refusal({"type": "chat"}) == expected
    assert refusal({"type": "chat", "request": []}) == expected


def test_the_published_schema_lists_the_six_command_types() -> None:
    schema = ws_command_schema()
    assert set(schema["discriminator"]["mapping"]) == {
        "chat",
        "subscribe",
        "unsubscribe",
        "stop",
        "skip",
        "ping",
    }
    types = {
        schema["$defs"][ref["$ref"].rsplit("/", 1)[1]]["properties"]["type"]["const"]
        for ref in schema["oneOf"]
    }
    assert types == {"chat", "subscribe", "unsubscribe", "stop", "skip", "ping"}


def test_the_openapi_document_carries_the_schema_as_ws_client_message() -> None:
    schemas = document()["components"]["schemas"]
    message = schemas["WsClientMessage"]
    assert set(message["discriminator"]["mapping"]) == {
        "chat",
        "subscribe",
        "unsubscribe",
        "stop",
        "skip",
        "ping",
    }
    for ref in message["oneOf"]:
        assert ref["$ref"].startswith("#/components/schemas/")
        assert ref["$ref"].rsplit("/", 1)[1] in schemas
