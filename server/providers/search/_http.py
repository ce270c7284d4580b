"""One JSON request to a search engine, with its failures turned into ``SearchError``."""

from __future__ import annotations

import json
from contextlib import aclosing
from typing import Any

import httpx2
import trio

from server.providers.search.base import SearchError

# A search answer is a few kilobytes; anything past this is not one.
MAX_RESPONSE_BYTES = 5_000_000


async def request_json(
    http: httpx2.AsyncClient,
    provider: str,
    method: str,
    url: str,
    *,
    timeout: float,
    params: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
    json_body: dict[str, Any] | None = None,
) -> Any:
    """Send the request and return the decoded JSON answer.

    Raises ``SearchError`` (naming ``provider``) on a timeout, a connection failure, a
    non-2xx status, an oversized body or a body that is not JSON.

    Cancelling it closes the connection to the search engine.
    """
    all_headers = {"Accept": "application/json", "User-Agent": "Tether/0.1 (web search)"}
    all_headers.update(headers or {})
    try:
        with trio.fail_after(timeout):
            async with http.stream(
                method, url, params=params, headers=all_headers, json=json_body
            ) as response:
                status = response.status_code
                body = await _read_capped(response, provider)
    except trio.TooSlowError:
        raise SearchError(f"{provider}: no answer within {timeout:g} s") from None
    except httpx2.TimeoutException:
        raise SearchError(f"{provider}: timed out") from None
    except httpx2.ConnectError as exc:
        raise SearchError(f"{provider}: could not connect ({exc})") from None
    except (httpx2.HTTPError, httpx2.InvalidURL, httpx2.StreamError) as exc:
        detail = str(exc) or type(exc).__name__
        raise SearchError(f"{provider}: request failed ({detail})") from None

    if not 200 <= status < 300:
        raise SearchError(f"{provider}: HTTP {status}{_error_hint(provider, status, body)}")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise SearchError(f"{provider}: the answer is not valid JSON") from None


async def _read_capped(response: httpx2.Response, provider: str) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async with aclosing(response.aiter_bytes()) as body:
        async for chunk in body:
            size += len(chunk)
            if size > MAX_RESPONSE_BYTES:
                raise SearchError(
                    f"{provider}: the answer is larger than {MAX_RESPONSE_BYTES} bytes"
                )
            chunks.append(chunk)
    return b"".join(chunks)


def _error_hint(provider: str, status: int, body: bytes) -> str:
    """A short reason from the error body, and the usual cause of well-known statuses."""
    hint = ""
    if provider == "searxng" and status == 403:
        hint = " (is the json format enabled under search.formats in SearXNG's settings.yml?)"
    elif status in (401, 403):
        hint = " (is the API key right?)"
    elif status == 429:
        hint = " (rate limited)"
    text = body[:200].decode("utf-8", errors="replace").strip()
    text = " ".join(text.split())
    return f"{hint}: {text}" if text else hint


def as_dict(value: Any, provider: str, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SearchError(f"{provider}: unexpected answer shape ({what} is not an object)")
    return value


def as_list(value: Any, provider: str, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise SearchError(f"{provider}: unexpected answer shape ({what} is not a list)")
    return value


def text_field(item: dict[str, Any], key: str) -> str:
    value = item.get(key)
    return value.strip() if isinstance(value, str) else ""
