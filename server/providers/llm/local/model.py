"""``local``: Tether's built-in offline model, for demos and tests. It is not a language model.

It is deterministic (the same request always gives the same answer) and streams word-sized
tokens (a word and the space after it) at ``TETHER_LOCAL_MODEL_TOKENS_PER_S`` (0 or less: no
pacing). It reads the last user message and applies the first rule that fits:

1. **Search queries.** A last user message starting with ``### Task: generate search
   queries`` (the pipeline's query prompt) is answered at once, in one piece, with
   ``{"queries": ["<keywords>"]}``: the question written after ``Question:`` in that prompt,
   without common stop words, at most 8 words.
2. **Tool results.** If ``role: "tool"`` messages follow the last user message, it answers
   "The <tool> tool returned: <result>." for each of them (a result longer than 300
   characters is cut at a word, with "...").
3. **Tool calls**, only for functions the request offers in ``tools`` (and not with
   ``tool_choice: "none"``). First the built-in tools, by name:
   - ``calculator`` with ``{"expression": ...}`` when the message holds an arithmetic
     expression: digits, spaces, brackets and ``.`` with at least one operator
     (``+ - * / % ^ **``) between two numbers, e.g. "what is (2 + 3) * 4?";
   - else ``fetch_url`` with ``{"url": ...}`` when it holds an http(s) URL;
   - else ``current_time`` with ``{}`` when it has the word "time" or "date".

   Else any other offered function that shares a word with the message (in its name or
   description) and whose required parameters the message fills, the best fit first:
   ``get_weather(location, unit)`` for "What's the weather like in Paris today?" gives
   ``{"location": "Paris"}`` (``tool_arguments`` says how each type is read).

   The call has id ``call_<hash>`` and the answer ends with finish reason ``tool_calls``.
4. **Web sources.** When a system message holds sources between ``<sources>`` and
   ``</sources>`` (lines ``[n] <title> (<url>)``, each followed by that source's text), it
   quotes the sentences of the sources that best answer the question (at most three,
   ranked with BM25 over sentences: see ``extractive``), in the order they come in the
   sources, each followed by its citation marker `` [n]``. A source with no such sentence
   is not cited; when no source has one, it says so.
5. **Otherwise** "You asked: <last user message>. I am Tether's built-in local model;
   configure TETHER_LLM_BASE_URL to use a real model." (with no full stop added after a
   message that ends with its own).

``max_tokens`` (or ``max_completion_tokens``) caps the tokens of a text answer; a capped
answer ends with finish reason ``length``, a whole one with ``stop``. The last delta carries
the usage: ``prompt_tokens`` is the number of words in all messages, ``completion_tokens``
the number of word-sized tokens generated.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any

import trio

from server.prompt_markers import QUERY_PROMPT_MARKER, SOURCES_CLOSE, SOURCES_OPEN
from server.providers.llm.base import ModelDelta, OnDelta, ToolCallDelta
from server.providers.llm.local.extractive import STOP_WORDS, best_sentences
from server.providers.llm.local.tool_arguments import FunctionSpec, choose_function, find_url

MODEL_ID = "local"

_MAX_QUERY_WORDS = 8
_MAX_QUOTED_SENTENCES = 3
_MAX_TOOL_RESULT_CHARS = 300
# The tools with rules of their own; other offered functions are matched by their schema.
_BUILT_IN_TOOLS = frozenset({"calculator", "fetch_url", "current_time"})
_NOTHING_FOUND = "I found nothing in the sources that answers this."

# A word for the query keywords: letters and digits, keeping inner marks as in "node.js",
# "C++", "don't" or "3.11".
_WORD = re.compile(r"\w(?:[\w'.+#-]*[\w+#])?")
# An arithmetic expression is looked for in plain user text only. A candidate is a run of
# numbers, operators, brackets and spaces; it counts when an operator stands between two
# numbers (so "2024" or "(see 3)" do not, "2 + 2" and "(1.5)*2" do).
_EXPRESSION_RUN = re.compile(r"[\d(][\d\s.()+\-*/%^]*[\d.)]")
_OPERATOR_BETWEEN_NUMBERS = re.compile(r"\d\.?[\s)]*(?:\*\*|[+\-*/%^])[\s(]*\.?\d")
_TIME_WORD = re.compile(r"\b(?:time|date)\b", re.IGNORECASE)
_QUESTION_LINE = re.compile(r"^Question:[ \t]*(.*)", re.MULTILINE | re.DOTALL)
_SOURCE_HEADER = re.compile(r"^\[(\d+)\][ \t]+(.*?)(?:[ \t]+\((\S+)\))?[ \t]*$")
_TOKEN = re.compile(r"\S+\s*")


@dataclass(frozen=True)
class LocalSource:
    """One web source as the pipeline injected it."""

    number: int
    title: str
    url: str
    text: str


@dataclass(frozen=True)
class LocalReply:
    """What the local model will say: text, or one tool call ``(name, arguments JSON)``.
    ``paced`` is false for answers sent in one piece (query generation)."""

    text: str = ""
    tool_call: tuple[str, str] | None = None
    paced: bool = True


class LocalModel:
    """The built-in model ``local``. See the module docstring for its rules."""

    def __init__(self, tokens_per_s: float) -> None:
        self._interval = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0

    async def list_models(self) -> list[str]:
        """``["local"]``. No I/O; cancelling it only cancels its checkpoint."""
        await trio.lowlevel.checkpoint()
        return [MODEL_ID]

    async def stream_chat(self, body: dict[str, Any], on_delta: OnDelta) -> None:
        """Stream the answer its rules give for ``body``.

        Cancelling it stops the stream between two tokens; the tokens already delivered
        stay delivered, and nothing else is sent (no finish reason, no usage).
        """
        messages = _messages(body)
        reply = plan_reply(body)
        prompt_tokens = sum(len(_message_text(m).split()) for m in messages)
        if reply.tool_call is not None:
            name, arguments = reply.tool_call
            call_id = (
                "call_"
                + hashlib.sha256(json.dumps([name, arguments, len(messages)]).encode()).hexdigest()[
                    :16
                ]
            )
            # Shaped like OpenAI's stream: id and name first, then the arguments.
            await on_delta(ModelDelta(tool_calls=[ToolCallDelta(0, call_id, name, "")]))
            await on_delta(ModelDelta(tool_calls=[ToolCallDelta(0, arguments=arguments)]))
            await on_delta(ModelDelta(finish_reason="tool_calls"))
            await on_delta(ModelDelta(usage=_usage(prompt_tokens, _count_tokens(arguments))))
            return
        if not reply.paced:
            await trio.lowlevel.checkpoint()
            await on_delta(ModelDelta(content=reply.text))
            await on_delta(ModelDelta(finish_reason="stop"))
            await on_delta(ModelDelta(usage=_usage(prompt_tokens, _count_tokens(reply.text))))
            return
        tokens = _TOKEN.findall(reply.text)
        finish = "stop"
        cap = _max_tokens(body)
        if cap is not None and cap < len(tokens):
            tokens, finish = tokens[:cap], "length"
        # Each token has its own due time counted from the first, so the pace holds whatever
        # on_delta costs; trio.sleep_until also makes every token a cancellation point.
        start = trio.current_time()
        for i, token in enumerate(tokens):
            await trio.sleep_until(start + i * self._interval)
            await on_delta(ModelDelta(content=token))
        await trio.lowlevel.checkpoint()
        await on_delta(ModelDelta(finish_reason=finish))
        await on_delta(ModelDelta(usage=_usage(prompt_tokens, len(tokens))))


def plan_reply(body: dict[str, Any]) -> LocalReply:
    """The local model's answer to ``body``, decided without I/O (the rules above)."""
    messages = _messages(body)
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=-1)
    question = _message_text(messages[last_user]) if last_user >= 0 else ""
    if question.lstrip().startswith(QUERY_PROMPT_MARKER):
        keywords = query_keywords(question)
        return LocalReply(text=json.dumps({"queries": [keywords] if keywords else []}), paced=False)
    after_question = messages[last_user + 1 :]
    if any(m.get("role") == "tool" for m in after_question):
        return LocalReply(text=_tool_results_answer(after_question))
    call = _choose_tool_call(question, body)
    if call is not None:
        return LocalReply(tool_call=call)
    sources = parse_sources(messages)
    if sources:
        quoted = best_sentences(
            question, [(s.number, s.text) for s in sources], _MAX_QUOTED_SENTENCES
        )
        if not quoted:
            return LocalReply(text=_NOTHING_FOUND)
        return LocalReply(text=" ".join(f"{q.text} [{q.source}]" for q in quoted))
    asked = question.strip()
    # "You asked: who are you?." would end the question twice.
    stop = "" if asked.endswith((".", "!", "?")) else "."
    return LocalReply(
        text=f"You asked: {asked}{stop} I am Tether's built-in local model; "
        "configure TETHER_LLM_BASE_URL to use a real model."
    )


def query_keywords(prompt: str) -> str:
    """The search query for a query-generation prompt: the keywords of its question."""
    found = _QUESTION_LINE.search(prompt)
    if found is not None:
        question = found.group(1)
    else:
        # No "Question:" line: everything after the marker line is the question.
        question = prompt.lstrip().removeprefix(QUERY_PROMPT_MARKER)
    words = _WORD.findall(question)
    kept = [w for w in words if w.lower() not in STOP_WORDS]
    # A question made only of stop words ("who are you") still deserves a query.
    return " ".join((kept or words)[:_MAX_QUERY_WORDS])


def find_expression(text: str) -> str | None:
    """The first arithmetic expression in ``text``, trimmed, or None."""
    for match in _EXPRESSION_RUN.finditer(text):
        # A run may end with the full stop of its sentence: "It is 2 + 2."
        candidate = _balance_brackets(match.group(0).rstrip(". "))
        if _OPERATOR_BETWEEN_NUMBERS.search(candidate):
            return candidate
    return None


def parse_sources(messages: list[dict[str, Any]]) -> list[LocalSource]:
    """The web sources injected in the first system message that holds a sources block."""
    for message in messages:
        if message.get("role") != "system":
            continue
        text = _message_text(message)
        start = text.find(SOURCES_OPEN)
        end = text.find(SOURCES_CLOSE, start + 1)
        if start < 0 or end < 0:
            continue
        headers: list[tuple[int, str, str]] = []
        bodies: list[list[str]] = []
        for line in text[start + len(SOURCES_OPEN) : end].splitlines():
            header = _SOURCE_HEADER.match(line)
            if header is not None:
                headers.append(
                    (int(header.group(1)), header.group(2).strip(), header.group(3) or "")
                )
                bodies.append([])
            elif bodies:
                # Lines as they are: the Markdown's structure tells sentences from the rest.
                bodies[-1].append(line)
        return [
            LocalSource(n, title, url, "\n".join(lines).strip())
            for (n, title, url), lines in zip(headers, bodies, strict=True)
        ]
    return []


def _choose_tool_call(question: str, body: dict[str, Any]) -> tuple[str, str] | None:
    functions = _offered_functions(body)
    offered = {f.name for f in functions}
    if "calculator" in offered:
        expression = find_expression(question)
        if expression is not None:
            return "calculator", json.dumps({"expression": expression})
    if "fetch_url" in offered:
        url = find_url(question)
        if url is not None:
            return "fetch_url", json.dumps({"url": url})
    if "current_time" in offered and _TIME_WORD.search(question):
        return "current_time", "{}"
    choice = body.get("tool_choice")
    # "required", or one function named: a call must be made, even without a shared word.
    required = choice == "required" or (
        isinstance(choice, dict) and isinstance(choice.get("function"), dict)
    )
    others = [f for f in functions if f.name not in _BUILT_IN_TOOLS]
    chosen = choose_function(question, others, call_required=required)
    if chosen is None:
        return None
    name, arguments = chosen
    return name, json.dumps(arguments)


def _offered_functions(body: dict[str, Any]) -> list[FunctionSpec]:
    """The function tools the model may call, in the order offered, after ``tool_choice``."""
    choice = body.get("tool_choice")
    if choice == "none":
        return []
    forced = choice.get("function") if isinstance(choice, dict) else None
    functions: list[FunctionSpec] = []
    for tool in body.get("tools") or []:
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(function, dict) or not isinstance(function.get("name"), str):
            continue
        if isinstance(forced, dict) and function["name"] != forced.get("name"):
            continue
        description = function.get("description")
        parameters = function.get("parameters")
        functions.append(
            FunctionSpec(
                function["name"],
                description if isinstance(description, str) else "",
                parameters if isinstance(parameters, dict) else {},
            )
        )
    return functions


def _tool_results_answer(messages: list[dict[str, Any]]) -> str:
    names: dict[str, str] = {}
    for message in messages:
        for call in message.get("tool_calls") or []:
            if isinstance(call, dict) and isinstance(call.get("function"), dict):
                names[str(call.get("id"))] = str(call["function"].get("name") or "")
    parts = []
    for message in messages:
        if message.get("role") != "tool":
            continue
        name = message.get("name") or names.get(str(message.get("tool_call_id"))) or "requested"
        result = _shorten(" ".join(_message_text(message).split()), _MAX_TOOL_RESULT_CHARS)
        ending = "" if result.endswith((".", "!", "?")) else "."
        parts.append(f"The {name} tool returned: {result}{ending}")
    return " ".join(parts)


def _balance_brackets(expression: str) -> str:
    """Drop the brackets of the surrounding sentence caught at either end of a run."""
    while expression.endswith(")") and expression.count(")") > expression.count("("):
        expression = expression[:-1].rstrip()
    while expression.startswith("(") and expression.count("(") > expression.count(")"):
        expression = expression[1:].lstrip()
    return expression


def _shorten(text: str, limit: int) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit)
    return text[: cut if cut > limit // 2 else limit].rstrip(" ,;:") + "..."


def _max_tokens(body: dict[str, Any]) -> int | None:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in body.get("messages") or [] if isinstance(m, dict)]


def _message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content parts: only the text parts are read
        return " ".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, dict) and p.get("type", "text") == "text"
        )
    return ""


def _count_tokens(text: str) -> int:
    return len(_TOKEN.findall(text))


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }
