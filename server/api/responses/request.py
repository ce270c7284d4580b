"""``POST /v1/responses``: the request, checked, and made into the chat request of its task.

The model side stays chat completions. ``input`` (a string, or items: messages with text
parts, the caller's function calls and their outputs) and ``instructions`` become the chat
messages; a ``previous_response_id`` puts the earlier response's conversation (its input and
output, and what came before it) in front. The tools map onto what Tether runs: ``web_search``
is Tether's web search, ``mcp`` a configured MCP server's tools, ``function`` the caller's
own functions, and ``tool_ids`` Tether's server tools, as on chat completions.

Everything a Response echoes (instructions, tools, metadata, the sampling parameters) and
the normalised input go on the task's record (``TaskRecord.response``), so that any replica
can answer ``GET /v1/responses/{id}`` and its ``input_items``. A parameter Tether cannot
honour is refused with a 400 naming it, never dropped.
"""

from __future__ import annotations

import secrets
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema

from server.config import McpHttpServer
from server.record import TaskRecord
from server.runtime import Runtime
from server.schemas import ChatRequest, RequestError, parse_chat_request

# OpenAI's parameters that Tether does not serve: named, so that the refusal says why.
_UNSUPPORTED = frozenset(
    {
        "conversation",
        "include",
        "prompt",
        "reasoning",
        "service_tier",
        "top_logprobs",
        "max_tool_calls",
        "prompt_cache_key",
        "prompt_cache_retention",
        "context_management",
    }
)
_WEB_SEARCH = frozenset(
    {"web_search", "web_search_preview", "web_search_2025_08_26", "web_search_preview_2025_03_11"}
)


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextFormat(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    description: str | None = None
    strict: bool | None = None


class TextConfig(_Strict):
    format: TextFormat | None = None
    verbosity: Literal["medium"] | None = None


class StreamOptions(_Strict):
    # Tether pads nothing: the obfuscation OpenAI adds to deltas is not served.
    include_obfuscation: Literal[False] | None = None


# What ``normalise_input`` and ``_tools`` accept, for /openapi.json (they check it by hand,
# to name the offending field as OpenAI does); the model takes any objects.
_TEXT_PART = {
    "type": "object",
    "properties": {
        "type": {"enum": ["input_text", "output_text"]},
        "text": {"type": "string"},
    },
    "required": ["type", "text"],
}
_CALL_ID = {"type": "string", "minLength": 1}
_INPUT_ITEM = {
    "oneOf": [
        {
            "type": "object",
            "title": "Message",
            "properties": {
                "type": {"const": "message"},
                "role": {"enum": ["user", "system", "developer", "assistant"]},
                "content": {"anyOf": [{"type": "string"}, {"type": "array", "items": _TEXT_PART}]},
                "id": {"type": "string"},
            },
            "required": ["role", "content"],
        },
        {
            "type": "object",
            "title": "FunctionCall",
            "properties": {
                "type": {"const": "function_call"},
                "call_id": _CALL_ID,
                "name": _CALL_ID,
                "arguments": _CALL_ID,
                "id": {"type": "string"},
            },
            "required": ["type", "call_id", "name", "arguments"],
        },
        {
            "type": "object",
            "title": "FunctionCallOutput",
            "properties": {
                "type": {"const": "function_call_output"},
                "call_id": _CALL_ID,
                "output": {"type": "string"},
                "id": {"type": "string"},
            },
            "required": ["type", "call_id", "output"],
        },
    ]
}
_TOOL = {
    "oneOf": [
        {
            "type": "object",
            "title": "WebSearchTool",
            "properties": {"type": {"enum": sorted(_WEB_SEARCH)}},
            "required": ["type"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "title": "FunctionTool",
            "properties": {
                "type": {"const": "function"},
                "name": {"type": "string", "minLength": 1},
                "description": {"type": "string"},
                "parameters": {"type": "object"},
                "strict": {"type": "boolean"},
            },
            "required": ["type", "name"],
            "additionalProperties": False,
        },
        {
            "type": "object",
            "title": "McpTool",
            "description": "A server of TETHER_MCP_CONFIG, by its label; run without approval.",
            "properties": {
                "type": {"const": "mcp"},
                "server_label": {"type": "string"},
                "server_url": {"type": "string"},
                "require_approval": {"const": "never"},
                "allowed_tools": {"type": "array", "items": {"type": "string"}},
                "server_description": {"type": "string"},
            },
            "required": ["type", "server_label", "require_approval"],
            "additionalProperties": False,
        },
    ]
}


class ResponseCreate(_Strict):
    """The body of ``POST /v1/responses`` (OpenAI's ``CreateResponse``, as Tether serves
    it), plus Tether's ``tool_ids``."""

    model: str | None = None
    input: Annotated[
        str | list[dict[str, Any]],
        WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "array", "items": _INPUT_ITEM}]}),
    ] = Field(default_factory=list)
    instructions: str | None = None
    background: bool = False
    stream: bool = False
    previous_response_id: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    tool_choice: Literal["none", "auto", "required"] | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    store: bool | None = None
    stream_options: StreamOptions | None = None
    text: TextConfig | None = None
    truncation: Literal["disabled"] | None = None
    user: str | None = None
    safety_identifier: str | None = Field(default=None, max_length=64)
    tools: Annotated[list[dict[str, Any]], WithJsonSchema({"type": "array", "items": _TOOL})] = (
        Field(default_factory=list)
    )
    tool_ids: list[str] = Field(default_factory=list)


def new_response_id() -> str:
    return "resp_" + secrets.token_hex(12)


def _bad(
    message: str, param: str, status: int = 400, code: str = "invalid_request"
) -> RequestError:
    return RequestError(status, code, message, param=param)


def parse_create(raw: Any) -> ResponseCreate:
    """Validate the body; a 400 naming the field."""
    if not isinstance(raw, dict):
        raise RequestError(400, "invalid_request", "The request body must be a JSON object.")
    for name in raw:
        if name in _UNSUPPORTED:
            raise _bad(f"Tether does not serve '{name}'.", name)
    try:
        return ResponseCreate.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(raw, first["loc"], missing=first["type"] == "missing") or None
        if first["type"] == "extra_forbidden":
            message = f"Unknown parameter: '{param}'."
        elif first["type"] == "missing":
            message = f"Missing required parameter: '{param}'."
        else:
            message = f"Invalid value for '{param}': {first['msg']}."
        raise RequestError(400, "invalid_request", message, param=param) from None


def _param(raw: Any, loc: tuple[int | str, ...], *, missing: bool) -> str:
    """The field a validation error is about, as OpenAI names it (``tools[0].type``): the
    error's location in the body, without the names pydantic adds for a union's members
    (``input.str``) or a validator."""
    param = ""
    node = raw
    for i, part in enumerate(loc):
        if isinstance(part, int) and isinstance(node, list) and part < len(node):
            param, node = f"{param}[{part}]", node[part]
        elif (
            isinstance(part, str)
            and isinstance(node, dict)
            and (part in node or (missing and i == len(loc) - 1))
        ):
            param, node = f"{param}.{part}" if param else part, node.get(part)
    return param


# -- input ---------------------------------------------------------------------------------


def normalise_input(value: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The input as items of the spec's shape, each with an id (``input_items`` lists
    them): messages with ``input_text`` parts (``output_text`` for an assistant's),
    ``function_call`` and ``function_call_output`` items."""
    if isinstance(value, str):
        value = [{"role": "user", "content": value}]
    items: list[dict[str, Any]] = []
    for i, raw in enumerate(value):
        where = f"input[{i}]"
        kind = raw.get("type", "message")
        if kind == "message":
            items.append(_message_item(raw, where))
        elif kind == "function_call":
            items.append(
                {
                    "id": _str(raw, "id", where, required=False) or _item_id("fc"),
                    "type": "function_call",
                    "call_id": _str(raw, "call_id", where),
                    "name": _str(raw, "name", where),
                    "arguments": _str(raw, "arguments", where),
                    "status": "completed",
                }
            )
        elif kind == "function_call_output":
            output = raw.get("output")
            if not isinstance(output, str):
                raise _bad("A function_call_output's output must be a string.", f"{where}.output")
            items.append(
                {
                    "id": _str(raw, "id", where, required=False) or _item_id("fco"),
                    "type": "function_call_output",
                    "call_id": _str(raw, "call_id", where),
                    "output": output,
                    "status": "completed",
                }
            )
        else:
            raise _bad(f"Input items of type {kind!r} are not served.", f"{where}.type")
    return items


def _str(raw: dict[str, Any], name: str, where: str, *, required: bool = True) -> str:
    value = raw.get(name)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value):
        raise _bad(f"'{name}' must be a non-empty string.", f"{where}.{name}")
    return value


def _item_id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def _message_item(raw: dict[str, Any], where: str) -> dict[str, Any]:
    role = raw.get("role")
    if role not in ("user", "system", "developer", "assistant"):
        raise _bad(
            "A message's role must be user, system, developer or assistant.", f"{where}.role"
        )
    text_type = "output_text" if role == "assistant" else "input_text"
    content = raw.get("content")
    parts: list[dict[str, Any]] = []
    if isinstance(content, str):
        parts.append({"type": text_type, "text": content})
    elif isinstance(content, list):
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind not in ("input_text", "output_text") or not isinstance(part.get("text"), str):
                raise _bad(
                    f"Content parts of type {kind!r} are not served: only text.",
                    f"{where}.content[{j}].type",
                )
            parts.append(
                {"type": text_type, "text": part["text"]}
                | ({"annotations": []} if text_type == "output_text" else {})
            )
    else:
        raise _bad("A message's content must be a string or a list of parts.", f"{where}.content")
    item: dict[str, Any] = {
        "id": raw.get("id") if isinstance(raw.get("id"), str) else _item_id("msg"),
        "type": "message",
        "role": role,
        "content": parts,
        "status": "completed",
    }
    return item


def chat_messages(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The chat messages of input or output items (consecutive function calls are one
    assistant message, as chat completions have them)."""
    messages: list[dict[str, Any]] = []
    for item in items:
        kind = item.get("type")
        if kind == "message":
            texts = [
                p.get("text", "")
                for p in item.get("content") or ()
                if p.get("type") in ("input_text", "output_text")
            ]
            messages.append({"role": item["role"], "content": "".join(texts)})
        elif kind == "function_call":
            call = {
                "id": item["call_id"],
                "type": "function",
                "function": {"name": item["name"], "arguments": item["arguments"]},
            }
            last = messages[-1] if messages else None
            if (
                last
                and last["role"] == "assistant"
                and last.get("tool_calls")
                and not last.get("content")
            ):
                last["tool_calls"].append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        elif kind == "function_call_output":
            messages.append(
                {"role": "tool", "tool_call_id": item["call_id"], "content": item["output"]}
            )
    return messages


# -- tools ---------------------------------------------------------------------------------


def _tools(
    rt: Runtime, tools: list[dict[str, Any]]
) -> tuple[bool, list[dict[str, Any]], list[str], list[dict[str, Any]]]:
    """Whether to search the web, the caller's functions (chat's shape), the server tools
    the MCP tools name, and the MCP servers' tool lists (``mcp_list_tools`` items)."""
    web_search = False
    functions: list[dict[str, Any]] = []
    tool_ids: list[str] = []
    lists: list[dict[str, Any]] = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        kind = tool.get("type")
        if isinstance(kind, str) and kind in _WEB_SEARCH:
            extra = sorted(set(tool) - {"type"})
            if extra:
                raise _bad(f"Tether's web search takes no '{extra[0]}'.", f"{where}.{extra[0]}")
            web_search = True
        elif kind == "function":
            name = tool.get("name")
            if not isinstance(name, str) or not name:
                raise _bad("A function tool needs a name.", f"{where}.name")
            extra = sorted(set(tool) - {"type", "name", "description", "parameters", "strict"})
            if extra:
                raise _bad(f"Unknown field '{extra[0]}' of a function tool.", f"{where}.{extra[0]}")
            function = {
                k: tool[k]
                for k in ("name", "description", "parameters", "strict")
                if tool.get(k) is not None
            }
            functions.append({"type": "function", "function": function})
        elif kind == "mcp":
            ids, listed = _mcp_tool(rt, tool, where)
            tool_ids += ids
            lists.append(listed)
        else:
            raise _bad(f"Tools of type {kind!r} are not served.", f"{where}.type")
    return web_search, functions, tool_ids, lists


def _echoed_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool as the Response echoes it: a function tool with its ``parameters`` and
    ``strict`` (the spec's Response requires both, null where the request left them out)."""
    if tool.get("type") != "function":
        return tool
    return {"parameters": None, "strict": None} | tool


def _mcp_tool(rt: Runtime, tool: dict[str, Any], where: str) -> tuple[list[str], dict[str, Any]]:
    label = tool.get("server_label")
    connection = rt.mcp.connections.get(label) if rt.mcp and isinstance(label, str) else None
    if connection is None:
        raise _bad(
            f"No MCP server {label!r} is configured on this server (TETHER_MCP_CONFIG).",
            f"{where}.server_label",
        )
    url = tool.get("server_url")
    if url is not None and not (
        isinstance(connection.config, McpHttpServer) and connection.config.url == url
    ):
        # Never fetched: only the configured servers are reached.
        raise _bad(f"The server_url is not the configured one of {label!r}.", f"{where}.server_url")
    if tool.get("require_approval") != "never":
        raise _bad(
            "Tether runs MCP tools without approval: require_approval must be 'never'.",
            f"{where}.require_approval",
        )
    extra = sorted(
        set(tool)
        - {
            "type",
            "server_label",
            "server_url",
            "require_approval",
            "allowed_tools",
            "server_description",
        }
    )
    if extra:
        raise _bad(f"Tether does not serve '{extra[0]}' of an MCP tool.", f"{where}.{extra[0]}")
    allowed = tool.get("allowed_tools")
    if isinstance(allowed, dict):
        allowed = allowed.get("tool_names")
    if allowed is not None and not (
        isinstance(allowed, list) and all(isinstance(n, str) for n in allowed)
    ):
        raise _bad("allowed_tools must be a list of tool names.", f"{where}.allowed_tools")
    ids: list[str] = []
    listed: list[dict[str, Any]] = []
    for tool_id, server_tool in rt.tools.items():
        spec = server_tool.spec
        if spec.server != label or (allowed is not None and spec.remote_name not in allowed):
            continue
        ids.append(tool_id)
        listed.append(
            {
                "name": spec.remote_name,
                "description": spec.description,
                "input_schema": spec.parameters,
            }
        )
    return ids, {"type": "mcp_list_tools", "server_label": label, "tools": listed}


def _tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    if choice is None or isinstance(choice, str):
        return choice
    if choice.get("type") == "function" and isinstance(choice.get("name"), str):
        return {"type": "function", "function": {"name": choice["name"]}}
    raise _bad("tool_choice may be none, auto, required or a function by name.", "tool_choice")


def _response_format(text: TextConfig | None) -> dict[str, Any] | None:
    fmt = text.format if text else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "json_object"}
    if not fmt.name or fmt.schema_ is None:
        raise _bad("A json_schema format needs a name and a schema.", "text.format")
    schema: dict[str, Any] = {"name": fmt.name, "schema": fmt.schema_}
    if fmt.strict is not None:
        schema["strict"] = fmt.strict
    if fmt.description is not None:
        schema["description"] = fmt.description
    return {"type": "json_schema", "json_schema": schema}


# -- the task --------------------------------------------------------------------------------


def conversation(previous: TaskRecord, output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The items a later response continues from: the earlier one's own history, its
    input and its output (the answer and the function calls; not the search or MCP
    steps, whose results are in the answer)."""
    meta = previous.response or {}
    kept = [i for i in output if i.get("type") in ("message", "function_call")]
    return [*meta.get("history", ()), *meta.get("input", ()), *kept]


def build_chat(
    rt: Runtime,
    body: ResponseCreate,
    history: list[dict[str, Any]],
    *,
    previous_response_id: str | None,
) -> ChatRequest:
    """The chat request of the response's task, with the Response's own fields on it."""
    items = normalise_input(body.input)
    web_search, functions, mcp_ids, mcp_lists = _tools(rt, body.tools)
    messages = chat_messages([*history, *items])
    if body.instructions:
        messages.insert(0, {"role": "system", "content": body.instructions})
    if not messages:
        raise _bad("The input is empty.", "input")
    chat_body: dict[str, Any] = {
        "messages": messages,
        "stream": body.stream,
        "background": body.background,
        "features": {"web_search": web_search},
        "tool_ids": [*body.tool_ids, *mcp_ids],
    }
    optional = {
        "model": body.model,
        "max_tokens": body.max_output_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "parallel_tool_calls": body.parallel_tool_calls,
        "user": body.user,
        "tool_choice": _tool_choice(body.tool_choice),
        "response_format": _response_format(body.text),
        "tools": functions or None,
    }
    chat_body.update({k: v for k, v in optional.items() if v is not None})
    chat = parse_chat_request(chat_body, default_model=rt.settings.default_model)
    unknown = [t for t in chat.tool_ids if t not in rt.tools]
    if unknown:
        raise _bad(f"Unknown tool_ids: {', '.join(unknown)}.", "tool_ids")
    if rt.models.resolve(chat.model) is None:
        raise RequestError(
            404, "model_not_found", f"The model {chat.model!r} does not exist.", param="model"
        )
    chat.response = {
        "input": items,
        "history": history,
        "instructions": body.instructions,
        "tools": [_echoed_tool(tool) for tool in body.tools],
        "tool_choice": body.tool_choice or "auto",
        "parallel_tool_calls": True
        if body.parallel_tool_calls is None
        else body.parallel_tool_calls,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "max_output_tokens": body.max_output_tokens,
        "metadata": body.metadata or {},
        "previous_response_id": previous_response_id,
        "background": body.background,
        "store": True if body.store is None else body.store,
        "text": body.text.model_dump(by_alias=True, exclude_none=True)
        if body.text
        else {"format": {"type": "text"}},
        "truncation": body.truncation or "disabled",
        "user": body.user,
        "safety_identifier": body.safety_identifier,
        "mcp_lists": mcp_lists,
    }
    return chat
