"""``local``: Tether's built-in offline model, for demos and tests. Not a language model.

It is deterministic (the same messages give the same answer) and streams word-sized
tokens at ``tokens_per_s``. Its rules, checked in this order:

1. Query generation: a last user message that starts with ``QUERY_PROMPT_MARKER`` (the
   pipeline's prompt) is answered at once with ``{"queries": ["<keywords>"]}``: the words
   of the ``Question:`` line without stop words, at most 8.
2. Tool results: if ``role: "tool"`` messages follow the last user message, it answers
   "The <tool> tool returned: <result>."
3. Tool calls, only for tools offered in ``tools``: ``calculator`` when the last user
   message holds an arithmetic expression (numbers joined by ``+ - * / % ^ **``);
   else ``fetch_url`` when it holds an http(s) URL; else ``current_time`` when it
   mentions "time" or "date".
4. Sources: when a system message holds web sources between ``<sources>`` and
   ``</sources>`` (lines ``[n] title (url)`` followed by text), it answers with the first
   sentence of up to three sources, each followed by its citation marker ``[n]``.
5. Otherwise it repeats the question and says how to configure a real model.

``max_tokens`` caps the tokens it streams (finish reason ``length``).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import trio

from server.providers.llm.base import ModelDelta, OnDelta, ToolCallDelta

QUERY_PROMPT_MARKER = "### Task: generate search queries"
SOURCES_OPEN = "<sources>"
SOURCES_CLOSE = "</sources>"

_STOP_WORDS = frozenset(
    "a an and are as at be by can could do does for from how i in is it me of on or please "
    "should tell the to was what when where which who why will with would you your".split()
)
# Applied to plain user text (never to HTML): a run of numbers, operators and brackets.
_EXPRESSION = re.compile(r"[\d(][\d\s.()+\-*/%^]*[\d)]")
_OPERATOR_BETWEEN = re.compile(r"\d[\s)]*(\*\*|[+\-*/%^])[\s(]*[\d.]")
_URL = re.compile(r"https?://[^\s<>\"')]+")
_SOURCE_HEADER = re.compile(r"^\[(\d+)\]\s")


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict))
    return ""


def _keywords(question: str) -> str:
    words = re.findall(r"[\w'-]+", question.lower())
    kept = [w for w in words if w not in _STOP_WORDS]
    return " ".join((kept or words)[:8])


def _first_sentence(text: str) -> str:
    text = " ".join(text.split())
    for end in (". ", "! ", "? "):
        cut = text.find(end)
        if 0 < cut < 200:
            return text[: cut + 1]
    return text[:200].rstrip() + ("..." if len(text) > 200 else "")


def parse_sources(messages: list[dict[str, Any]]) -> list[tuple[int, str]]:
    """(number, text) of each injected source, in order."""
    for message in messages:
        if message.get("role") != "system":
            continue
        text = _text(message)
        start, end = text.find(SOURCES_OPEN), text.find(SOURCES_CLOSE)
        if start < 0 or end < start:
            continue
        sources: list[tuple[int, list[str]]] = []
        for line in text[start + len(SOURCES_OPEN) : end].splitlines():
            header = _SOURCE_HEADER.match(line)
            if header:
                sources.append((int(header.group(1)), []))
            elif sources and line.strip() and not line.lstrip().startswith("#"):
                sources[-1][1].append(line.strip())
        return [(n, " ".join(lines)) for n, lines in sources]
    return []


def find_expression(text: str) -> str | None:
    for match in _EXPRESSION.finditer(text):
        candidate = match.group(0).strip()
        if _OPERATOR_BETWEEN.search(candidate):
            return candidate
    return None


class LocalModel:
    def __init__(self, tokens_per_s: float) -> None:
        self._pause = 1.0 / tokens_per_s if tokens_per_s > 0 else 0.0

    async def list_models(self) -> list[str]:
        return ["local"]

    async def stream_chat(self, body: dict[str, Any], on_delta: OnDelta) -> None:
        """Stream the answer its rules give. Cancelling it stops between two tokens."""
        messages: list[dict[str, Any]] = list(body.get("messages") or [])
        last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"),
                        default=-1)
        question = _text(messages[last_user]) if last_user >= 0 else ""
        if question.startswith(QUERY_PROMPT_MARKER):
            asked = question.split("Question:", 1)[-1].strip()
            answer = json.dumps({"queries": [_keywords(asked)]})
            await on_delta(ModelDelta(content=answer))
            await on_delta(ModelDelta(finish_reason="stop", usage=_usage(messages, 1)))
            return
        tool_results = [m for m in messages[last_user + 1 :] if m.get("role") == "tool"]
        offered = {
            t.get("function", {}).get("name")
            for t in body.get("tools") or []
            if isinstance(t, dict)
        }
        if tool_results:
            names = _tool_names(messages[last_user + 1 :])
            parts = [f"The {names.get(m.get('tool_call_id'), 'tool')} tool returned: "
                     f"{_text(m)}." for m in tool_results]
            text = " ".join(parts)
        else:
            call = None if body.get("tool_choice") == "none" else _tool_call(question, offered)
            if call is not None:
                name, arguments = call
                call_id = "call_" + hashlib.sha256(
                    (name + arguments).encode()).hexdigest()[:12]
                await on_delta(ModelDelta(tool_calls=[ToolCallDelta(0, call_id, name, "")]))
                await on_delta(ModelDelta(tool_calls=[ToolCallDelta(0, None, None, arguments)]))
                await on_delta(ModelDelta(finish_reason="tool_calls", usage=_usage(messages, 1)))
                return
            sources = parse_sources(messages)
            if sources:
                text = "Here is what I found: " + " ".join(
                    f"{_first_sentence(body_text)} [{n}]" for n, body_text in sources[:3])
            else:
                text = (f"You asked: {question.strip()}. I am Tether's built-in local model; "
                        "configure TETHER_LLM_BASE_URL to use a real model.")
        await self._stream_text(text, messages, body.get("max_tokens"), on_delta)

    async def _stream_text(self, text: str, messages: list[dict[str, Any]],
                           max_tokens: Any, on_delta: OnDelta) -> None:
        tokens = re.findall(r"\S+\s*", text)
        finish = "stop"
        if isinstance(max_tokens, int) and 0 < max_tokens < len(tokens):
            tokens, finish = tokens[:max_tokens], "length"
        for i, token in enumerate(tokens):
            if self._pause and i:
                await trio.sleep(self._pause)
            await on_delta(ModelDelta(content=token))
        await trio.lowlevel.checkpoint()
        await on_delta(ModelDelta(finish_reason=finish, usage=_usage(messages, len(tokens))))


def _tool_call(question: str, offered: set[Any]) -> tuple[str, str] | None:
    if "calculator" in offered:
        expression = find_expression(question)
        if expression:
            return "calculator", json.dumps({"expression": expression})
    if "fetch_url" in offered:
        url = _URL.search(question)
        if url:
            return "fetch_url", json.dumps({"url": url.group(0).rstrip(".,;")})
    if "current_time" in offered and re.search(r"\b(time|date)\b", question.lower()):
        return "current_time", "{}"
    return None


def _tool_names(messages: list[dict[str, Any]]) -> dict[Any, str]:
    names: dict[Any, str] = {}
    for message in messages:
        for call in message.get("tool_calls") or []:
            names[call.get("id")] = call.get("function", {}).get("name", "tool")
    return names


def _usage(messages: list[dict[str, Any]], completion: int) -> dict[str, int]:
    prompt = sum(len(_text(m).split()) for m in messages)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}
