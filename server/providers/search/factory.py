"""Choosing the search provider from the settings."""

from __future__ import annotations

import httpx2

from server.config import Settings, SettingsError
from server.providers.search.base import SearchProvider
from server.providers.search.brave import BraveSearch
from server.providers.search.local import LocalSearch
from server.providers.search.searxng import SearxngSearch
from server.providers.search.tavily import TavilySearch

PROVIDER_NAMES = ("local", "searxng", "brave", "tavily")


def build_search_provider(settings: Settings, http: httpx2.AsyncClient) -> SearchProvider:
    """The provider named by ``settings.search_provider``.

    Raises ``SettingsError`` for an unknown name, or when the chosen provider's URL or
    API key is not set. Nothing is contacted here: the local index is built on the
    first search.
    """
    name = settings.search_provider.strip().lower()
    timeout = settings.search_timeout_s
    if name == "local":
        return LocalSearch(settings.search_local_dir, max_content_chars=settings.page_max_chars)
    if name == "searxng":
        if not settings.searxng_url:
            raise SettingsError("TETHER_SEARCH_PROVIDER=searxng needs TETHER_SEARXNG_URL")
        return SearxngSearch(
            http, _require_http_url(settings.searxng_url, "TETHER_SEARXNG_URL"), timeout=timeout
        )
    if name == "brave":
        if not settings.brave_api_key:
            raise SettingsError("TETHER_SEARCH_PROVIDER=brave needs TETHER_BRAVE_API_KEY")
        return BraveSearch(
            http,
            settings.brave_api_key,
            base_url=_require_http_url(settings.brave_base_url, "TETHER_BRAVE_BASE_URL"),
            timeout=timeout,
        )
    if name == "tavily":
        if not settings.tavily_api_key:
            raise SettingsError("TETHER_SEARCH_PROVIDER=tavily needs TETHER_TAVILY_API_KEY")
        return TavilySearch(
            http,
            settings.tavily_api_key,
            base_url=_require_http_url(settings.tavily_base_url, "TETHER_TAVILY_BASE_URL"),
            timeout=timeout,
        )
    raise SettingsError(
        f"TETHER_SEARCH_PROVIDER={settings.search_provider!r} is not one of "
        + ", ".join(PROVIDER_NAMES)
    )


def _require_http_url(url: str, variable: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise SettingsError(f"{variable}={url!r} is not an http:// or https:// URL")
    return url
