"""The web-search step of the payload phase.

Queries are generated (by the model when query generation is on, else the last user
message), run against the search provider side by side, and the top result pages are
fetched side by side, each with its own timeout and size cap. A failing query or page is
reported as a ``status`` event with ``error: true`` and the task goes on without it. All of
it runs in nurseries inside the task's cancel scope, so one stop closes every connection.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

import trio

from server import tracing
from server.config import Settings
from server.events import SourceData, StatusData
from server.pipeline.emit import Emitter, StepHandle
from server.prompt_markers import QUERY_PROMPT_MARKER, SOURCES_CLOSE, SOURCES_OPEN
from server.providers.llm.base import ModelDelta, ModelError, ModelProvider
from server.providers.search.base import SearchError, SearchProvider, SearchResult
from server.providers.web.base import PageError, PageReader
from server.schemas import ChatRequest


@dataclass
class Source:
    index: int
    url: str
    title: str
    snippet: str
    text: str

    def event_data(self) -> SourceData:
        return {"index": self.index, "url": self.url, "title": self.title, "snippet": self.snippet}


def _status(
    action: Literal["queries", "search", "fetch"],
    description: str,
    *,
    done: bool,
    error: bool = False,
    queries: list[str] | None = None,
    query: str | None = None,
    count: int | None = None,
    urls: list[str] | None = None,
    url: str | None = None,
    step: str = "web_search",
) -> StatusData:
    status: StatusData = {
        "phase": "web_search",
        "action": action,
        "description": description,
        "done": done,
        "step": step,
    }
    if error:
        status["error"] = True
    if queries is not None:
        status["queries"] = queries
    if query is not None:
        status["query"] = query
    if count is not None:
        status["count"] = count
    if urls is not None:
        status["urls"] = urls
    if url is not None:
        status["url"] = url
    return status


async def generate_queries(
    request: ChatRequest,
    model: ModelProvider | None,
    model_id: str,
    emit: Emitter,
    max_queries: int,
) -> list[str]:
    """Ask the model for search queries; fall back to the last user message.

    Cancelling it closes the connection to the model.
    """
    question = request.last_user_text().strip()
    if model is None or not question:
        return [question] if question else []
    prompt = (
        f"{QUERY_PROMPT_MARKER}\n"
        "Write up to 3 short web search queries that would find the information needed to "
        'answer the question. Answer only with JSON: {"queries": ["..."]}.\n'
        f"Question: {question}"
    )
    pieces: list[str] = []

    async def collect(delta: ModelDelta) -> None:
        pieces.append(delta.content)

    body = {"model": model_id, "messages": [{"role": "user", "content": prompt}], "temperature": 0}
    try:
        await model.stream_chat(body, collect)
    except ModelError as exc:
        await emit.status(
            _status("queries", f"Query generation failed: {exc.message}", done=True, error=True)
        )
        return [question]
    queries = parse_queries("".join(pieces))[:max_queries]
    return queries or [question]


def parse_queries(text: str) -> list[str]:
    """The ``queries`` list from a model's JSON answer, tolerating text around the JSON."""
    start, end = text.find("{"), text.rfind("}")
    if start < 0 or end <= start:
        return []
    try:
        value = json.loads(text[start : end + 1])
    except ValueError:
        return []
    queries = value.get("queries") if isinstance(value, dict) else None
    if not isinstance(queries, list):
        return []
    return [q.strip() for q in queries if isinstance(q, str) and q.strip()]


@dataclass
class _Found:
    """What the search phase has found so far: a skip or the phase's deadline may end it
    at any point, and the answer is made of what is here then."""

    per_query: dict[int, list[SearchResult]] = field(default_factory=dict)
    results: list[SearchResult] | None = None
    texts: dict[int, str] = field(default_factory=dict)
    left_out: set[int] = field(default_factory=set)


async def run_web_search(
    request: ChatRequest,
    emit: Emitter,
    *,
    settings: Settings,
    search: SearchProvider,
    pages: PageReader,
    query_model: ModelProvider | None,
    query_model_id: str,
    deadline_s: float | None = None,
) -> list[Source]:
    """Search, read the top pages, emit ``status`` and ``source`` events; return the sources.

    The phase is the step ``web_search`` and each page read the step ``page:<url>``: a skip
    of the phase, or its deadline (``deadline_s``), ends it with the sources found so far;
    a skipped page is left out of them. Cancelling it (a stop) closes every search and page
    connection in flight.
    """
    found = _Found()
    with emit.step("web_search", "web_search", deadline_s=deadline_s) as phase:
        await _search(request, emit, found, settings, search, pages, query_model, query_model_id)
    results = found.results
    if results is None:
        results = _merge(found.per_query, settings.search_result_count)
    kept = [(i, r) for i, r in enumerate(results) if i not in found.left_out]
    if phase.cut is not None:
        status = _status(
            "search",
            f"Web search {'skipped' if phase.cut == 'skipped' else 'out of time'}: "
            f"answering from {len(kept)} sources found",
            done=True,
            count=len(kept),
        )
        _mark_cut(status, phase)
        await emit.status(status)
    sources: list[Source] = []
    for i, result in kept:
        text = result.content if result.content is not None else found.texts.get(i, result.snippet)
        source = Source(
            len(sources) + 1,
            result.url,
            result.title,
            result.snippet,
            (text or "")[: settings.page_max_chars],
        )
        sources.append(source)
        await emit.source(source.event_data())
    return sources


def _mark_cut(status: StatusData, step: StepHandle) -> None:
    """Say on a step's closing status why it ended early."""
    if step.cut == "skipped":
        status["skipped"] = True
        if step.skipped_by is not None:
            status["by"] = step.skipped_by
    elif step.cut == "deadline":
        status["deadline"] = True


async def _search(
    request: ChatRequest,
    emit: Emitter,
    found: _Found,
    settings: Settings,
    search: SearchProvider,
    pages: PageReader,
    query_model: ModelProvider | None,
    query_model_id: str,
) -> None:
    await emit.status(_status("queries", "Generating search queries", done=False))
    with tracing.span("search.queries", {"tether.query_model": query_model_id}) as span:
        queries = await generate_queries(
            request,
            query_model if settings.search_query_generation else None,
            query_model_id,
            emit,
            settings.search_max_queries,
        )
        if span is not None:
            span.set_attribute("tether.queries", len(queries))
    if not queries:
        await emit.status(_status("queries", "Nothing to search for", done=True))
        found.results = []
        return
    await emit.status(
        _status("search", "Searching: " + "; ".join(queries), done=False, queries=queries)
    )

    async def one_query(i: int, query: str) -> None:
        try:
            with tracing.span("search", {"tether.query": query}):
                found.per_query[i] = await search.search(query, settings.search_result_count)
        except SearchError as exc:
            await emit.status(
                _status(
                    "search",
                    f"Search failed for {query!r}: {exc}",
                    done=True,
                    error=True,
                    query=query,
                )
            )

    async with trio.open_nursery() as nursery:
        for i, query in enumerate(queries):
            nursery.start_soon(one_query, i, query)

    results = found.results = _merge(found.per_query, settings.search_result_count)
    await emit.status(
        _status(
            "search",
            f"Found {len(results)} results",
            done=True,
            count=len(results),
            urls=[r.url for r in results],
        )
    )
    to_fetch = [
        (i, r) for i, r in enumerate(results) if r.content is None and settings.search_fetch_pages
    ]
    if not to_fetch:
        return
    await emit.status(
        _status(
            "fetch",
            f"Reading {len(to_fetch)} pages",
            done=False,
            urls=[r.url for _, r in to_fetch],
        )
    )

    async def one_page(i: int, result: SearchResult) -> None:
        step_id = "page:" + result.url
        with emit.step(step_id, "page", attributes={"url.full": result.url}) as page_step:
            try:
                page = await pages.read(result.url)
            except PageError as exc:
                await emit.status(
                    _status(
                        "fetch",
                        f"Could not read {result.url}: {exc}",
                        done=True,
                        error=True,
                        url=result.url,
                        step=step_id,
                    )
                )
                return
            found.texts[i] = page.text
            await emit.status(
                _status("fetch", f"Read {result.url}", done=True, url=result.url, step=step_id)
            )
        if page_step.cut is not None:
            found.left_out.add(i)
            found.texts.pop(i, None)
            status = _status(
                "fetch", f"Skipped {result.url}", done=True, url=result.url, step=step_id
            )
            _mark_cut(status, page_step)
            await emit.status(status)

    async with trio.open_nursery() as nursery:
        for i, result in to_fetch:
            nursery.start_soon(one_page, i, result)
    await emit.status(
        _status("fetch", f"Read {len(found.texts)} of {len(to_fetch)} pages", done=True)
    )


def _merge(per_query: dict[int, list[SearchResult]], limit: int) -> list[SearchResult]:
    """Round-robin over the queries' results, without duplicate URLs, up to ``limit``."""
    seen: set[str] = set()
    merged: list[SearchResult] = []
    lists = [per_query[i] for i in sorted(per_query)]
    depth = max((len(rs) for rs in lists), default=0)
    for rank in range(depth):
        for rs in lists:
            if rank < len(rs) and rs[rank].url not in seen and len(merged) < limit:
                seen.add(rs[rank].url)
                merged.append(rs[rank])
    return merged


def inject_sources(messages: list[dict[str, Any]], sources: list[Source]) -> list[dict[str, Any]]:
    """Put the sources in a system message just before the last user message."""
    blocks = [f"[{s.index}] {s.title} ({s.url})\n{s.text.strip()}" for s in sources]
    context = (
        "Answer the user's question using these web sources. Cite a source by its number "
        "in brackets, like [1].\n"
        f"{SOURCES_OPEN}\n" + "\n\n".join(blocks) + f"\n{SOURCES_CLOSE}"
    )
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=0)
    return [*messages[:last_user], {"role": "system", "content": context}, *messages[last_user:]]
