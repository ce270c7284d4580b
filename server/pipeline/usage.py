"""The answer's token usage: the model's reports, and Tether's own count where there is none.

A model reports usage at the end of its stream (Tether asks for it with
``stream_options.include_usage``). An answer stopped or failed mid-stream never gets that
report, nor does one from an upstream that ignores the option, yet an OpenAI client expects
``usage`` to be an object. So each model round is counted as it streams, and every figure the
model did not report is Tether's:

- ``prompt_tokens``: the characters of the round's messages as sent to the model (text
  content, and the names and arguments of the assistant's tool calls) divided by 4, rounded
  up (OpenAI's rule of thumb for English text);
- ``completion_tokens``: the streamed chunks that carried content, reasoning or a tool-call
  piece (an OpenAI-compatible stream sends about one token per chunk);
- ``total_tokens``: the sum.

A usage with a prompt or completion figure of Tether's has ``"estimated": true``. The rounds
of a tool loop add up. A round that failed before the model sent anything counts nothing:
the model most likely never read it.
"""

from __future__ import annotations

import math
from typing import Any

from server.schemas import message_text

_FIGURES = ("prompt_tokens", "completion_tokens", "total_tokens")
_CHARS_PER_TOKEN = 4


def estimate_prompt_tokens(messages: list[dict[str, Any]]) -> int:
    """``ceil(characters / 4)`` of the messages' text and tool calls."""
    chars = 0
    for message in messages:
        chars += len(message_text(message))
        for call in message.get("tool_calls") or ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict):
                chars += len(str(function.get("name") or ""))
                chars += len(str(function.get("arguments") or ""))
    return math.ceil(chars / _CHARS_PER_TOKEN)


def add_usage(total: dict[str, Any] | None, more: dict[str, Any] | None) -> dict[str, Any] | None:
    """``total`` with ``more`` added to it (``total`` is changed; None is nothing yet)."""
    if more is None:
        return total
    if total is None:
        return dict(more)
    for key in _FIGURES:
        if isinstance(more.get(key), int):
            total[key] = int(total.get(key, 0)) + int(more[key])
    if more.get("estimated"):
        total["estimated"] = True
    return total


def _figure(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


class UsageMeter:
    """Counts one answer's usage over its model rounds. No I/O: it can be read while the
    task is being cancelled."""

    def __init__(self) -> None:
        self._ended: dict[str, Any] | None = None
        self._messages: list[dict[str, Any]] | None = None  # the round in flight's prompt
        self._chunks = 0
        self._reported: dict[str, Any] | None = None

    def begin_round(self, messages: list[dict[str, Any]]) -> None:
        """A round is being sent to the model with these messages."""
        self._messages = messages
        self._chunks = 0
        self._reported = None

    def count_chunks(self, chunks: int) -> None:
        self._chunks += chunks

    def report(self, usage: dict[str, Any]) -> None:
        """The model's usage report for the round in flight (its latest one counts)."""
        self._reported = usage

    @property
    def round_answered(self) -> bool:
        """Whether the model has sent anything countable in the round in flight."""
        return self._chunks > 0 or self._reported is not None

    def end_round(self) -> None:
        """The round in flight is over (whole or not): it joins the total."""
        if self._messages is not None:
            self._ended = add_usage(self._ended, self._round_usage(self._messages))
        self._messages = None

    def drop_round(self) -> None:
        """The round in flight counts nothing (it failed before the model answered)."""
        self._messages = None

    def so_far(self) -> dict[str, Any] | None:
        """The usage of the ended rounds and of the round in flight; None before the first
        round."""
        total = None if self._ended is None else dict(self._ended)
        if self._messages is not None:
            total = add_usage(total, self._round_usage(self._messages))
        return total

    def _round_usage(self, messages: list[dict[str, Any]]) -> dict[str, Any]:
        reported = self._reported or {}
        usage = dict(reported)
        prompt = _figure(reported.get("prompt_tokens"))
        completion = _figure(reported.get("completion_tokens"))
        total = _figure(reported.get("total_tokens"))
        estimated = prompt is None or completion is None
        if prompt is None:
            prompt = estimate_prompt_tokens(messages)
        if completion is None:
            completion = self._chunks
        if total is None or estimated:
            total = prompt + completion
        usage.update(prompt_tokens=prompt, completion_tokens=completion, total_tokens=total)
        if estimated:
            usage["estimated"] = True
        return usage
