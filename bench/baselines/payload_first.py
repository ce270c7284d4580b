"""The payload-first baseline: a chat server that runs the payload phase before it answers.

This is how Open WebUI behaved before its issue #13027 was fixed: the request handler runs
web search (the search request, then the result pages, fetched side by side) and only then
creates the task, starts the generation in the background and answers with the task id. So
the time to the task id includes the whole payload phase, and nothing can stop that phase
because the client has no id yet.

It runs on the same stack as Tether (quart-trio on hypercorn, httpx2 for outgoing HTTP) and
against the same fakes, so the only difference measured is *when* the id is returned.

    python -m bench.baselines.payload_first --port 0 --searxng-url URL --llm-base-url URL/v1

prints ``READY <port>`` once listening. Routes: ``POST /api/chat/completions`` (background
mode only: 202 with ``{"task_id", "chat_id", "message_id", "status"}``), ``GET /healthz``.
"""

from __future__ import annotations

import argparse
import json
import secrets
from typing import Any

import httpx2
import trio
from quart import Response, request
from quart_trio import QuartTrio

from bench.baselines import hosting


def _last_user_text(body: dict[str, Any]) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def _json(obj: Any, status: int = 200) -> Response:
    return Response(json.dumps(obj), status=status, mimetype="application/json")


class PayloadFirst:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.http = httpx2.AsyncClient(
            limits=httpx2.Limits(max_connections=200, max_keepalive_connections=50),
            timeout=httpx2.Timeout(300.0, connect=10.0),
            trust_env=False,
        )

    async def web_search(self, query: str) -> list[dict[str, Any]]:
        """The search request, then every result page, side by side."""
        answer = await self.http.get(
            f"{self.args.searxng_url.rstrip('/')}/search", params={"q": query, "format": "json"}
        )
        answer.raise_for_status()
        results = list(answer.json().get("results") or [])[: self.args.result_count]
        pages: dict[int, str] = {}

        async def fetch(i: int, url: str) -> None:
            try:
                page = await self.http.get(url, timeout=10.0)
                pages[i] = page.text[:4000]
            except httpx2.HTTPError:
                pages[i] = ""

        if self.args.fetch_pages:
            async with trio.open_nursery() as nursery:
                for i, result in enumerate(results):
                    nursery.start_soon(fetch, i, str(result.get("url", "")))
        return [{**r, "text": pages.get(i, "")} for i, r in enumerate(results)]

    async def generate(self, body: dict[str, Any], sources: list[dict[str, Any]]) -> None:
        """The response phase, in the background after the answer (output discarded)."""
        messages = list(body.get("messages") or [])
        if sources:
            context = "\n\n".join(
                f"[{i + 1}] {s.get('title', '')}\n{s['text']}" for i, s in enumerate(sources)
            )
            messages.insert(max(0, len(messages) - 1), {"role": "system", "content": context})
        payload = {
            "model": body.get("model") or self.args.model,
            "messages": messages,
            "stream": True,
        }
        try:
            async with self.http.stream(
                "POST", f"{self.args.llm_base_url.rstrip('/')}/chat/completions", json=payload
            ) as answer:
                async for _ in answer.aiter_bytes():
                    pass
        except httpx2.HTTPError:
            pass


def create_app(args: argparse.Namespace) -> QuartTrio:
    app = QuartTrio("payload_first")
    state = PayloadFirst(args)

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.post("/api/chat/completions")
    async def chat() -> Response:
        body = await request.get_json(force=True, silent=True)
        if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
            return _json(
                {
                    "error": {
                        "message": "invalid body",
                        "type": "invalid_request",
                        "param": None,
                        "code": "invalid_request",
                    }
                },
                400,
            )
        sources: list[dict[str, Any]] = []
        if (body.get("features") or {}).get("web_search"):
            try:
                sources = await state.web_search(_last_user_text(body))
            except httpx2.HTTPError:
                sources = []
        task_id = "task_" + secrets.token_hex(12)
        app.nursery.start_soon(state.generate, body, sources)
        return _json(
            {
                "task_id": task_id,
                "chat_id": body.get("chat_id"),
                "message_id": body.get("message_id"),
                "status": "queued",
            },
            202,
        )

    @app.after_serving
    async def close() -> None:
        await state.http.aclose()

    return app


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else "")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--searxng-url", required=True)
    parser.add_argument("--llm-base-url", required=True)
    parser.add_argument("--model", default="fake-model")
    parser.add_argument("--result-count", type=int, default=3)
    parser.add_argument("--no-fetch-pages", dest="fetch_pages", action="store_false")
    args = parser.parse_args(argv)
    hosting.run(create_app(args), args.port)


if __name__ == "__main__":
    main()
