"""``run_chat``: the payload phase (web search, server tools) and the response phase."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from server.config import Settings
from server.pipeline.emit import Emitter
from server.pipeline.generation import generate
from server.pipeline.web_search import inject_sources, run_web_search
from server.providers.llm.router import ModelRouter
from server.providers.search.base import SearchProvider
from server.providers.tools.base import Tool
from server.providers.web.base import PageReader
from server.schemas import ChatRequest, TaskFailure


class ChatPipeline:
    def __init__(
        self,
        settings: Settings,
        models: ModelRouter,
        search: SearchProvider,
        tools: Mapping[str, Tool],
        pages: PageReader,
    ) -> None:
        self.settings = settings
        self.models = models
        self.search = search
        self.tools = tools
        self.pages = pages

    async def run_chat(self, request: ChatRequest, emit: Emitter) -> None:
        """Run one chat request to its end, reporting through ``emit``.

        Raises ``TaskFailure`` when the model fails. Cancelling it (a stop, a disconnect)
        cancels the search, page fetches, tool calls and model stream in flight and closes
        their connections; what was generated so far is already on the task.
        """
        model = self.models.resolve(request.model)
        if model is None:
            raise TaskFailure("model_not_found", f"The model {request.model!r} does not exist.")
        messages = list(request.messages)
        if request.web_search:
            await emit.set_phase("web_search")
            query_model_id = self.settings.query_model or request.model
            sources = await run_web_search(
                request,
                emit,
                settings=self.settings,
                search=self.search,
                pages=self.pages,
                query_model=self.models.resolve(query_model_id),
                query_model_id=query_model_id,
                deadline_s=request.deadlines.get("web_search_s", self.settings.search_timeout_s),
            )
            if sources:
                messages = inject_sources(messages, sources)
        # By the name the model calls each by (an MCP tool's id is not a function name). A
        # tool whose MCP server dropped it since admission is not offered.
        server_tools = {
            tool.spec.name: tool
            for tool in (self.tools.get(tool_id) for tool_id in request.tool_ids)
            if tool
        }
        body: dict[str, Any] = {**request.passthrough, "model": request.model, "messages": messages}
        if server_tools:
            declared = list(body.get("tools") or [])
            body["tools"] = declared + [t.spec.openai_schema() for t in server_tools.values()]
        await generate(
            model,
            body,
            emit,
            tools=server_tools,
            max_rounds=self.settings.max_tool_rounds,
            tool_timeout_s=request.deadlines.get("tools_s", self.settings.tool_timeout_s),
        )
