"""The built-in ``local`` model's rules (server/providers/llm/local/), tested directly: it is
pure computation, with no I/O but its pacing (run on trio's autojump clock here)."""

from __future__ import annotations

import json
from typing import Any

import pytest
import trio

from server.prompt_markers import QUERY_PROMPT_MARKER, SOURCES_CLOSE, SOURCES_OPEN
from server.providers.llm.base import ModelDelta
from server.providers.llm.local import LocalModel
from server.providers.llm.local.model import find_expression
from server.providers.llm.local.tool_arguments import find_url
from tests.model_stream import Collected, user


async def run_local(body: dict[str, Any], tokens_per_s: float = 0) -> Collected:
    collected = Collected()
    await LocalModel(tokens_per_s).stream_chat(body, collected)
    return collected


def tool_spec(
    name: str,
    description: str = "",
    properties: dict[str, Any] | None = None,
    required: list[str] | None = None,
) -> dict[str, Any]:
    parameters: dict[str, Any] = {"type": "object", "properties": properties or {}}
    if required is not None:
        parameters["required"] = required
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


ALL_TOOLS = [tool_spec("calculator"), tool_spec("fetch_url"), tool_spec("current_time")]


def sources_message(*sources: tuple[str, str, str]) -> dict[str, Any]:
    blocks = [
        f"[{i}] {title} ({url})\n{text}" for i, (title, url, text) in enumerate(sources, start=1)
    ]
    return {
        "role": "system",
        "content": "Answer with these sources.\n"
        + SOURCES_OPEN
        + "\n"
        + "\n\n".join(blocks)
        + "\n"
        + SOURCES_CLOSE,
    }


async def test_local_model_is_deterministic() -> None:
    body = {"model": "local", "messages": [user("Tell me about trio nurseries")]}
    first, second = await run_local(body), await run_local(body)
    assert first.deltas == second.deltas


async def test_local_model_lists_only_local() -> None:
    assert await LocalModel(0).list_models() == ["local"]


async def test_local_model_without_sources_repeats_the_question() -> None:
    collected = await run_local({"messages": [user("Say hi")]})
    assert collected.content == (
        "You asked: Say hi. I am Tether's built-in local model; configure "
        "TETHER_LLM_BASE_URL to use a real model."
    )
    assert collected.finish_reason == "stop"


async def test_local_model_streams_word_sized_tokens_then_finish_then_usage() -> None:
    collected = await run_local(
        {"messages": [{"role": "system", "content": "Be brief."}, user("Say hi")]}
    )
    pieces = [d.content for d in collected.deltas if d.content]
    assert pieces[:3] == ["You ", "asked: ", "Say "]
    assert all(len(p.split()) == 1 for p in pieces)
    assert collected.deltas[-2].finish_reason == "stop"
    assert collected.deltas[-1].usage == {
        "prompt_tokens": 4,
        "completion_tokens": len(pieces),
        "total_tokens": 4 + len(pieces),
    }


async def test_local_model_max_tokens_caps_the_answer_with_finish_reason_length() -> None:
    collected = await run_local({"messages": [user("Say hi")], "max_tokens": 3})
    assert collected.content == "You asked: Say "
    assert collected.finish_reason == "length"
    assert collected.usage is not None and collected.usage["completion_tokens"] == 3


async def test_local_model_paces_tokens_at_tokens_per_s(autojump_clock: trio.abc.Clock) -> None:
    times: list[float] = []

    async def on_delta(delta: ModelDelta) -> None:
        if delta.content:
            times.append(trio.current_time())

    await LocalModel(10).stream_chat({"messages": [user("Say hi")]}, on_delta)
    gaps = [round(b - a, 6) for a, b in zip(times, times[1:], strict=False)]
    assert gaps and set(gaps) == {0.1}


async def test_cancelling_the_local_model_stops_between_tokens(
    autojump_clock: trio.abc.Clock,
) -> None:
    collected = Collected()
    with trio.CancelScope() as scope:

        async def on_delta(delta: ModelDelta) -> None:
            await collected(delta)
            if len(collected.deltas) == 2:
                scope.cancel()

        await LocalModel(10).stream_chat({"messages": [user("Say hi")]}, on_delta)
    assert scope.cancelled_caught
    assert collected.content == "You asked: "
    assert collected.finish_reason is None


async def test_local_model_answers_the_query_prompt_with_keywords_in_one_piece() -> None:
    prompt = (
        f"{QUERY_PROMPT_MARKER}\nWrite up to 3 short web search queries. Answer only "
        'with JSON: {"queries": ["..."]}.\nQuestion: What is the latest version of '
        "the trio library for Python?"
    )
    collected = await run_local({"messages": [user(prompt)]}, tokens_per_s=1)
    content_deltas = [d for d in collected.deltas if d.content]
    assert len(content_deltas) == 1
    assert json.loads(collected.content) == {"queries": ["latest version trio library Python"]}
    assert collected.finish_reason == "stop"


async def test_local_model_query_keeps_at_most_eight_words() -> None:
    prompt = f"{QUERY_PROMPT_MARKER}\nQuestion: one two three four five six seven eight nine"
    collected = await run_local({"messages": [user(prompt)]})
    assert json.loads(collected.content)["queries"] == ["one two three four five six seven eight"]


async def test_local_model_calls_the_calculator_for_arithmetic() -> None:
    collected = await run_local({"messages": [user("What is (2 + 3) * 4?")], "tools": ALL_TOOLS})
    [call] = collected.tool_calls()
    assert call["name"] == "calculator"
    assert json.loads(call["arguments"]) == {"expression": "(2 + 3) * 4"}
    assert call["id"].startswith("call_") and len(call["id"]) > len("call_")
    assert collected.finish_reason == "tool_calls"
    assert collected.content == ""
    assert all(p.index == 0 for d in collected.deltas for p in d.tool_calls)


async def test_local_model_tool_call_ids_are_deterministic() -> None:
    body = {"messages": [user("2 ** 10")], "tools": ALL_TOOLS}
    assert (await run_local(body)).tool_calls() == (await run_local(body)).tool_calls()


async def test_local_model_fetches_a_url_when_there_is_no_arithmetic() -> None:
    collected = await run_local(
        {"messages": [user("Summarize https://example.org/a?b=1.")], "tools": ALL_TOOLS}
    )
    [call] = collected.tool_calls()
    assert call["name"] == "fetch_url"
    assert json.loads(call["arguments"]) == {"url": "https://example.org/a?b=1"}


async def test_local_model_asks_for_the_time_when_time_is_mentioned() -> None:
    collected = await run_local({"messages": [user("What time is it?")], "tools": ALL_TOOLS})
    [call] = collected.tool_calls()
    assert (call["name"], call["arguments"]) == ("current_time", "{}")


async def test_local_model_only_calls_offered_tools() -> None:
    collected = await run_local(
        {"messages": [user("What is 2 + 2 at this time?")], "tools": [tool_spec("current_time")]}
    )
    assert [c["name"] for c in collected.tool_calls()] == ["current_time"]
    plain = await run_local({"messages": [user("What is 2 + 2?")]})
    assert plain.tool_calls() == [] and plain.finish_reason == "stop"


async def test_local_model_calls_no_tool_with_tool_choice_none() -> None:
    collected = await run_local(
        {"messages": [user("What is 2 + 2?")], "tools": ALL_TOOLS, "tool_choice": "none"}
    )
    assert collected.tool_calls() == []


async def test_local_model_answers_with_the_tool_result() -> None:
    messages = [
        user("What is 2 + 2?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "calculator", "arguments": '{"expression": "2 + 2"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    ]
    collected = await run_local({"messages": messages, "tools": ALL_TOOLS})
    assert collected.tool_calls() == []
    assert collected.content == "The calculator tool returned: 4."
    assert collected.finish_reason == "stop"


async def test_local_model_quotes_the_sentences_that_answer_with_citations() -> None:
    system = sources_message(
        (
            "Trio",
            "https://trio.rtfd.io",
            "# Trio\nTrio is a friendly async library for Python. It was first released in "
            "2017.\n\n```python\nnursery.start_soon(nurseries)  # code is not quoted\n```",
        ),
        ("Pets", "https://example.org/p", "Cats sleep most of the day. Dogs like long walks."),
        (
            "Nurseries",
            "https://example.org/n",
            "## Nurseries and tasks\n- A nursery holds the tasks it starts until they end.\n"
            "| nursery | a table row is not quoted |\nThe weather was fine that week.",
        ),
    )
    collected = await run_local({"messages": [system, user("What do trio nurseries do?")]})
    # In the sources' order, each with its source's number; the pets are not cited.
    assert collected.content == (
        "Trio is a friendly async library for Python. [1] "
        "A nursery holds the tasks it starts until they end. [3]"
    )
    assert collected.finish_reason == "stop"


async def test_local_model_quotes_at_most_three_sentences() -> None:
    system = sources_message(
        (
            "Otters",
            "https://example.org/o",
            " ".join(f"Otter fact number {i} is about otters." for i in range(1, 7)),
        )
    )
    collected = await run_local({"messages": [system, user("Tell me about otters")]})
    assert collected.content.count("[1]") == 3


async def test_local_model_says_when_no_source_answers() -> None:
    system = sources_message(("Pets", "https://example.org/p", "Cats sleep most of the day."))
    collected = await run_local({"messages": [system, user("How do volcanoes form?")]})
    assert collected.content == "I found nothing in the sources that answers this."


async def test_local_model_does_not_end_a_question_twice() -> None:
    for question, said in (
        ("who are you?", "who are you?"),
        ("Stop!", "Stop!"),
        ("Do it.", "Do it."),
        ("  Say hi  ", "Say hi."),
    ):
        collected = await run_local({"messages": [user(question)]})
        assert collected.content.startswith(f"You asked: {said} I am Tether's"), question


WEATHER = tool_spec(
    "get_weather",
    "Get the current weather in a given location",
    {
        "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
        "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
    },
    ["location"],
)
BOOKING = tool_spec(
    "book_table",
    "Reserve seats at a restaurant",
    {
        "guests": {"type": "integer", "minimum": 1, "maximum": 12},
        "city": {"type": "string"},
        "outdoor": {"type": "boolean"},
        "note": {"type": "string"},
    },
    ["guests", "city"],
)
SEARCH = tool_spec(
    "search_docs",
    "Search the documentation",
    {"query": {"type": "string"}, "limit": {"type": "integer"}},
    ["query"],
)


async def call_for(text: str, tools: list[dict[str, Any]], **extra: Any) -> tuple[str, Any]:
    collected = await run_local({"messages": [user(text)], "tools": tools, **extra})
    [call] = collected.tool_calls()
    assert collected.finish_reason == "tool_calls"
    return call["name"], json.loads(call["arguments"])


async def test_local_model_fills_an_offered_function_from_the_message() -> None:
    tools = [SEARCH, BOOKING, WEATHER]
    assert await call_for("What's the weather like in Paris today?", tools) == (
        "get_weather",
        {"location": "Paris"},
    )
    assert await call_for("Weather in New York, NY in fahrenheit please", tools) == (
        "get_weather",
        {"location": "New York, NY", "unit": "fahrenheit"},
    )
    # The description fits too; 0 guests is under the minimum, 4 is the first that fits.
    assert await call_for("Reserve 0 then 4 seats at a restaurant in Lyon, not outdoor", tools) == (
        "book_table",
        {"guests": 4, "city": "Lyon", "outdoor": False},
    )
    assert await call_for("Search the docs for cancel scopes, limit 5", tools) == (
        "search_docs",
        {"query": "cancel scopes", "limit": 5},
    )


async def test_local_model_answers_text_when_the_function_cannot_be_filled() -> None:
    tagged = tool_spec("tag_weather", "", {"tags": {"type": "array"}}, ["tags"])
    for text, tools in (
        ("Will the weather hold?", [WEATHER]),  # no place in it
        ("Weather in Oslo", [tagged]),  # an array cannot be read
        ("Hello there", [WEATHER, BOOKING, SEARCH]),
    ):  # nothing fits
        collected = await run_local({"messages": [user(text)], "tools": tools})
        assert collected.tool_calls() == [], text
        assert collected.content.startswith("You asked:")


async def test_local_model_built_in_tools_come_before_other_functions() -> None:
    tools = [WEATHER, tool_spec("calculator")]
    assert await call_for("What is 2 + 2 for the weather in Paris?", tools) == (
        "calculator",
        {"expression": "2 + 2"},
    )


async def test_local_model_calls_an_unrelated_function_only_when_a_call_is_required() -> None:
    message = "I am flying to Rome tomorrow"
    assert (await run_local({"messages": [user(message)], "tools": [WEATHER]})).tool_calls() == []
    assert await call_for(message, [WEATHER], tool_choice="required") == (
        "get_weather",
        {"location": "Rome"},
    )
    forced = {"type": "function", "function": {"name": "get_weather"}}
    assert await call_for(message, [SEARCH, WEATHER], tool_choice=forced) == (
        "get_weather",
        {"location": "Rome"},
    )


@pytest.mark.parametrize(
    ("text", "expression"),
    [
        ("What is 2+2?", "2+2"),
        ("compute (3 + 4) * 2 please", "(3 + 4) * 2"),
        ("and 2 ** 8.", "2 ** 8"),
        ("(see 10 % 3)", "10 % 3"),
        ("1.5 ^ 2 then", "1.5 ^ 2"),
        ("in 2024 there were 3 cats", None),
        ("no numbers here", None),
    ],
)
def test_find_expression(text: str, expression: str | None) -> None:
    assert find_expression(text) == expression


def test_find_url_leaves_sentence_punctuation_out() -> None:
    assert find_url("(see https://example.org/x).") == "https://example.org/x"
    assert find_url("no link") is None
