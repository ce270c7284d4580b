"""The response phase, with the server-side tool loop (OpenAI function calling).

Each round streams the model's answer. Content is emitted as ``delta`` events as it comes,
so the task holds the partial answer at every moment. When the model asks for server tools
instead, they run side by side in a nursery, each under its own timeout, their results are
appended, and the model is called again, up to ``max_tool_rounds`` rounds. Tool calls for
tools the client declared itself (``tools`` without ``tool_ids``) are not run: they end the
task and go back to the client, as OpenAI does.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import trio
from opentelemetry.trace import Span

from server import tracing
from server.events import DeltaData, StatusData
from server.pipeline.emit import Emitter
from server.pipeline.usage import UsageMeter
from server.providers.llm.base import ModelDelta, ModelError, ModelProvider
from server.providers.tools.base import ProgressReporter, Tool, ToolError, ToolProgress, ToolSpec
from server.schemas import TaskFailure


@dataclass
class _PendingCall:
    id: str = ""
    name: str = ""
    arguments: str = ""

    def openai(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass
class RoundResult:
    tool_calls: list[_PendingCall] = field(default_factory=list)
    finish_reason: str | None = None
    # With n > 1: why each choice after the first ended, by index.
    other_finish_reasons: dict[int, str] = field(default_factory=dict)


async def stream_round(
    model: ModelProvider, body: dict[str, Any], emit: Emitter, usage: UsageMeter
) -> RoundResult:
    """One model call: emit content deltas, assemble tool calls, count the round's usage
    on ``usage`` (begun here; the caller ends it).

    Cancelling it closes the model connection; the content emitted so far stays on the task,
    and ``usage`` holds what the round streamed until then.
    """
    calls: dict[int, _PendingCall] = {}
    result = RoundResult()
    usage.begin_round(body["messages"])
    # Traced: the span of this model call, until its first delta marks it (one check per
    # delta; nothing when untraced).
    awaiting_first: Span | None = None

    async def on_delta(delta: ModelDelta) -> None:
        nonlocal awaiting_first
        if awaiting_first is not None:
            awaiting_first.add_event("first_token")
            awaiting_first = None
        if delta.content or delta.reasoning or delta.logprobs:
            data: DeltaData = {"content": delta.content}
            if delta.reasoning:
                data["reasoning"] = delta.reasoning
            if delta.index:
                data["index"] = delta.index
            if delta.logprobs:
                data["logprobs"] = delta.logprobs
            await emit.delta(data)
        # Counted once on the task (after the emit), so that a stopped answer's count
        # matches its content.
        if delta.content or delta.reasoning or delta.tool_calls:
            usage.count_chunks(delta.chunks)
        if delta.index:
            # Another choice (n > 1): its text is kept, but only choice 0 acts (its tool
            # calls run, its finish reason is the task's).
            if delta.finish_reason:
                result.other_finish_reasons[delta.index] = delta.finish_reason
            if delta.usage:
                usage.report(delta.usage)
            return
        for piece in delta.tool_calls:
            call = calls.setdefault(piece.index, _PendingCall())
            call.id = piece.id or call.id
            call.name = piece.name or call.name
            call.arguments += piece.arguments
        if delta.finish_reason:
            result.finish_reason = delta.finish_reason
        if delta.usage:
            usage.report(delta.usage)

    try:
        with tracing.span("llm.stream", {"gen_ai.request.model": str(body["model"])}) as span:
            awaiting_first = span
            await model.stream_chat(body, on_delta)
    except ModelError as exc:
        if not usage.round_answered:
            usage.drop_round()
        status = f" (upstream status {exc.status})" if exc.status else ""
        raise TaskFailure("upstream_error", exc.message + status) from None
    result.tool_calls = [calls[i] for i in sorted(calls)]
    for i, call in enumerate(result.tool_calls):
        call.id = call.id or f"call_{i}"
    return result


async def run_tool_call(
    tool: Tool, call: _PendingCall, timeout: float, progress: ProgressReporter | None = None
) -> tuple[str, bool]:
    """Run one tool call; returns (result text for the model, whether it failed).

    A tool that raises, times out or gets bad arguments gives the model an error result.
    ``progress`` gets the tool's progress reports. Cancelling it (the task stopped) cancels
    the tool and closes its connections.
    """
    try:
        arguments = json.loads(call.arguments or "{}")
        if not isinstance(arguments, dict):
            raise ValueError("arguments must be a JSON object")
    except ValueError as exc:
        return f"Error: invalid arguments for {call.name}: {exc}", True
    try:
        with trio.fail_after(timeout):
            return await tool.run(arguments, progress), False
    except trio.TooSlowError:
        return f"Error: {call.name} timed out after {timeout:g} s", True
    except ToolError as exc:
        return f"Error: {exc}", True
    except Exception as exc:  # a tool's bug must not end the task
        return f"Error: {call.name} failed ({type(exc).__name__})", True


async def generate(
    model: ModelProvider,
    body: dict[str, Any],
    emit: Emitter,
    *,
    tools: Mapping[str, Tool],
    max_rounds: int,
    tool_timeout_s: float,
) -> None:
    """Stream the answer, running server tools between rounds. Raises ``TaskFailure`` on a
    model failure; cancelling it closes whatever model or tool connection is open.

    However it ends, the task is left with the usage of the rounds so far (see ``usage``).
    """
    usage = UsageMeter()
    try:
        await _rounds(
            model,
            body,
            emit,
            usage,
            tools=tools,
            max_rounds=max_rounds,
            tool_timeout_s=tool_timeout_s,
        )
    finally:
        # Stopped or failed mid-answer: no await here (the task may be cancelled); the
        # terminal event, written after the pipeline, carries it.
        emit.keep_usage(usage.so_far())


async def _rounds(
    model: ModelProvider,
    body: dict[str, Any],
    emit: Emitter,
    usage: UsageMeter,
    *,
    tools: Mapping[str, Tool],
    max_rounds: int,
    tool_timeout_s: float,
) -> None:
    messages = list(body["messages"])
    for round_number in range(max_rounds + 1):
        round_body = {**body, "messages": messages}
        if tools and round_number == max_rounds:
            # Out of rounds: the model must answer with what it has.
            round_body["tool_choice"] = "none"
        await emit.set_phase("generating")
        result = await stream_round(model, round_body, emit, usage)
        usage.end_round()
        server_calls = [c for c in result.tool_calls if c.name in tools]
        client_calls = [c for c in result.tool_calls if c.name not in tools]
        if client_calls:
            openai_calls = [c.openai() for c in client_calls]
            await emit.delta({"content": "", "tool_calls": openai_calls})
            await emit.set_result(
                usage=usage.so_far(), finish_reason="tool_calls", tool_calls=openai_calls
            )
            return
        if not server_calls or round_number == max_rounds:
            await emit.set_result(
                usage=usage.so_far(),
                finish_reason=result.finish_reason or "stop",
                other_finish_reasons=result.other_finish_reasons,
            )
            return
        await emit.set_phase("tools")
        outputs = await _run_tools(server_calls, tools, emit, tool_timeout_s)
        messages.append(
            {"role": "assistant", "content": None, "tool_calls": [c.openai() for c in server_calls]}
        )
        for call, output in zip(server_calls, outputs, strict=True):
            messages.append({"role": "tool", "tool_call_id": call.id, "content": output})


def _tool_status(spec: ToolSpec, call: _PendingCall, description: str, *, done: bool) -> StatusData:
    """A tool call's status: the name the model called, the call's id, and for an MCP
    tool its id, its server and its name there."""
    status: StatusData = {
        "phase": "tools",
        "action": "tool_call",
        "description": description,
        "done": done,
        "tool": call.name,
        "tool_call_id": call.id,
        "step": call.id,
    }
    if spec.server is not None:
        status["tool_id"] = spec.tool_id
        status["mcp_server"] = spec.server
        status["mcp_tool"] = spec.remote_name or spec.name
    return status


def _tool_attributes(spec: ToolSpec, call: _PendingCall) -> tracing.Attributes:
    """A tool call's span attributes: the name the model called, and for an MCP tool its
    server and its name there."""
    attributes = {"tether.tool": call.name, "tether.tool_call_id": call.id}
    if spec.server is not None:
        attributes["mcp.server"] = spec.server
        attributes["mcp.tool"] = spec.remote_name or spec.name
    return attributes


def _tool_details(spec: ToolSpec) -> dict[str, Any]:
    """What the task's record keeps of a server tool call besides OpenAI's fields."""
    if spec.server is None:
        return {}
    return {"tool_id": spec.tool_id, "mcp_server": spec.server, "mcp_tool": spec.remote_name}


def _tool_title(spec: ToolSpec) -> str:
    if spec.server is None:
        return spec.name
    return f"{spec.remote_name} on MCP server {spec.server}"


async def _run_tools(
    calls: list[_PendingCall], tools: Mapping[str, Tool], emit: Emitter, timeout: float
) -> list[str]:
    outputs = [""] * len(calls)

    async def one(i: int, call: _PendingCall) -> None:
        tool = tools[call.name]
        title = _tool_title(tool.spec)
        start = _tool_status(tool.spec, call, f"Calling {title}", done=False)
        start["arguments"] = call.arguments
        await emit.status(start)

        async def report(progress: ToolProgress) -> None:
            status = _tool_status(
                tool.spec, call, f"{title}: {progress.message or _fraction(progress)}", done=False
            )
            status["progress"] = progress.progress
            if progress.total is not None:
                status["total"] = progress.total
            await emit.status(status)

        started = time.monotonic()
        output, failed = "", False
        # The call is a step: a skip, or the tools' deadline, ends it with a result that
        # says so, and the model goes on with it.
        with emit.step(
            call.id, "tool", deadline_s=timeout, attributes=_tool_attributes(tool.spec, call)
        ) as step:
            output, failed = await run_tool_call(tool, call, math.inf, report)
        outcome = "failed" if failed else "done"
        if step.cut == "skipped":
            output, outcome = f"The user skipped this call of {call.name}: no result.", "skipped"
        elif step.cut == "deadline":
            output = f"Error: {call.name} timed out after {timeout:g} s"
            outcome = "out of time"
        outputs[i] = output
        end = _tool_status(tool.spec, call, f"{title} {outcome}", done=True)
        end["result"] = output[:2000]
        end["duration_s"] = round(time.monotonic() - started, 4)
        if failed:
            end["error"] = True
        if step.cut == "skipped":
            end["skipped"] = True
            if step.skipped_by is not None:
                end["by"] = step.skipped_by
        elif step.cut == "deadline":
            end["deadline"] = True
        await emit.set_result(
            tool_calls=[
                {
                    **call.openai(),
                    "result": output[:2000],
                    "server": True,
                    **_tool_details(tool.spec),
                }
            ]
        )
        await emit.status(end)

    async with trio.open_nursery() as nursery:
        for i, call in enumerate(calls):
            nursery.start_soon(one, i, call)
    return outputs


def _fraction(progress: ToolProgress) -> str:
    if progress.total:
        return f"{progress.progress:g} of {progress.total:g}"
    return f"{progress.progress:g}"
