"""The start-up check: whether the configured upstream model endpoint and search provider
answer, said in the log once the server is up.

A wrong URL, a stopped container or a refused key would otherwise show only when the first
user's request fails. The check runs in the background, after start-up, so it never delays
readiness or a first answer, and it never fails the start: a dependency may come up later.
It logs one WARNING per dependency that does not answer, naming the setting it comes from
and what failed, and one INFO line when every configured one does. The built-in ``local``
model and ``local`` search need no check.

- **The upstream** (``TETHER_LLM_BASE_URL``): the first fetch of its model list
  (``GET {base}/models`` with ``TETHER_LLM_API_KEY``, at most 10 s), which the server
  makes at start-up anyway. An error status (a refused key: 401) counts as not answering.
- **An HTTP search provider** (``searxng``, ``brave``, ``tavily``): ``GET`` of its base URL,
  through the client its searches use, without its key. Any answer below 500 counts (its
  base URL need not serve anything); a transport error, a timeout or a 5xx does not.
"""

from __future__ import annotations

import logging
from urllib.parse import urlsplit, urlunsplit

import httpx2
import trio

from server.config import Settings
from server.providers.llm.router import ModelRouter

log = logging.getLogger("tether.startup")

SEARCH_CHECK_TIMEOUT_S = 10.0

# The setting that holds each HTTP search provider's base URL.
_SEARCH_URL_SETTINGS = {
    "searxng": "searxng_url",
    "brave": "brave_base_url",
    "tavily": "tavily_base_url",
}


def shown_url(url: str) -> str:
    """``url`` without what may be secret in it (user and password, query, fragment)."""
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc.rpartition("@")[2], parts.path, "", ""))


def search_setting(settings: Settings) -> tuple[str, str] | None:
    """The ``TETHER_*`` name and the base URL of the configured HTTP search provider, or
    None for one that needs no check (``local``)."""
    field = _SEARCH_URL_SETTINGS.get(settings.search_provider.strip().lower())
    url = getattr(settings, field) if field else None
    if not field or not url:
        return None
    return f"TETHER_{field.upper()}", str(url)


async def search_problem(http: httpx2.AsyncClient, url: str, timeout_s: float) -> str | None:
    """Why the search provider at ``url`` does not answer, or None if it does.

    Cancelling it closes the connection. The connection is not kept for later searches.
    """
    try:
        with trio.fail_after(timeout_s):
            async with http.stream("GET", url, headers={"Connection": "close"}) as response:
                status = response.status_code
    except trio.TooSlowError:
        return f"no answer within {timeout_s:g} s"
    except (httpx2.HTTPError, httpx2.InvalidURL, httpx2.StreamError) as exc:
        detail = str(exc)
        return type(exc).__name__ + (f": {detail}" if detail else "")
    if status >= 500:
        return f"it answered HTTP {status}"
    return None


async def check_dependencies(
    settings: Settings, models: ModelRouter, http: httpx2.AsyncClient
) -> None:
    """Check the upstream (its first model-list fetch, which fills ``models``' cache) and
    the search provider side by side, and log what was found. Never raises; cancelling it
    abandons the checks and logs nothing more."""
    answered: list[str] = []
    failed = False

    async def upstream() -> None:
        nonlocal failed
        await models.refresh()
        setting = f"TETHER_LLM_BASE_URL={shown_url(settings.llm_base_url or '')}"
        if models.last_error is not None:
            failed = True
            log.warning(
                "start-up check: the upstream model endpoint (%s) failed GET /models: %s",
                setting,
                models.last_error,
            )
        else:
            answered.append(f"the upstream model endpoint ({setting})")

    async def search(name: str, url: str) -> None:
        nonlocal failed
        setting = f"{name}={shown_url(url)}"
        what = f"the {settings.search_provider.strip().lower()} search provider ({setting})"
        timeout_s = min(settings.search_timeout_s, SEARCH_CHECK_TIMEOUT_S)
        try:
            problem = await search_problem(http, url, timeout_s)
        except Exception as exc:  # runs in the app's nursery: a bug must not end the server
            log.exception("start-up check of %s failed", what)
            problem = f"the check failed ({type(exc).__name__})"
        if problem is not None:
            failed = True
            log.warning("start-up check: %s is not reachable: %s", what, problem)
        else:
            answered.append(what)

    async with trio.open_nursery() as nursery:
        if models.upstream is not None:
            nursery.start_soon(upstream)
        target = search_setting(settings)
        if target is not None:
            nursery.start_soon(search, *target)
    if answered and not failed:
        log.info(
            "start-up check: %s answer%s", " and ".join(answered), "" if len(answered) > 1 else "s"
        )
