"""Fake web search backends: SearXNG, Brave and Tavily on one server.

* SearXNG: ``GET /search?q=...&format=json`` (also form-encoded ``POST /search``)
  -> ``{"query", "results": [{"url", "title", "content"}], ...}``
* Brave: ``GET /res/v1/web/search?q=...`` with ``X-Subscription-Token``
  -> ``{"web": {"results": [{"url", "title", "description"}]}}``
* Tavily: ``POST /search`` JSON ``{"query", "max_results", "api_key"}`` (or
  ``Authorization: Bearer``) -> ``{"results": [{"url", "title", "content"}]}``

All share the settings ``delay``, ``mode`` ("ok" | "500" | "bad_json" | "hang"),
``results`` (fixed list or None = generated), ``num_results``, ``page_base_url``
(where generated result URLs point; None = this server) and ``api_key`` (None =
any non-empty key accepted by Brave/Tavily).
"""

from __future__ import annotations

import urllib.parse
from typing import Any, ClassVar

import trio

from .base import Exchange, FakeServer, run_main

__all__ = ["FakeSearxng", "main"]

MODES = ("ok", "500", "bad_json", "hang")


class FakeSearxng(FakeServer):
    SETTING_NAMES: ClassVar[tuple[str, ...]] = (
        "delay",
        "mode",
        "results",
        "num_results",
        "page_base_url",
        "api_key",
    )

    delay: float
    mode: str
    results: list[dict[str, Any]] | None
    num_results: int
    page_base_url: str | None
    api_key: str | None

    def _reset_settings(self) -> None:
        self.delay = 0.0
        self.mode = "ok"
        self.results = None
        self.num_results = 5
        self.page_base_url = None
        self.api_key = None

    def _apply_setting(self, key: str, value: Any) -> None:
        if key == "mode":
            value = str(value)
            if value not in MODES:
                raise ValueError(f"mode must be one of {MODES}")
        elif key == "delay":
            value = float(value)
        elif key == "num_results":
            value = int(value)
        super()._apply_setting(key, value)

    @property
    def queries(self) -> list[str]:
        """Every query received (all three flavours), in order."""
        out: list[str] = []
        for r in self.requests:
            q = r.meta.get("query")
            if isinstance(q, str):
                out.append(q)
        return out

    def make_results(self, query: str, limit: int | None = None) -> list[dict[str, Any]]:
        """The results for ``query``: ``results`` if set, else generated ones."""
        if self.results is not None:
            items = [dict(r) for r in self.results]
        else:
            base = (self.page_base_url or self.base_url).rstrip("/")
            qs = urllib.parse.quote(query)
            items = [
                {
                    "url": f"{base}/page/{i}?q={qs}",
                    "title": f"Result {i} for {query}",
                    "content": f"Snippet {i}: a short passage about {query} from fake page {i}.",
                }
                for i in range(1, self.num_results + 1)
            ]
        if limit is not None:
            items = items[:limit]
        return items

    async def _gate(self, ex: Exchange) -> bool:
        """Apply delay/mode; returns True if the caller should send results."""
        await trio.sleep(self.delay)
        if self.mode == "hang":
            await trio.sleep_forever()
        if self.mode == "500":
            await ex.respond_json({"error": "fake search failure"}, 500)
            return False
        if self.mode == "bad_json":
            await ex.respond(200, b'{"results": [ this is not json', "application/json")
            return False
        return True

    def _key_ok(self, key: str) -> bool:
        if self.api_key is None:
            return bool(key)
        return key == self.api_key

    async def handle(self, ex: Exchange) -> None:
        req = ex.request
        if req.path == "/search" and req.method == "POST" and isinstance(req.json_body, dict):
            await self._tavily(ex, req.json_body)
        elif req.path == "/search" and req.method in ("GET", "POST"):
            params = dict(req.query)
            if req.method == "POST":
                form = urllib.parse.parse_qs(req.text, keep_blank_values=True)
                params.update({k: v[-1] for k, v in form.items()})
            await self._searxng(ex, params)
        elif req.path == "/res/v1/web/search" and req.method == "GET":
            await self._brave(ex)
        else:
            await ex.respond_json({"error": f"no route {req.method} {req.path}"}, 404)

    async def _searxng(self, ex: Exchange, params: dict[str, str]) -> None:
        query = params.get("q", "")
        ex.request.meta["query"] = query
        ex.request.meta["flavour"] = "searxng"
        self._notify()
        if not await self._gate(ex):
            return
        results = [
            {**r, "engine": "fake", "engines": ["fake"], "score": 1.0 / (i + 1)}
            for i, r in enumerate(self.make_results(query))
        ]
        await ex.respond_json(
            {
                "query": query,
                "number_of_results": len(results),
                "results": results,
                "answers": [],
                "corrections": [],
                "infoboxes": [],
                "suggestions": [],
                "unresponsive_engines": [],
            }
        )

    async def _brave(self, ex: Exchange) -> None:
        req = ex.request
        query = req.query.get("q", "")
        req.meta["query"] = query
        req.meta["flavour"] = "brave"
        self._notify()
        if not self._key_ok(req.headers.get("x-subscription-token", "")):
            await ex.respond_json({"type": "ErrorResponse", "error": {"code": "UNAUTHORIZED"}}, 401)
            return
        if not await self._gate(ex):
            return
        count = req.query.get("count")
        limit = int(count) if count and count.isdigit() else None
        results = [
            {
                "url": r.get("url", ""),
                "title": r.get("title", ""),
                "description": r.get("description", r.get("content", "")),
                "type": "search_result",
            }
            for r in self.make_results(query, limit)
        ]
        await ex.respond_json(
            {
                "type": "search",
                "query": {"original": query},
                "web": {"type": "search", "results": results},
            }
        )

    async def _tavily(self, ex: Exchange, body: dict[str, Any]) -> None:
        req = ex.request
        query = str(body.get("query", ""))
        req.meta["query"] = query
        req.meta["flavour"] = "tavily"
        self._notify()
        key = str(body.get("api_key") or "")
        auth = req.headers.get("authorization", "")
        if not key and auth.lower().startswith("bearer "):
            key = auth[7:].strip()
        if not self._key_ok(key):
            await ex.respond_json(
                {"detail": {"error": "Unauthorized: missing or invalid API key"}}, 401
            )
            return
        if not await self._gate(ex):
            return
        max_results = body.get("max_results", 5)
        limit = int(max_results) if isinstance(max_results, int | float | str) else 5
        results = [
            {
                "url": r.get("url", ""),
                "title": r.get("title", ""),
                "content": r.get("content", r.get("description", "")),
                "score": round(1.0 / (i + 1), 4),
            }
            for i, r in enumerate(self.make_results(query, limit))
        ]
        await ex.respond_json({"query": query, "results": results, "response_time": 0.01})


def main(argv: list[str] | None = None) -> None:
    run_main(FakeSearxng, argv, "Fake SearXNG / Brave / Tavily search")


if __name__ == "__main__":
    main()
