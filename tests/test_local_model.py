"""The built-in ``local`` model and the ``local`` search through the server, over HTTP, with
the embedded defaults: extractive web-search answers, the source links that open the
documents, and tool calls for any function the message can fill."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import trio

from server.config import DEFAULT_SEARCH_DIR
from tests.conftest import WAIT, StartTether, Tether

WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    "required": ["location"],
}
WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather in a given location",
        "parameters": WEATHER_PARAMETERS,
    },
}


async def embedded_defaults(start_tether: StartTether, **overrides: Any) -> Tether:
    """A server as ``make run`` starts it: the local model, the local search over the
    default folder, query generation on (unpaced, so that tests do not wait on tokens)."""
    settings: dict[str, Any] = {
        "llm_base_url": None,
        "default_model": "local",
        "search_provider": "local",
        "search_local_dir": str(DEFAULT_SEARCH_DIR),
        "search_query_generation": True,
        "local_model_tokens_per_s": 0,
    }
    tether: Tether = await start_tether(**{**settings, **overrides})
    return tether


async def ask_with_web_search(tether: Tether, question: str) -> dict[str, Any]:
    response = await tether.chat(
        {
            "model": "local",
            "features": {"web_search": True},
            "messages": [{"role": "user", "content": question}],
        }
    )
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def source_number(body: dict[str, Any], file_name: str) -> int:
    [number] = [s["index"] for s in body["sources"] if s["url"].endswith("/" + file_name)]
    return int(number)


async def raw_get(tether: Tether, target: bytes) -> tuple[int, dict[str, Any]]:
    """GET ``target`` exactly as written (an HTTP client would resolve its ``..``); the
    status and the JSON body."""
    host, port = tether.base_url.removeprefix("http://").split(":")
    stream = await trio.open_tcp_stream(host, int(port))
    received = b""
    async with stream:
        await stream.send_all(b"GET " + target + b" HTTP/1.1\r\nHost: x\r\n\r\n")
        with trio.fail_after(WAIT):
            while b"\r\n\r\n" not in received:
                received += await stream.receive_some(65536)
            head, _, body = received.partition(b"\r\n\r\n")
            length = re.search(rb"(?i)content-length: *(\d+)", head)
            assert length is not None, head
            while len(body) < int(length.group(1)):
                body += await stream.receive_some(65536)
    return int(head.split()[1]), json.loads(body)


def assert_not_found(body: dict[str, Any]) -> None:
    assert set(body) == {"error"}
    assert body["error"]["code"] == "not_found"
    assert set(body["error"]) >= {"message", "type", "param", "code"}


# --- web search answers ----------------------------------------------------------------------


async def test_cancel_question_is_answered_with_the_web_search_pages_cancel_sentences(
    start_tether: StartTether,
) -> None:
    tether = await embedded_defaults(start_tether)
    body = await ask_with_web_search(tether, "How does Tether cancel a web search?")
    answer = body["choices"][0]["message"]["content"]
    n = source_number(body, "web-search.md")
    assert f"All of this runs inside the task's cancel scope. [{n}]" in answer
    assert (
        "a stop closes every open connection to the search engine and to the web "
        f"servers at once. [{n}]"
    ) in answer
    # Every quoted sentence is that page's: the other sources are not cited as filler.
    assert set(re.findall(r"\[(\d+)\]", answer)) == {str(n)}
    assert len(body["sources"]) > 1


async def test_a_question_no_source_answers_says_so(start_tether: StartTether) -> None:
    tether = await embedded_defaults(start_tether)
    body = await ask_with_web_search(tether, "who are you?")
    assert body["sources"]
    assert body["choices"][0]["message"]["content"] == (
        "I found nothing in the sources that answers this."
    )


async def test_a_question_ending_in_a_question_mark_is_not_given_a_full_stop(
    start_tether: StartTether,
) -> None:
    tether = await embedded_defaults(start_tether)
    response = await tether.client.post(
        "/v1/chat/completions",
        json={"model": "local", "messages": [{"role": "user", "content": "who are you?"}]},
    )
    answer = response.json()["choices"][0]["message"]["content"]
    assert answer.startswith("You asked: who are you? I am Tether's built-in local model;")
    assert "?." not in answer


# --- the source links ------------------------------------------------------------------------


async def test_a_source_link_opens_the_document(start_tether: StartTether) -> None:
    tether = await embedded_defaults(start_tether)
    body = await ask_with_web_search(tether, "How does Tether cancel a web search?")
    [source] = [s for s in body["sources"] if s["url"].endswith("/web-search.md")]
    assert source["url"] == "/api/local-docs/web-search.md"
    response = await tether.client.get(source["url"])
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/markdown; charset=utf-8"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert response.text == (Path(DEFAULT_SEARCH_DIR) / "web-search.md").read_text()


async def test_documents_in_subfolders_and_text_files_are_served(
    start_tether: StartTether, tmp_path: Path
) -> None:
    (tmp_path / "guide").mkdir()
    guide = "# Guide\n\nPenguins swim in cold water.\n"
    (tmp_path / "guide" / "two words.md").write_text(guide)
    (tmp_path / "notes.txt").write_text("Otters float.")
    tether = await embedded_defaults(start_tether, search_local_dir=str(tmp_path))
    body = await ask_with_web_search(tether, "Do penguins swim?")
    [source] = body["sources"]
    assert source["url"] == "/api/local-docs/guide/two%20words.md"
    assert "Penguins swim in cold water. [1]" in body["choices"][0]["message"]["content"]
    document = await tether.client.get(source["url"])
    assert (document.status_code, document.text) == (200, guide)
    text = await tether.client.get("/api/local-docs/notes.txt")
    assert text.headers["content-type"] == "text/plain; charset=utf-8"
    assert text.text == "Otters float."


async def test_paths_outside_the_index_are_404_in_the_error_shape(
    start_tether: StartTether, tmp_path: Path
) -> None:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "doc.md").write_text("# Doc\n\nText.")
    (corpus / ".hidden.md").write_text("# Hidden\n\nSecret.")
    (corpus / "image.png").write_text("not indexed")
    (tmp_path / "outside.md").write_text("# Outside\n\nSecret.")
    tether = await embedded_defaults(start_tether, search_local_dir=str(corpus))
    assert (await tether.client.get("/api/local-docs/doc.md")).status_code == 200
    for path in (
        "missing.md",
        ".hidden.md",
        "image.png",
        "%2E%2E/outside.md",
        "..%2Foutside.md",
        "%2Fetc%2Fpasswd",
        "doc.md%00",
        "DOC.MD",
    ):
        response = await tether.client.get("/api/local-docs/" + path)
        assert response.status_code == 404, path
        assert_not_found(response.json())
    for target in (
        b"/api/local-docs/../outside.md",
        b"/api/local-docs/./../outside.md",
        b"/api/local-docs//etc/passwd",
    ):
        status, answer = await raw_get(tether, target)
        assert status == 404, target
        assert_not_found(answer)


async def test_no_document_is_served_when_the_search_is_not_local(
    start_tether: StartTether,
) -> None:
    tether: Tether = await start_tether()  # the test settings search a fake SearXNG
    response = await tether.client.get("/api/local-docs/web-search.md")
    assert response.status_code == 404
    assert_not_found(response.json())


async def test_documents_need_the_key_when_keys_are_configured(
    start_tether: StartTether,
) -> None:
    tether = await embedded_defaults(start_tether, api_keys={"key-alice": "alice"})
    refused = await tether.client.get("/api/local-docs/web-search.md")
    assert refused.status_code == 401
    assert refused.json()["error"]["code"] == "unauthorized"
    served = await tether.client.get(
        "/api/local-docs/web-search.md", headers={"Authorization": "Bearer key-alice"}
    )
    assert served.status_code == 200


# --- tool calls --------------------------------------------------------------------------------


def weather_request(**extra: Any) -> dict[str, Any]:
    return {
        "model": "local",
        "tools": [WEATHER_TOOL],
        "messages": [{"role": "user", "content": "What's the weather like in Paris today?"}],
        **extra,
    }


async def test_the_weather_example_gets_a_tool_call_that_meets_the_schema(
    start_tether: StartTether,
) -> None:
    tether = await embedded_defaults(start_tether)
    response = await tether.client.post("/v1/chat/completions", json=weather_request())
    assert response.status_code == 200, response.text
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    [call] = choice["message"]["tool_calls"]
    assert call["type"] == "function" and call["function"]["name"] == "get_weather"
    arguments = json.loads(call["function"]["arguments"])
    assert arguments == {"location": "Paris"}
    jsonschema.validate(arguments, WEATHER_PARAMETERS)


async def test_the_weather_example_streams_its_tool_call(start_tether: StartTether) -> None:
    tether = await embedded_defaults(start_tether)
    calls: dict[int, dict[str, str]] = {}
    finish: list[str] = []
    with trio.fail_after(WAIT):
        async with tether.client.stream(
            "POST", "/v1/chat/completions", json=weather_request(stream=True)
        ) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                for choice in json.loads(line[6:])["choices"]:
                    for piece in choice["delta"].get("tool_calls") or []:
                        call = calls.setdefault(piece["index"], {"name": "", "arguments": ""})
                        function = piece.get("function") or {}
                        call["name"] += function.get("name") or ""
                        call["arguments"] += function.get("arguments") or ""
                    if choice.get("finish_reason"):
                        finish.append(choice["finish_reason"])
    assert finish == ["tool_calls"]
    assert list(calls) == [0] and calls[0]["name"] == "get_weather"
    arguments = json.loads(calls[0]["arguments"])
    assert arguments == {"location": "Paris"}
    jsonschema.validate(arguments, WEATHER_PARAMETERS)


async def test_a_message_that_does_not_fill_the_function_gets_text(
    start_tether: StartTether,
) -> None:
    tether = await embedded_defaults(start_tether)
    body = weather_request()
    body["messages"][0]["content"] = "Will the weather hold?"  # no place named
    choice = (await tether.client.post("/v1/chat/completions", json=body)).json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["message"]["content"].startswith("You asked: Will the weather hold?")
