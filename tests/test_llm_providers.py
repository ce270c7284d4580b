"""The model providers: the built-in ``local`` model (pure, tested directly), the
OpenAI-compatible client (against a scripted loopback upstream) and the router."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx2
import pytest
import trio

from fakes.base import ConnRecord, Exchange
from fakes.scripted import ScriptedServer, send_sse, start_stream, until_client_leaves
from server.config import Settings
from server.prompt_markers import QUERY_PROMPT_MARKER, SOURCES_CLOSE, SOURCES_OPEN
from server.providers.llm.base import ModelDelta, ModelError, ModelProvider
from server.providers.llm.local import LocalModel
from server.providers.llm.local.extractive import best_sentences, split_sentences, terms
from server.providers.llm.local.model import find_expression
from server.providers.llm.local.tool_arguments import find_url
from server.providers.llm.openai_compat import OpenAICompatibleModel
from server.providers.llm.paced import paced_client
from server.providers.llm.router import ModelRouter, build_model_router

WAIT = 10.0  # upper bound for anything a test waits on; tests never sleep a fixed time


# --- helpers -------------------------------------------------------------------------------


@dataclass
class Collected:
    deltas: list[ModelDelta] = field(default_factory=list)
    # Set once the first delta is in: scripts wait on it to send what comes next.
    first: trio.Event = field(default_factory=trio.Event)

    async def __call__(self, delta: ModelDelta) -> None:
        self.deltas.append(delta)
        self.first.set()

    @property
    def content(self) -> str:
        return "".join(d.content for d in self.deltas)

    @property
    def reasoning(self) -> str:
        return "".join(d.reasoning for d in self.deltas)

    @property
    def finish_reason(self) -> str | None:
        reasons = [d.finish_reason for d in self.deltas if d.finish_reason]
        assert len(reasons) <= 1
        return reasons[0] if reasons else None

    @property
    def usage(self) -> dict[str, Any] | None:
        usages = [d.usage for d in self.deltas if d.usage]
        return usages[-1] if usages else None

    def tool_calls(self) -> list[dict[str, str]]:
        """The streamed pieces assembled by index, as the pipeline does."""
        calls: dict[int, dict[str, str]] = {}
        for delta in self.deltas:
            for piece in delta.tool_calls:
                call = calls.setdefault(piece.index, {"id": "", "name": "", "arguments": ""})
                call["id"] = piece.id or call["id"]
                call["name"] = piece.name or call["name"]
                call["arguments"] += piece.arguments
        return [calls[i] for i in sorted(calls)]


async def run_local(body: dict[str, Any], tokens_per_s: float = 0) -> Collected:
    collected = Collected()
    await LocalModel(tokens_per_s).stream_chat(body, collected)
    return collected


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def tool_spec(name: str, description: str = "", properties: dict[str, Any] | None = None,
              required: list[str] | None = None) -> dict[str, Any]:
    parameters: dict[str, Any] = {"type": "object", "properties": properties or {}}
    if required is not None:
        parameters["required"] = required
    return {"type": "function",
            "function": {"name": name, "description": description, "parameters": parameters}}


ALL_TOOLS = [tool_spec("calculator"), tool_spec("fetch_url"), tool_spec("current_time")]


def sources_message(*sources: tuple[str, str, str]) -> dict[str, Any]:
    blocks = [f"[{i}] {title} ({url})\n{text}" for i, (title, url, text) in
              enumerate(sources, start=1)]
    return {"role": "system", "content": "Answer with these sources.\n" + SOURCES_OPEN + "\n"
            + "\n\n".join(blocks) + "\n" + SOURCES_CLOSE}


# --- the local model -----------------------------------------------------------------------


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
        "TETHER_LLM_BASE_URL to use a real model.")
    assert collected.finish_reason == "stop"


async def test_local_model_streams_word_sized_tokens_then_finish_then_usage() -> None:
    collected = await run_local({"messages": [{"role": "system", "content": "Be brief."},
                                              user("Say hi")]})
    pieces = [d.content for d in collected.deltas if d.content]
    assert pieces[:3] == ["You ", "asked: ", "Say "]
    assert all(len(p.split()) == 1 for p in pieces)
    assert collected.deltas[-2].finish_reason == "stop"
    assert collected.deltas[-1].usage == {"prompt_tokens": 4, "completion_tokens": len(pieces),
                                          "total_tokens": 4 + len(pieces)}


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
    prompt = (f"{QUERY_PROMPT_MARKER}\nWrite up to 3 short web search queries. Answer only "
              'with JSON: {"queries": ["..."]}.\nQuestion: What is the latest version of '
              "the trio library for Python?")
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
    collected = await run_local({"messages": [user("Summarize https://example.org/a?b=1.")],
                                 "tools": ALL_TOOLS})
    [call] = collected.tool_calls()
    assert call["name"] == "fetch_url"
    assert json.loads(call["arguments"]) == {"url": "https://example.org/a?b=1"}


async def test_local_model_asks_for_the_time_when_time_is_mentioned() -> None:
    collected = await run_local({"messages": [user("What time is it?")], "tools": ALL_TOOLS})
    [call] = collected.tool_calls()
    assert (call["name"], call["arguments"]) == ("current_time", "{}")


async def test_local_model_only_calls_offered_tools() -> None:
    collected = await run_local({"messages": [user("What is 2 + 2 at this time?")],
                                 "tools": [tool_spec("current_time")]})
    assert [c["name"] for c in collected.tool_calls()] == ["current_time"]
    plain = await run_local({"messages": [user("What is 2 + 2?")]})
    assert plain.tool_calls() == [] and plain.finish_reason == "stop"


async def test_local_model_calls_no_tool_with_tool_choice_none() -> None:
    collected = await run_local({"messages": [user("What is 2 + 2?")], "tools": ALL_TOOLS,
                                 "tool_choice": "none"})
    assert collected.tool_calls() == []


async def test_local_model_answers_with_the_tool_result() -> None:
    messages = [
        user("What is 2 + 2?"),
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "calculator", "arguments": '{"expression": "2 + 2"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "4"},
    ]
    collected = await run_local({"messages": messages, "tools": ALL_TOOLS})
    assert collected.tool_calls() == []
    assert collected.content == "The calculator tool returned: 4."
    assert collected.finish_reason == "stop"


async def test_local_model_quotes_the_sentences_that_answer_with_citations() -> None:
    system = sources_message(
        ("Trio", "https://trio.rtfd.io",
         "# Trio\nTrio is a friendly async library for Python. It was first released in "
         "2017.\n\n```python\nnursery.start_soon(nurseries)  # code is not quoted\n```"),
        ("Pets", "https://example.org/p", "Cats sleep most of the day. Dogs like long walks."),
        ("Nurseries", "https://example.org/n",
         "## Nurseries and tasks\n- A nursery holds the tasks it starts until they end.\n"
         "| nursery | a table row is not quoted |\nThe weather was fine that week."),
    )
    collected = await run_local({"messages": [system, user("What do trio nurseries do?")]})
    # In the sources' order, each with its source's number; the pets are not cited.
    assert collected.content == (
        "Trio is a friendly async library for Python. [1] "
        "A nursery holds the tasks it starts until they end. [3]")
    assert collected.finish_reason == "stop"


async def test_local_model_quotes_at_most_three_sentences() -> None:
    system = sources_message(("Otters", "https://example.org/o", " ".join(
        f"Otter fact number {i} is about otters." for i in range(1, 7))))
    collected = await run_local({"messages": [system, user("Tell me about otters")]})
    assert collected.content.count("[1]") == 3


async def test_local_model_says_when_no_source_answers() -> None:
    system = sources_message(("Pets", "https://example.org/p", "Cats sleep most of the day."))
    collected = await run_local({"messages": [system, user("How do volcanoes form?")]})
    assert collected.content == "I found nothing in the sources that answers this."


async def test_local_model_does_not_end_a_question_twice() -> None:
    for question, said in (("who are you?", "who are you?"), ("Stop!", "Stop!"),
                           ("Do it.", "Do it."), ("  Say hi  ", "Say hi.")):
        collected = await run_local({"messages": [user(question)]})
        assert collected.content.startswith(f"You asked: {said} I am Tether's"), question


WEATHER = tool_spec("get_weather", "Get the current weather in a given location", {
    "location": {"type": "string", "description": "The city and state, e.g. San Francisco, CA"},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}}, ["location"])
BOOKING = tool_spec("book_table", "Reserve seats at a restaurant", {
    "guests": {"type": "integer", "minimum": 1, "maximum": 12},
    "city": {"type": "string"}, "outdoor": {"type": "boolean"},
    "note": {"type": "string"}}, ["guests", "city"])
SEARCH = tool_spec("search_docs", "Search the documentation", {
    "query": {"type": "string"}, "limit": {"type": "integer"}}, ["query"])


async def call_for(text: str, tools: list[dict[str, Any]], **extra: Any) -> tuple[str, Any]:
    collected = await run_local({"messages": [user(text)], "tools": tools, **extra})
    [call] = collected.tool_calls()
    assert collected.finish_reason == "tool_calls"
    return call["name"], json.loads(call["arguments"])


async def test_local_model_fills_an_offered_function_from_the_message() -> None:
    tools = [SEARCH, BOOKING, WEATHER]
    assert await call_for("What's the weather like in Paris today?", tools) == (
        "get_weather", {"location": "Paris"})
    assert await call_for("Weather in New York, NY in fahrenheit please", tools) == (
        "get_weather", {"location": "New York, NY", "unit": "fahrenheit"})
    # The description fits too; 0 guests is under the minimum, 4 is the first that fits.
    assert await call_for("Reserve 0 then 4 seats at a restaurant in Lyon, not outdoor",
                          tools) == ("book_table", {"guests": 4, "city": "Lyon",
                                                    "outdoor": False})
    assert await call_for("Search the docs for cancel scopes, limit 5", tools) == (
        "search_docs", {"query": "cancel scopes", "limit": 5})


async def test_local_model_answers_text_when_the_function_cannot_be_filled() -> None:
    tagged = tool_spec("tag_weather", "", {"tags": {"type": "array"}}, ["tags"])
    for text, tools in (("Will the weather hold?", [WEATHER]),  # no place in it
                        ("Weather in Oslo", [tagged]),  # an array cannot be read
                        ("Hello there", [WEATHER, BOOKING, SEARCH])):  # nothing fits
        collected = await run_local({"messages": [user(text)], "tools": tools})
        assert collected.tool_calls() == [], text
        assert collected.content.startswith("You asked:")


async def test_local_model_built_in_tools_come_before_other_functions() -> None:
    tools = [WEATHER, tool_spec("calculator")]
    assert await call_for("What is 2 + 2 for the weather in Paris?", tools) == (
        "calculator", {"expression": "2 + 2"})


async def test_local_model_calls_an_unrelated_function_only_when_a_call_is_required() -> None:
    message = "I am flying to Rome tomorrow"
    assert (await run_local({"messages": [user(message)], "tools": [WEATHER]})).tool_calls() == []
    assert await call_for(message, [WEATHER], tool_choice="required") == (
        "get_weather", {"location": "Rome"})
    forced = {"type": "function", "function": {"name": "get_weather"}}
    assert await call_for(message, [SEARCH, WEATHER], tool_choice=forced) == (
        "get_weather", {"location": "Rome"})


@pytest.mark.parametrize(("text", "expression"), [
    ("What is 2+2?", "2+2"),
    ("compute (3 + 4) * 2 please", "(3 + 4) * 2"),
    ("and 2 ** 8.", "2 ** 8"),
    ("(see 10 % 3)", "10 % 3"),
    ("1.5 ^ 2 then", "1.5 ^ 2"),
    ("in 2024 there were 3 cats", None),
    ("no numbers here", None),
])
def test_find_expression(text: str, expression: str | None) -> None:
    assert find_expression(text) == expression


def test_find_url_leaves_sentence_punctuation_out() -> None:
    assert find_url("(see https://example.org/x).") == "https://example.org/x"
    assert find_url("no link") is None


def test_split_sentences_keeps_prose_and_drops_markdown_structure() -> None:
    text = """Title
=====

# A heading
**Lead-in.** First sentence, e.g. with an abbreviation. Pi is 3.14 here! Is it
wrapped? Yes (it is.) Next one.

- A list item.
2) A numbered item
that wraps.
> A quote.

```sh
echo "Not a sentence."
```
| a | table. |
|---|---|
---
<div>
Last words."""
    assert [s.text for s in split_sentences(text)] == [
        "First sentence, e.g. with an abbreviation.", "Pi is 3.14 here!", "Is it wrapped?",
        "Yes (it is.)", "Next one.", "A list item.", "A numbered item that wraps.",
        "A quote.", "Last words."]


def test_split_sentences_cuts_a_very_long_sentence() -> None:
    [sentence] = split_sentences("word " * 200)
    assert len(sentence.text) <= 403 and sentence.text.endswith("...")


def test_terms_match_the_forms_of_a_word() -> None:
    assert len({*terms("cancel cancels cancelled cancelling cancellation")}) == 1
    assert terms("How do searches stop?") == terms("search stopped")
    assert terms("the web_search feature") == ["web_search", "featur"]


def test_best_sentences_keep_only_those_near_the_best() -> None:
    sources = [(1, "Penguins swim fast in cold water.\n\nThe zoo opens at nine every day."
                   "\n\nA shop near the gate sells hats, maps, mugs, toy penguins and many "
                   "other souvenirs."),
               (2, "Penguins and swimming go together.")]
    # The shop's sentence names penguins, but scores under half the best: not quoted.
    quoted = best_sentences("Can penguins swim?", sources, count=5)
    assert [(q.source, q.text) for q in quoted] == [
        (1, "Penguins swim fast in cold water."), (2, "Penguins and swimming go together.")]
    assert best_sentences("who are you?", sources) == []


# --- a loopback OpenAI-compatible upstream -------------------------------------------------
# Each route is a script that writes the response by hand (fakes/scripted.py), so a test
# can cut a stream or hold it open wherever it likes.


@pytest.fixture
async def upstream(nursery: trio.Nursery) -> AsyncIterator[ScriptedServer]:
    server = ScriptedServer()
    await server.start(nursery)
    yield server
    assert not server.errors, "a script crashed:\n" + "\n".join(server.errors)


@pytest.fixture
async def http() -> AsyncIterator[httpx2.AsyncClient]:
    async with httpx2.AsyncClient(trust_env=False) as client:
        yield client


def model_for(upstream: ScriptedServer, http: httpx2.AsyncClient, *,
              api_key: str | None = "sk-test", timeout: float = WAIT) -> OpenAICompatibleModel:
    return OpenAICompatibleModel(http, upstream.base_url + "/v1", api_key, timeout)


def chunk(content: str | None = None, finish: str | None = None, **delta: Any) -> dict[str, Any]:
    if content is not None:
        delta["content"] = content
    return {"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}


USAGE = {"prompt_tokens": 5, "completion_tokens": 2, "total_tokens": 7}
BODY = {"model": "m", "messages": [user("hi")], "stream": False}


async def test_upstream_stream_delivers_content_finish_and_usage(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await ex.send(": keep-alive comment\n\nevent: message\nid: 1\n")
        await send_sse(ex, chunk("", role="assistant"))
        await send_sse(ex, chunk("Hel"))
        # Two lines in one write and one line over two writes: framing is not chunking.
        await ex.send(f"data: {json.dumps(chunk('lo'))}\n\ndata: {json.dumps(chunk('!'))[:9]}")
        await ex.send(f"{json.dumps(chunk('!'))[9:]}\r\n\r\n")
        await send_sse(ex, chunk(finish="stop"))
        await send_sse(ex, {"id": "c1", "object": "chat.completion.chunk", "choices": [],
                            "usage": USAGE})
        await ex.send("data: [DONE]\n\n")
        await ex.finish()

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    await model_for(upstream, http).stream_chat(BODY, collected)
    assert collected.content == "Hello!"
    assert collected.finish_reason == "stop"
    assert collected.usage == USAGE
    assert all(d != ModelDelta() for d in collected.deltas)  # the role-only chunk is skipped
    [request] = upstream.requests
    sent = request.json_body
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["messages"] == BODY["messages"]
    assert request.headers["authorization"] == "Bearer sk-test"


async def test_upstream_chunks_read_together_are_one_delta(upstream: ScriptedServer) -> None:
    """What one read of a paced connection (the model client's kind) brings is handed on
    as one delta: the server does less work per token exactly when it is behind."""
    collected = Collected()

    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("one "))
        await collected.first.wait()
        tool = {"index": 0, "id": "call_1", "function": {"name": "f", "arguments": "{}"}}
        burst = [chunk("two "), chunk("three", reasoning_content="hm"),
                 chunk(tool_calls=[tool]), chunk(finish="stop"),
                 {"id": "c1", "object": "chat.completion.chunk", "choices": [], "usage": USAGE}]
        await ex.send("".join(f"data: {json.dumps(c)}\n\n" for c in burst) + "data: [DONE]\n\n")
        await ex.finish()

    upstream.route("POST", "/v1/chat/completions", handler)
    async with paced(lambda: 0.0) as http:
        await model_for(upstream, http).stream_chat(BODY, collected)
    assert [d.content for d in collected.deltas] == ["one ", "two three"]
    burst = collected.deltas[1]
    assert burst.reasoning == "hm"
    assert [(c.id, c.name, c.arguments) for c in burst.tool_calls] == [("call_1", "f", "{}")]
    assert (burst.finish_reason, burst.usage) == ("stop", USAGE)


async def test_upstream_sse_framing_follows_the_spec_at_the_edges(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    """A chunk split over several ``data:`` lines is one event; bare CR ends a line; an
    event ends at its blank line; comments, ``event:``, ``id:`` and ``retry:`` are not
    data; a field without a space after its colon is read too."""
    multi = json.dumps(chunk("multi ")).replace(', "model"', ',\ndata: "model"')
    assert "\ndata: " in multi

    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await ex.send(": a comment\r\rretry: 3000\r\r")
        await ex.send(f"data: {multi}\n\n")
        await ex.send(f"event: message\rid: 7\rdata: {json.dumps(chunk('cr '))}\r\r")
        await ex.send(f"data:{json.dumps(chunk('nospace '))}\r\n\r\n")
        await ex.send(f"data: {json.dumps(chunk('split'))[:20]}")
        await ex.send(f"{json.dumps(chunk('split'))[20:]}\n")
        await ex.send(f": not the end yet\n\ndata: {json.dumps(chunk(finish='stop'))}\n\n")
        await ex.send("data: [DONE]\n\n")
        await ex.finish()

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    await model_for(upstream, http).stream_chat(BODY, collected)
    assert collected.content == "multi cr nospace split"
    assert collected.finish_reason == "stop"


async def test_upstream_event_past_the_size_bound_fails_the_stream(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("kept"))
        for _ in range(40):  # a line that never ends, 40 x 32 KiB
            await ex.send("x" * 32768)
        await until_client_leaves()

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    with pytest.raises(ModelError, match="limit"):
        await model_for(upstream, http).stream_chat(BODY, collected)
    assert collected.content == "kept"


async def test_upstream_bad_chunk_fails_after_the_good_ones_of_its_read(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await ex.send(f"data: {json.dumps(chunk('kept'))}\n\ndata: {{not json\n\n")
        await until_client_leaves()

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    with pytest.raises(ModelError, match="invalid JSON"):
        await model_for(upstream, http).stream_chat(BODY, collected)
    assert collected.content == "kept"


async def test_upstream_stream_sends_no_authorization_without_a_key(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("ok", finish="stop"))
        await ex.send("data: [DONE]\n\n")
        await ex.finish()

    upstream.route("POST", "/v1/chat/completions", handler)
    await model_for(upstream, http, api_key=None).stream_chat(BODY, Collected())
    assert "authorization" not in upstream.requests[0].headers


async def test_upstream_stream_reads_both_reasoning_fields(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk(reasoning_content="think "))
        await send_sse(ex, chunk(reasoning="more"))
        await send_sse(ex, chunk("answer", finish="stop"))
        await ex.send("data: [DONE]\n\n")
        await ex.finish()

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    await model_for(upstream, http).stream_chat(BODY, collected)
    assert (collected.reasoning, collected.content) == ("think more", "answer")


async def test_upstream_tool_call_deltas_assemble_by_index(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    def call(index: int, arguments: str, call_id: str | None = None,
             name: str | None = None) -> dict[str, Any]:
        piece: dict[str, Any] = {"index": index, "function": {"arguments": arguments}}
        if call_id:
            piece.update(id=call_id, type="function")
            piece["function"]["name"] = name
        return piece

    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk(tool_calls=[call(0, "", "call_a", "calculator")]))
        await send_sse(ex, chunk(tool_calls=[call(0, '{"expression": ')]))
        await send_sse(ex, chunk(tool_calls=[
            call(1, '{"url": "http://x"}', "call_b", "fetch_url")]))
        await send_sse(ex, chunk(tool_calls=[call(0, '"2+2"}')]))
        await send_sse(ex, chunk(finish="tool_calls"))
        await ex.send("data: [DONE]\n\n")
        await ex.finish()

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    await model_for(upstream, http).stream_chat(BODY, collected)
    assert collected.tool_calls() == [
        {"id": "call_a", "name": "calculator", "arguments": '{"expression": "2+2"}'},
        {"id": "call_b", "name": "fetch_url", "arguments": '{"url": "http://x"}'},
    ]
    assert collected.finish_reason == "tool_calls"


async def test_upstream_500_with_openai_error_body_raises_model_error_with_its_message(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    error = {"error": {"message": "The server had an error", "type": "server_error",
                       "param": None, "code": None}}

    async def handler(ex: Exchange) -> None:
        await ex.respond(500, json.dumps(error).encode(), "application/json")

    upstream.route("POST", "/v1/chat/completions", handler)
    with pytest.raises(ModelError) as caught:
        await model_for(upstream, http).stream_chat(BODY, Collected())
    assert caught.value.status == 500
    assert "The server had an error" in caught.value.message


async def test_upstream_error_page_without_json_keeps_the_status(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await ex.respond(502, b"<html><body>Bad gateway</body></html>", "text/html")

    upstream.route("POST", "/v1/chat/completions", handler)
    with pytest.raises(ModelError) as caught:
        await model_for(upstream, http).stream_chat(BODY, Collected())
    assert caught.value.status == 502
    assert "<html>" not in caught.value.message


async def test_upstream_stream_cut_midway_raises_model_error_after_the_deltas_delivered(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("partial"))
        ex.abort()  # closing without the terminating chunk: a broken chunked body

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    with pytest.raises(ModelError) as caught:
        await model_for(upstream, http).stream_chat(BODY, collected)
    assert collected.content == "partial"
    assert caught.value.status is None


async def test_upstream_stream_ending_without_done_or_finish_reason_raises_model_error(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("partial"))
        await ex.finish()  # a well-formed body that just stops

    upstream.route("POST", "/v1/chat/completions", handler)
    with pytest.raises(ModelError, match="ended early"):
        await model_for(upstream, http).stream_chat(BODY, Collected())


async def test_upstream_stream_with_finish_reason_but_no_done_is_complete(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("whole", finish="stop"))
        await ex.finish()

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    await model_for(upstream, http).stream_chat(BODY, collected)
    assert (collected.content, collected.finish_reason) == ("whole", "stop")


async def test_upstream_invalid_json_chunk_raises_model_error(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await ex.send("data: {not json\n\n")
        await ex.finish()

    upstream.route("POST", "/v1/chat/completions", handler)
    with pytest.raises(ModelError, match="invalid JSON"):
        await model_for(upstream, http).stream_chat(BODY, Collected())


async def test_upstream_error_chunk_mid_stream_raises_model_error(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("so far"))
        await send_sse(ex, {"error": {"message": "model overloaded"}})
        await ex.finish()

    upstream.route("POST", "/v1/chat/completions", handler)
    with pytest.raises(ModelError, match="model overloaded"):
        await model_for(upstream, http).stream_chat(BODY, Collected())


async def test_upstream_ignoring_stream_true_still_gives_deltas(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    completion = {"id": "c1", "object": "chat.completion", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "all at once"},
         "finish_reason": "stop"}], "usage": USAGE}

    async def handler(ex: Exchange) -> None:
        await ex.respond(200, json.dumps(completion).encode(), "application/json")

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    await model_for(upstream, http).stream_chat(BODY, collected)
    assert (collected.content, collected.finish_reason) == ("all at once", "stop")
    assert collected.usage == USAGE


async def test_upstream_silent_past_the_timeout_raises_model_error(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await until_client_leaves()  # sends nothing more

    upstream.route("POST", "/v1/chat/completions", handler)
    with pytest.raises(ModelError, match="timed out"):
        await model_for(upstream, http, timeout=0.2).stream_chat(BODY, Collected())


async def test_unreachable_upstream_raises_model_error(http: httpx2.AsyncClient) -> None:
    # A port that was just free and has no listener: the connection is refused.
    with trio.socket.socket() as sock:
        await sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    model = OpenAICompatibleModel(http, f"http://127.0.0.1:{port}/v1", None, WAIT)
    with pytest.raises(ModelError, match="connection failed"):
        await model.stream_chat(BODY, Collected())
    with pytest.raises(ModelError):
        await model.list_models()


async def test_cancelling_upstream_stream_closes_the_connection(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("first"))
        await until_client_leaves()  # holds the stream open until the client closes it

    upstream.route("POST", "/v1/chat/completions", handler)
    conn = await _cancel_after_first_delta(upstream, http, Collected())
    assert conn.closed_by == "client"


async def _cancel_after_first_delta(upstream: ScriptedServer, http: httpx2.AsyncClient,
                                    collected: Collected) -> ConnRecord:
    """Stream, cancel once the first delta is in, and return the upstream's record of the
    connection once it saw it closed."""
    with trio.fail_after(WAIT):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(model_for(upstream, http).stream_chat, BODY, collected)
            await collected.first.wait()
            nursery.cancel_scope.cancel()
        return await upstream.wait_connection_closed(upstream.requests[0].conn_id)


async def test_upstream_list_models(upstream: ScriptedServer, http: httpx2.AsyncClient) -> None:
    listing = {"object": "list", "data": [{"id": "gpt-x", "object": "model"},
                                          {"id": "llama", "object": "model"}]}

    async def handler(ex: Exchange) -> None:
        await ex.respond(200, json.dumps(listing).encode(), "application/json")

    upstream.route("GET", "/v1/models", handler)
    assert await model_for(upstream, http).list_models() == ["gpt-x", "llama"]
    assert upstream.requests[0].headers["authorization"] == "Bearer sk-test"


async def test_upstream_list_models_error_raises_model_error_with_status(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await ex.respond(401, b'{"error": {"message": "bad key"}}', "application/json")

    upstream.route("GET", "/v1/models", handler)
    with pytest.raises(ModelError, match="bad key") as caught:
        await model_for(upstream, http).list_models()
    assert caught.value.status == 401


# --- the router ----------------------------------------------------------------------------


class ListingUpstream:
    """A ``ModelProvider`` whose model list (or failure) the test sets."""

    def __init__(self) -> None:
        self.models: list[str] | Exception = []

    async def list_models(self) -> list[str]:
        await trio.lowlevel.checkpoint()
        if isinstance(self.models, Exception):
            raise self.models
        return self.models

    async def stream_chat(self, body: dict[str, Any], on_delta: Any) -> None:
        raise NotImplementedError


def router_with(upstream: ModelProvider | None) -> ModelRouter:
    return ModelRouter(LocalModel(0), upstream)


async def test_router_without_upstream_serves_only_local() -> None:
    router = router_with(None)
    await router.refresh()
    assert isinstance(router.resolve("local"), LocalModel)
    assert router.resolve("gpt-x") is None
    assert router.list_models() == [
        {"id": "local", "object": "model", "created": 0, "owned_by": "tether"}]


async def test_router_lets_the_upstream_decide_until_its_list_is_known() -> None:
    upstream = ListingUpstream()
    router = router_with(upstream)
    assert router.resolve("anything") is upstream
    upstream.models = ["gpt-x"]
    await router.refresh()
    assert router.resolve("gpt-x") is upstream
    assert router.resolve("anything") is None
    assert isinstance(router.resolve("local"), LocalModel)
    assert [(m["id"], m["owned_by"]) for m in router.list_models()] == [
        ("local", "tether"), ("gpt-x", "upstream")]


async def test_router_refresh_failure_keeps_the_old_list_and_remembers_the_error() -> None:
    upstream = ListingUpstream()
    router = router_with(upstream)
    upstream.models = ["gpt-x"]
    await router.refresh()
    upstream.models = ModelError("upstream answered HTTP 503", status=503)
    await router.refresh()
    assert router.resolve("gpt-x") is upstream
    assert router.last_error == "upstream answered HTTP 503"
    upstream.models = RuntimeError("a provider bug")
    await router.refresh()  # never raises
    assert router.last_error is not None and "RuntimeError" in router.last_error
    upstream.models = ["gpt-y"]
    await router.refresh()
    assert router.last_error is None
    assert router.resolve("gpt-x") is None and router.resolve("gpt-y") is upstream


async def test_build_model_router_uses_the_settings(
    upstream: ScriptedServer, http: httpx2.AsyncClient
) -> None:
    async def handler(ex: Exchange) -> None:
        await ex.respond(200, b'{"data": [{"id": "remote"}]}', "application/json")

    upstream.route("GET", "/v1/models", handler)
    assert build_model_router(Settings(), http).upstream is None
    router = build_model_router(
        Settings(llm_base_url=upstream.base_url + "/v1", llm_api_key="k"), http)
    await router.refresh()
    assert [m["id"] for m in router.list_models()] == ["local", "remote"]
    assert isinstance(router.resolve("remote"), OpenAICompatibleModel)
    assert upstream.requests[0].headers["authorization"] == "Bearer k"


# --- paced reads (server.providers.llm.paced) ------------------------------------------------


def paced(pause: Callable[[], float]) -> httpx2.AsyncClient:
    return paced_client(httpx2.Limits(max_connections=10), httpx2.Timeout(WAIT), pause)


async def test_paced_stream_hands_on_chunks_that_arrived_during_a_pause_as_one_delta(
    upstream: ScriptedServer,
) -> None:
    """Separate HTTP chunks that one paced read takes together are one delta, handed on
    when the connection next needs bytes; the text is whole and in order."""
    collected = Collected()

    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("a "))
        await collected.first.wait()
        for piece in ("b ", "c ", "d"):  # three chunks, sent while the client pauses
            await send_sse(ex, chunk(piece))
        await send_sse(ex, chunk(finish="stop"))
        await ex.send("data: [DONE]\n\n")
        await ex.finish()

    upstream.route("POST", "/v1/chat/completions", handler)
    async with paced(lambda: 0.2) as http:
        with trio.fail_after(WAIT):
            await model_for(upstream, http).stream_chat(BODY, collected)
    assert [d.content for d in collected.deltas] == ["a ", "b c d"]
    assert collected.finish_reason == "stop"


async def test_cancelling_a_paced_stream_during_its_pause_closes_the_connection(
    upstream: ScriptedServer,
) -> None:
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("first"))
        await until_client_leaves()

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    # Once the first delta is in, every read waits an hour: the cancel ends the wait.
    async with paced(lambda: 3600 if collected.first.is_set() else 0) as http:
        conn = await _cancel_after_first_delta(upstream, http, collected)
    assert conn.closed_by == "client"


async def test_a_paced_stream_silent_past_its_read_timeout_fails_and_is_closed(
    upstream: ScriptedServer,
) -> None:
    """A plain connection's reads wait on the socket itself; the read timeout is kept by
    the client's watchdog, which closes the connection: the model call fails as timed
    out, and the upstream sees the connection closed."""
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        await send_sse(ex, chunk("first "))
        await until_client_leaves()

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    async with paced(lambda: 0.0) as http:
        with trio.fail_after(WAIT), pytest.raises(ModelError, match="timed out"):
            await model_for(upstream, http, timeout=0.3).stream_chat(BODY, collected)
        conn = await upstream.wait_connection_closed(upstream.requests[0].conn_id)
    assert [d.content for d in collected.deltas] == ["first "]
    assert conn.closed_by == "client"


async def test_a_paced_streams_read_timeout_bounds_each_read_not_the_stream(
    upstream: ScriptedServer,
) -> None:
    """Chunks that come within the timeout of each other keep the stream going however
    long it lasts in all (here twice the timeout)."""
    async def handler(ex: Exchange) -> None:
        await start_stream(ex)
        for i in range(8):
            await send_sse(ex, chunk(f"t{i} "))
            await trio.sleep(0.1)  # the upstream's pace: a read waits about this long
        await send_sse(ex, chunk(finish="stop"))
        await ex.send("data: [DONE]\n\n")
        await ex.finish()

    upstream.route("POST", "/v1/chat/completions", handler)
    collected = Collected()
    async with paced(lambda: 0.0) as http:
        with trio.fail_after(WAIT):
            await model_for(upstream, http, timeout=0.4).stream_chat(BODY, collected)
    assert "".join(d.content or "" for d in collected.deltas) == "".join(
        f"t{i} " for i in range(8))
    assert collected.finish_reason == "stop"
