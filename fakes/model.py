"""Fake OpenAI-compatible model provider.

Endpoints: ``GET /v1/models``, ``POST /v1/chat/completions`` (stream or not),
plus the common ``/_fake/`` control API and ``POST /_fake/script`` (append
replies to the FIFO).

Which reply a chat request gets: the first rule in ``rules`` whose substring
occurs in the last user message, else the head of the ``script`` FIFO (popped),
else ``default_reply``.
"""

from __future__ import annotations

import heapq
import itertools
import json
import math
import time
from dataclasses import dataclass, field
from typing import Any, ClassVar

import trio

from .base import Exchange, FakeServer, run_main

__all__ = [
    "DieMidwayReply",
    "EchoReply",
    "ErrorReply",
    "FakeModel",
    "HangReply",
    "Reply",
    "TextReply",
    "ToolCallReply",
    "main",
    "reply_from_json",
    "token_logprob",
]


@dataclass
class TextReply:
    """Plain assistant text. Streamed one delta per chunk, ``interval`` seconds
    apart, after ``first_delay`` (headers go out first). ``reasoning_chunks`` are
    streamed before the content as ``delta.reasoning_content`` (the key is
    ``reasoning_field``, e.g. "reasoning"). With ``tokens`` set, the chunks are
    generated as ``"tok{i} "`` and paced at ``rate`` tokens/s (if given).

    A request with ``n`` > 1 gets ``n`` choices, their chunks interleaved (piece ``k``
    of every choice, then piece ``k + 1``): choice ``i`` > 0 streams ``other_chunks[i -
    1]`` when given, else the same pieces as choice 0 with ``"<i>:"`` before the first.
    A request with ``logprobs: true`` gets each piece's token logprobs (see
    ``token_logprob``), with ``top_logprobs`` alternatives."""

    kind: ClassVar[str] = "text"
    chunks: list[str] = field(default_factory=list)
    interval: float = 0.0
    first_delay: float = 0.0
    reasoning_chunks: list[str] = field(default_factory=list)
    tokens: int | None = None
    rate: float | None = None
    finish_reason: str = "stop"
    reasoning_field: str = "reasoning_content"
    other_chunks: list[list[str]] = field(default_factory=list)

    def content_chunks(self) -> list[str]:
        if self.tokens is not None:
            return [f"tok{i} " for i in range(self.tokens)]
        return list(self.chunks)

    def choice_chunks(self, index: int) -> list[str]:
        """The content pieces of choice ``index`` (see the class's docstring)."""
        if index == 0:
            return self.content_chunks()
        if index <= len(self.other_chunks):
            return list(self.other_chunks[index - 1])
        chunks = self.content_chunks()
        return [f"{index}:{chunks[0]}", *chunks[1:]] if chunks else [f"{index}:"]

    def pace(self) -> float:
        if self.rate:
            return 1.0 / self.rate
        return self.interval


def token_logprob(piece: str, position: int, top: int) -> dict[str, Any]:
    """The fake's token logprob object (OpenAI's shape) for a piece at ``position`` of its
    choice: ``logprob`` is ``-(position + 1) / 100``, and the ``top`` alternatives are
    ``"alt<j>"`` at ``logprob - j - 1``."""
    logprob = -(position + 1) / 100
    return {
        "token": piece,
        "logprob": logprob,
        "bytes": list(piece.encode()),
        "top_logprobs": [
            {"token": f"alt{j}", "logprob": logprob - j - 1, "bytes": list(f"alt{j}".encode())}
            for j in range(top)
        ],
    }


@dataclass
class ToolCallReply:
    """Assistant tool calls; ``calls`` is a list of ``(name, arguments_json)``.
    ``delay`` is waited after the headers (stream) / before the response."""

    kind: ClassVar[str] = "tool_calls"
    calls: list[tuple[str, str]] = field(default_factory=list)
    delay: float = 0.0
    content: str = ""

    def __post_init__(self) -> None:
        norm: list[tuple[str, str]] = []
        for call in self.calls:
            if isinstance(call, dict):
                name, args = call["name"], call.get("arguments", "{}")
            else:
                name, args = call[0], call[1]
            if not isinstance(args, str):
                args = json.dumps(args)
            norm.append((str(name), args))
        self.calls = norm


def _default_error_body() -> dict[str, Any]:
    return {"error": {"message": "boom", "type": "server_error"}}


@dataclass
class ErrorReply:
    """HTTP error with a JSON body, after ``delay`` seconds."""

    kind: ClassVar[str] = "error"
    status: int = 500
    body: dict[str, Any] = field(default_factory=_default_error_body)
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class DieMidwayReply:
    """Send ``chunks`` then close the socket without the terminating chunk /
    ``[DONE]`` (``rst=True``: reset instead of FIN). Non-stream: headers with the
    full Content-Length, half the body, then close."""

    kind: ClassVar[str] = "die_midway"
    chunks: list[str] = field(default_factory=list)
    interval: float = 0.0
    rst: bool = False


@dataclass
class HangReply:
    """Send headers (unless ``send_headers`` is false) and then nothing, until
    the client goes away."""

    kind: ClassVar[str] = "hang"
    send_headers: bool = True


@dataclass
class EchoReply:
    """Stream back the last user message split on spaces."""

    kind: ClassVar[str] = "echo"
    interval: float = 0.0


Reply = TextReply | ToolCallReply | ErrorReply | DieMidwayReply | HangReply | EchoReply

_KINDS: dict[str, type[Reply]] = {
    "text": TextReply,
    "tool_calls": ToolCallReply,
    "tool_call": ToolCallReply,
    "tool": ToolCallReply,
    "error": ErrorReply,
    "die_midway": DieMidwayReply,
    "die": DieMidwayReply,
    "hang": HangReply,
    "echo": EchoReply,
}


def reply_from_json(obj: Reply | dict[str, Any]) -> Reply:
    """Build a Reply from e.g. ``{"kind": "text", "chunks": ["a"], "interval": 0.05}``."""
    if not isinstance(obj, dict):
        return obj
    data = dict(obj)
    kind = data.pop("kind", "text")
    cls = _KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown reply kind {kind!r}; known: {sorted(_KINDS)}")
    return cls(**data)


def default_reply() -> Reply:
    return TextReply(["Hello", " from", " the", " fake", " model."])


def _message_text(message: Any) -> str:
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = [p.get("text", "") for p in content if isinstance(p, dict)]
        return "".join(p for p in parts if isinstance(p, str))
    return ""


def last_user_text(body: Any) -> str:
    """Text of the last ``role == "user"`` message of a chat request body."""
    if not isinstance(body, dict):
        return ""
    messages = body.get("messages")
    if not isinstance(messages, list):
        return ""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return _message_text(message)
    return ""


def _split(text: str, pieces: int) -> list[str]:
    pieces = max(2, pieces)
    size = max(1, -(-len(text) // pieces))
    out = [text[i : i + size] for i in range(0, len(text), size)]
    while len(out) < pieces:
        out.append("")
    return out


class FakeModel(FakeServer):
    SETTING_NAMES: ClassVar[tuple[str, ...]] = (
        "script",
        "rules",
        "default_reply",
        "models",
        "require_api_key",
    )

    script: list[Reply]
    rules: list[tuple[str, Reply]]
    default_reply: Reply
    models: list[str]
    require_api_key: str | None

    def __init__(self) -> None:
        self._ids = itertools.count(1)
        self.pacer = _Pacer()
        super().__init__()

    def _start_background(self, nursery: trio.Nursery) -> None:
        nursery.start_soon(self.pacer.run)

    def _reset_settings(self) -> None:
        self.script = []
        self.rules = []
        self.default_reply = default_reply()
        self.models = ["fake-model", "fake-tools"]
        self.require_api_key = None

    def _apply_setting(self, key: str, value: Any) -> None:
        if key == "script":
            value = [reply_from_json(v) for v in value]
        elif key == "rules":
            value = [(str(sub), reply_from_json(r)) for sub, r in value]
        elif key == "default_reply":
            value = reply_from_json(value)
        elif key == "models":
            value = [str(v) for v in value]
        super()._apply_setting(key, value)

    # ------------------------------------------------------------------ helpers
    def push(self, *replies: Reply | dict[str, Any]) -> None:
        """Append replies to the script FIFO."""
        self.script.extend(reply_from_json(r) for r in replies)

    def add_rule(self, substring: str, reply: Reply | dict[str, Any]) -> None:
        self.rules.append((substring, reply_from_json(reply)))

    @property
    def chat_requests(self) -> list[Any]:
        """Parsed JSON bodies of every chat completion request, in order."""
        return [r.json_body for r in self.requests_for("/v1/chat/completions")]

    def pick_reply(self, body: Any) -> Reply:
        text = last_user_text(body)
        for substring, reply in self.rules:
            if substring in text:
                return reply
        if self.script:
            return self.script.pop(0)
        return self.default_reply

    async def handle_control(self, ex: Exchange, name: str) -> bool:
        if name == "script" and ex.request.method == "POST":
            body = ex.request.json_body
            items = body if isinstance(body, list) else [body]
            try:
                self.push(*items)
            except (TypeError, ValueError, KeyError) as exc:
                await ex.respond_json({"error": str(exc)}, 400)
                return True
            self._notify()
            await ex.respond_json({"script_len": len(self.script)})
            return True
        return False

    # ------------------------------------------------------------------ HTTP
    async def handle(self, ex: Exchange) -> None:
        req = ex.request
        if self.require_api_key is not None:
            auth = req.headers.get("authorization", "")
            if auth != f"Bearer {self.require_api_key}":
                await ex.respond_json(
                    {"error": {"message": "bad api key", "type": "invalid_request_error"}}, 401
                )
                return
        path = req.path.rstrip("/")
        if path == "/v1/models" and req.method == "GET":
            data = [
                {"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models
            ]
            await ex.respond_json({"object": "list", "data": data})
        elif path == "/v1/chat/completions" and req.method == "POST":
            await self._chat(ex)
        else:
            await ex.respond_json(
                {"error": {"message": f"no route {req.method} {req.path}", "type": "not_found"}},
                404,
            )

    async def _chat(self, ex: Exchange) -> None:
        body = ex.request.json_body
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            await ex.respond_json(
                {"error": {"message": "invalid JSON body", "type": "invalid_request_error"}}, 400
            )
            return
        reply = self.pick_reply(body)
        ex.request.meta["reply_kind"] = reply.kind
        self._notify()
        call = _Call(self, ex, body, f"chatcmpl-fake-{next(self._ids)}", self.pacer)
        if isinstance(reply, ErrorReply):
            await trio.sleep(reply.delay)
            await ex.respond_json(reply.body, reply.status, reply.headers.items())
        elif isinstance(reply, HangReply):
            if reply.send_headers:
                ctype = "text/event-stream" if call.stream else "application/json"
                await ex.start_response(200, [("content-type", ctype)])
            await trio.sleep_forever()
        elif isinstance(reply, TextReply) and (call.n > 1 or call.logprobs):
            await call.choices_text(reply)
        elif isinstance(reply, TextReply):
            await call.text(
                reply.content_chunks(),
                reply.reasoning_chunks,
                reply.pace(),
                reply.first_delay,
                reply.finish_reason,
                reply.reasoning_field,
            )
        elif isinstance(reply, EchoReply):
            words = last_user_text(body).split(" ")
            chunks = [w if i == 0 else " " + w for i, w in enumerate(words)]
            await call.text(chunks, [], reply.interval, 0.0, "stop")
        elif isinstance(reply, ToolCallReply):
            await call.tool_calls(reply)
        else:
            await call.die_midway(reply)


class _Call:
    """One chat completion response being produced."""

    def __init__(
        self,
        model: FakeModel,
        ex: Exchange,
        body: dict[str, Any],
        cid: str,
        pacer: _Pacer | None = None,
    ) -> None:
        self.ex = ex
        self.pacer = pacer
        self.body = body
        self.id = cid
        self.stream = bool(body.get("stream"))
        default_name = model.models[0] if model.models else "fake-model"
        self.model_name = str(body.get("model") or default_name)
        self.created = int(time.time())
        self.prompt_tokens = sum(
            len(_message_text(m).split()) for m in body.get("messages", []) if isinstance(m, dict)
        )
        n = body.get("n")
        self.n = n if type(n) is int and n > 1 else 1
        self.logprobs = body.get("logprobs") is True
        top = body.get("top_logprobs")
        self.top_logprobs = top if type(top) is int and top > 0 else 0

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": self.prompt_tokens + completion_tokens,
        }

    def chunk(
        self,
        delta: dict[str, Any],
        finish_reason: str | None = None,
        usage: dict[str, int] | None = None,
    ) -> dict[str, Any]:
        obj: dict[str, Any] = {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model_name,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }
        if usage is not None:
            obj["usage"] = usage
        obj["fake_sent_at"] = time.monotonic()
        return obj

    def completion(
        self, message: dict[str, Any], finish_reason: str, completion_tokens: int
    ) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model_name,
            "choices": [{"index": 0, "message": message, "finish_reason": finish_reason}],
            "usage": self.usage(completion_tokens),
            "fake_sent_at": time.monotonic(),
        }

    async def start_sse(self) -> None:
        await self.ex.start_response(
            200,
            [
                ("content-type", "text/event-stream; charset=utf-8"),
                ("cache-control", "no-cache"),
            ],
        )

    async def sse(self, obj: dict[str, Any] | str) -> None:
        data = obj if isinstance(obj, str) else json.dumps(obj, separators=(",", ":"))
        await self.ex.send(f"data: {data}\n\n")

    async def text(
        self,
        chunks: list[str],
        reasoning: list[str],
        pace: float,
        first_delay: float,
        finish_reason: str,
        reasoning_field: str = "reasoning_content",
    ) -> None:
        pieces = [(reasoning_field, r) for r in reasoning] + [("content", c) for c in chunks]
        if not self.stream:
            total = first_delay + pace * max(0, len(pieces) - 1)
            await trio.sleep(total)
            message: dict[str, Any] = {"role": "assistant", "content": "".join(chunks)}
            if reasoning:
                message[reasoning_field] = "".join(reasoning)
            await self.ex.respond_json(self.completion(message, finish_reason, len(chunks)))
            return
        await self.start_sse()
        await trio.sleep(first_delay)
        await self._paced(pieces, pace)
        final_delta: dict[str, Any] = {} if pieces else {"role": "assistant", "content": ""}
        await self.sse(self.chunk(final_delta, finish_reason, self.usage(len(chunks))))
        await self.sse("[DONE]")
        await self.ex.finish()

    async def choices_text(self, reply: TextReply) -> None:
        """A text reply with ``n`` choices and, if asked, token logprobs, in OpenAI's
        shape: streamed, each chunk one piece of one choice (``index``, ``delta``,
        ``logprobs: {"content": [token]}``), then one chunk per choice with its finish
        reason, then the usage in a chunk without choices; or one completion."""
        per_choice = [reply.choice_chunks(i) for i in range(self.n)]
        tokens = sum(len(chunks) for chunks in per_choice)

        def logprobs(chunks: list[str]) -> dict[str, Any] | None:
            if not self.logprobs:
                return None
            return {
                "content": [
                    token_logprob(piece, k, self.top_logprobs) for k, piece in enumerate(chunks)
                ],
                "refusal": None,
            }

        if not self.stream:
            await trio.sleep(reply.first_delay + reply.pace() * max(0, tokens - 1))
            completion = self.completion({}, reply.finish_reason, tokens)
            completion["choices"] = [
                {
                    "index": i,
                    "message": {"role": "assistant", "content": "".join(chunks)},
                    "finish_reason": reply.finish_reason,
                    "logprobs": logprobs(chunks),
                }
                for i, chunks in enumerate(per_choice)
            ]
            await self.ex.respond_json(completion)
            return
        await self.start_sse()
        await trio.sleep(reply.first_delay)
        t0 = trio.current_time()
        sent = 0
        for k in range(max(len(chunks) for chunks in per_choice)):
            for i, chunks in enumerate(per_choice):
                if k >= len(chunks):
                    continue
                await trio.sleep_until(t0 + sent * reply.pace())
                sent += 1
                delta: dict[str, Any] = {"content": chunks[k]}
                if k == 0:
                    delta = {"role": "assistant", **delta}
                chunk = self.chunk(delta)
                choice = chunk["choices"][0]
                choice["index"] = i
                choice["logprobs"] = (
                    {"content": [token_logprob(chunks[k], k, self.top_logprobs)], "refusal": None}
                    if self.logprobs
                    else None
                )
                await self.sse(chunk)
        for i in range(self.n):
            chunk = self.chunk({}, reply.finish_reason)
            chunk["choices"][0]["index"] = i
            await self.sse(chunk)
        usage = self.chunk({}, usage=self.usage(tokens))
        usage["choices"] = []
        await self.sse(usage)
        await self.sse("[DONE]")
        await self.ex.finish()

    async def _paced(self, pieces: list[tuple[str, str]], pace: float) -> None:
        """Stream one chunk per piece, piece i due ``i * pace`` after the first.

        Lean, since the bench streams thousands of tokens a second through one fake:
        every chunk's bytes are rendered once up front (byte for byte what ``chunk``
        would give, up to the ``fake_sent_at`` stamp), every piece already due when the
        stream is written (it fell behind, or ``pace`` is 0) goes out in one HTTP chunk,
        and the waiting between pieces is done by the model's one :class:`_Pacer` for
        all streams (one timer wake-up per tick, raw non-blocking socket writes), not by
        a sleeping task per stream."""
        if not pieces:
            return
        head = json.dumps(
            {
                "id": self.id,
                "object": "chat.completion.chunk",
                "created": self.created,
                "model": self.model_name,
            },
            separators=(",", ":"),
        )[:-1]
        prefix = f'data: {head},"choices":[{{"index":0,"delta":'
        suffix = ',"finish_reason":null}],"fake_sent_at":'
        key0, piece0 = pieces[0]
        first = json.dumps({"role": "assistant", key0: piece0}, separators=(",", ":"))
        parts = [f"{prefix}{first}{suffix}".encode()]
        parts += [f"{prefix}{_delta_json(k, p)}{suffix}".encode() for k, p in pieces[1:]]
        stream = _PacedStream(self.ex, parts, trio.current_time(), pace)
        ex = self.ex
        raw = ex.raw_body_chunks
        # The first piece (and whatever is due with it) goes out from here.
        body = stream.take_due(trio.current_time(), _stamp())
        await (ex.send_raw(ex.frame_body_chunk(body)) if raw else ex.send(body))
        pacer = self.pacer
        if not raw or pacer is None or not pacer.running:
            while stream.i < stream.n:  # plain loop: no pacer, or no chunked body
                await trio.sleep_until(stream.due())
                await ex.send(stream.take_due(trio.current_time(), _stamp()))
            return
        try:
            while stream.i < stream.n:
                stream.wake = trio.Event()
                pacer.add(stream)
                await stream.wake.wait()
                if stream.error is not None:
                    raise stream.error
                if stream.backlog:  # the socket was full: wait for it here
                    data, stream.backlog = stream.backlog, b""
                    await ex.send_raw(data)
        finally:
            stream.closed = True

    async def tool_calls(self, reply: ToolCallReply) -> None:
        n_tokens = sum(len(args) for _, args in reply.calls) // 4 + 1
        if not self.stream:
            await trio.sleep(reply.delay)
            message: dict[str, Any] = {
                "role": "assistant",
                "content": reply.content or None,
                "tool_calls": [
                    {
                        "id": f"call_fake_{i}",
                        "type": "function",
                        "function": {"name": name, "arguments": args},
                    }
                    for i, (name, args) in enumerate(reply.calls)
                ],
            }
            await self.ex.respond_json(self.completion(message, "tool_calls", n_tokens))
            return
        await self.start_sse()
        await trio.sleep(reply.delay)
        first = True
        if reply.content:
            await self.sse(self.chunk({"role": "assistant", "content": reply.content}))
            first = False
        for i, (name, args) in enumerate(reply.calls):
            head: dict[str, Any] = {
                "tool_calls": [
                    {
                        "index": i,
                        "id": f"call_fake_{i}",
                        "type": "function",
                        "function": {"name": name, "arguments": ""},
                    }
                ]
            }
            if first:
                head = {"role": "assistant", "content": None, **head}
                first = False
            await self.sse(self.chunk(head))
            for piece in _split(args, min(4, max(2, len(args) // 8))):
                await self.sse(
                    self.chunk({"tool_calls": [{"index": i, "function": {"arguments": piece}}]})
                )
        await self.sse(self.chunk({}, "tool_calls", self.usage(n_tokens)))
        await self.sse("[DONE]")
        await self.ex.finish()

    async def die_midway(self, reply: DieMidwayReply) -> None:
        if not self.stream:
            message = {"role": "assistant", "content": "".join(reply.chunks)}
            full = json.dumps(self.completion(message, "stop", len(reply.chunks))).encode()
            await self.ex.start_response(
                200, [("content-type", "application/json")], content_length=len(full)
            )
            await self.ex.send(full[: len(full) // 2])
            await trio.sleep(reply.interval * len(reply.chunks))
            self.ex.abort(reply.rst)
        await self.start_sse()
        t0 = trio.current_time()
        for i, piece in enumerate(reply.chunks):
            if i and reply.interval > 0:
                await trio.sleep_until(t0 + i * reply.interval)
            delta: dict[str, Any] = {"content": piece}
            if i == 0:
                delta = {"role": "assistant", **delta}
            await self.sse(self.chunk(delta))
        if reply.interval > 0:
            await trio.sleep(reply.interval)
        self.ex.abort(reply.rst)


_DELTA_JSON: dict[tuple[str, str], str] = {}
_DELTA_DUMPS = json.JSONEncoder(separators=(",", ":")).encode


def _delta_json(key: str, piece: str) -> str:
    """``{key: piece}`` as compact JSON, remembered (bench streams repeat ``tok<i>``)."""
    text = _DELTA_JSON.get((key, piece))
    if text is None:
        if len(_DELTA_JSON) >= 20_000:
            _DELTA_JSON.clear()
        text = _DELTA_JSON[(key, piece)] = _DELTA_DUMPS({key: piece})
    return text


def _stamp() -> bytes:
    """The ``fake_sent_at`` value and the end of a chunk made by ``_Call._paced``."""
    return b"%r}\n\n" % time.monotonic()


class _PacedStream:
    """One paced text stream: pre-rendered chunks (each ending in ``"fake_sent_at":``),
    piece ``i`` due at ``t0 + i * pace``."""

    __slots__ = ("backlog", "closed", "error", "ex", "i", "n", "pace", "parts", "t0", "wake")

    def __init__(self, ex: Exchange, parts: list[bytes], t0: float, pace: float) -> None:
        self.ex = ex
        self.parts = parts
        self.t0 = t0
        self.pace = pace
        self.i = 0
        self.n = len(parts)
        self.wake = trio.Event()
        self.error: BaseException | None = None
        self.backlog = b""
        self.closed = False

    def due(self) -> float:
        return self.t0 + self.i * self.pace

    def take_due(self, now: float, stamp: bytes) -> bytes:
        """The SSE events of every piece due at ``now`` (at least the next one),
        stamped; advances ``i``."""
        i, n, pace, t0 = self.i, self.n, self.pace, self.t0
        j = i + 1
        while j < n and (pace <= 0 or t0 + j * pace <= now):
            j += 1
        self.i = j
        if j == i + 1:
            return self.parts[i] + stamp
        return stamp.join(self.parts[i:j]) + stamp


class _Pacer:
    """Writes the paced pieces of every streaming text reply of one fake model.

    Streams wait in a heap by next due time; one task wakes at the earliest due time
    and writes every due piece of every due stream with a non-blocking socket write.
    It wakes at most once per ``QUANTUM`` (so a busy fake pays one timer wake-up per
    tick, not one per stream), or once per the shortest pace of the streams it serves
    if that is shorter (so no stream's pieces get merged by the pacer itself). A
    stream's own task only wakes when the stream is done, its socket is full (it then
    waits for the socket itself) or the peer is gone."""

    QUANTUM = 0.002

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, _PacedStream]] = []
        self._seq = itertools.count()
        self._scope: trio.CancelScope | None = None
        self._last_wake = -math.inf
        self._not_before = -math.inf
        self.running = False

    def add(self, stream: _PacedStream) -> None:
        due = stream.due()
        heapq.heappush(self._heap, (due, next(self._seq), stream))
        self._not_before = min(self._not_before, self._last_wake + stream.pace)
        scope = self._scope
        if scope is not None and due < scope.deadline:
            scope.deadline = max(due, self._not_before)

    async def run(self) -> None:
        self.running = True
        try:
            while True:
                heap = self._heap
                deadline = max(heap[0][0], self._not_before) if heap else math.inf
                with trio.CancelScope(deadline=deadline) as scope:
                    self._scope = scope
                    await trio.sleep_forever()
                self._scope = None
                now = self._last_wake = trio.current_time()
                self._not_before = now + self._write_due(now)
        finally:
            self.running = False
            self._scope = None
            for _, _, stream in self._heap:
                if not stream.closed:
                    stream.error = RuntimeError("fake model pacer stopped")
                    stream.wake.set()
            self._heap.clear()

    def _write_due(self, now: float) -> float:
        """Write what is due; return the gap to keep before the next wake-up."""
        heap = self._heap
        stamp = _stamp()
        gap = self.QUANTUM
        while heap and heap[0][0] <= now:
            stream = heapq.heappop(heap)[2]
            if stream.closed:
                continue
            ex = stream.ex
            data = ex.frame_body_chunk(stream.take_due(now, stamp))
            try:
                written = ex.try_send_raw(data)
            except Exception as exc:  # the peer is gone: the stream's task raises it
                stream.error = exc
                stream.wake.set()
                continue
            if written < len(data):
                stream.backlog = data[written:]
                stream.wake.set()
            elif stream.i < stream.n:
                heapq.heappush(heap, (stream.due(), next(self._seq), stream))
                if stream.pace < gap:
                    gap = stream.pace
            else:
                stream.wake.set()
        return gap


def main(argv: list[str] | None = None) -> None:
    run_main(FakeModel, argv, "Fake OpenAI-compatible model provider")


if __name__ == "__main__":
    main()
