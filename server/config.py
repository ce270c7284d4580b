"""Settings, read once from ``TETHER_*`` environment variables into a typed object.

Nothing else in the server reads the environment: ``Settings`` is built at start-up
(``Settings.from_env()``) and passed down.
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The corpus of the built-in ``local`` search: the repository's docs/ in a checkout; an
# installed wheel carries the same files inside the package (pyproject.toml, force-include).
_PACKAGED_DOCS = Path(__file__).resolve().parent / "docs"
DEFAULT_SEARCH_DIR = _PACKAGED_DOCS if _PACKAGED_DOCS.is_dir() else PROJECT_ROOT / "docs"


class SettingsError(ValueError):
    """A TETHER_* variable has a value that cannot be used."""


def _default_max_tasks() -> int:
    # Tasks are mostly waiting on sockets, so the limit is about memory and file
    # descriptors rather than cores: 2,000 per core fits comfortably in a few GiB.
    return 2000 * (os.cpu_count() or 1)


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    insecure: bool = False
    # Secrets are left out of the settings' repr (a log line or a traceback may show it).
    api_keys: Mapping[str, str] = field(default_factory=dict, repr=False)
    api_keys_file: str | None = None
    # One line per request: "-" or "stdout", "stderr", or a file path (unset: no access log).
    access_log: str | None = None

    llm_base_url: str | None = None
    llm_api_key: str | None = field(default=None, repr=False)
    llm_timeout_s: float = 300.0
    default_model: str = "local"
    query_model: str | None = None
    local_model_tokens_per_s: float = 40.0

    search_provider: str = "local"
    searxng_url: str | None = None
    brave_api_key: str | None = field(default=None, repr=False)
    brave_base_url: str = "https://api.search.brave.com"
    tavily_api_key: str | None = field(default=None, repr=False)
    tavily_base_url: str = "https://api.tavily.com"
    search_local_dir: str = str(DEFAULT_SEARCH_DIR)
    search_result_count: int = 3
    search_fetch_pages: bool = True
    search_query_generation: bool = True
    search_timeout_s: float = 30.0
    search_max_queries: int = 3
    page_timeout_s: float = 10.0
    page_max_bytes: int = 2_000_000
    page_max_chars: int = 4000
    # Page fetches (search results, fetch_url) refuse non-public addresses unless allowed.
    fetch_allow_private: bool = False

    tool_timeout_s: float = 30.0
    max_tool_rounds: int = 8
    # MCP servers whose tools are offered as mcp:<server>:<tool> (a JSON file in the common
    # mcpServers shape; read at start-up by read_mcp_config).
    mcp_config: str | None = None
    # Calls in flight at once on one MCP server; more wait their turn (inside the task).
    mcp_max_concurrent_calls: int = 8
    # Start (or reach), initialize and list the tools of one MCP server.
    mcp_connect_timeout_s: float = 10.0
    # After a call was abandoned (stop, timeout), the server must answer a ping this fast,
    # or its session is restarted (a stdio server's process with it).
    mcp_ping_timeout_s: float = 5.0
    # Longest MCP tool result given to the model, in characters.
    mcp_max_result_chars: int = 16_000

    max_active_tasks: int = field(default_factory=_default_max_tasks)
    max_active_tasks_per_user: int = field(default_factory=_default_max_tasks)
    task_retention_s: float = 600.0
    # Bounds on one task, so that an upstream that streams without end cannot grow memory
    # for the whole task timeout: past one, the task ends failed (task_too_large), the
    # content so far kept.
    max_task_events: int = 100_000
    max_content_chars: int = 4_000_000
    # Ended tasks kept for reading at most (the oldest unread ones go first past it).
    max_retained_tasks: int = 20_000
    task_timeout_s: float = 1800.0
    max_body_bytes: int = 1_000_000
    sse_keepalive_s: float = 15.0
    http_max_connections: int = 1000
    # Where task state lives: "memory" (this process only) or "redis" (shared by every
    # process and replica that uses the same Redis and prefix).
    backend: str = "memory"
    redis_url: str | None = field(default=None, repr=False)  # may hold a password
    redis_prefix: str = "tether"
    # A replica that has not renewed its heartbeat for this long is taken for dead: its
    # running tasks end failed (replica_lost).
    replica_ttl_s: float = 10.0
    # Worker processes serving the one port (`tether serve --workers N`); needs Redis.
    workers: int = 1
    # The longest one step on shared task state may take (admission, the terminal event):
    # past it, admission answers 503 and a terminal write is given up and logged.
    backend_timeout_s: float = 5.0

    ws_reconnect_grace_s: float = 10.0
    ws_ping_interval_s: float = 20.0
    ws_max_lag_events: int = 10_000
    ws_send_timeout_s: float = 30.0
    # Browser origins, besides the server's own, whose pages may open /ws (the Origin
    # header; "*" allows any). A WebSocket is not bound by the same-origin policy, so
    # without this check any site a user visits could drive their session.
    ws_allowed_origins: tuple[str, ...] = ()

    def with_overrides(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every ``TETHER_<FIELD>`` variable; unknown fields keep their defaults."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get("TETHER_" + f.name.upper())
            if raw is None or raw == "":
                continue
            values[f.name] = _parse(f.name, f.type, raw)
        settings = cls(**values)
        if settings.backend not in ("memory", "redis"):
            raise SettingsError(f"TETHER_BACKEND={settings.backend!r} is not memory or redis")
        if settings.backend == "redis" and not settings.redis_url:
            raise SettingsError("TETHER_BACKEND=redis needs TETHER_REDIS_URL "
                                "(for example redis://127.0.0.1:6379/0)")
        if settings.api_keys_file:
            keys = dict(settings.api_keys)
            keys.update(_parse_keys(Path(settings.api_keys_file).read_text()))
            settings = replace(settings, api_keys=keys)
        return settings


# TETHER_* variables that are not settings of the server: the test suite's own.
_NOT_SETTINGS_PREFIX = "TETHER_TEST_"


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A line for each ``TETHER_*`` variable that names no setting (a typo would otherwise
    be silently ignored), with the closest setting's name when one is close."""
    known = {"TETHER_" + f.name.upper() for f in fields(Settings)}
    lines = []
    for name in sorted(environ):
        if (name.startswith("TETHER_") and name not in known
                and not name.startswith(_NOT_SETTINGS_PREFIX)):
            close = difflib.get_close_matches(name, known, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            lines.append(f"{name} is not a setting and is ignored{hint}")
    return lines


@dataclass(frozen=True)
class McpStdioServer:
    """An MCP server that Tether runs as a subprocess and talks to over stdin and stdout."""

    name: str
    command: str
    args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    cwd: str | None = None


@dataclass(frozen=True)
class McpHttpServer:
    """An MCP server that Tether reaches over streamable HTTP."""

    name: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)


McpServerConfig = McpStdioServer | McpHttpServer

# Server names become part of tool ids (mcp:<server>:<tool>) and of the function names the
# model sees, so they are kept to what both can carry.
_MCP_SERVER_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def read_mcp_config(path: str) -> tuple[McpServerConfig, ...]:
    """The servers of an ``mcpServers`` JSON file (the shape Claude Desktop, Cursor and
    others use): each is ``{"command", "args"?, "env"?, "cwd"?}`` (stdio) or ``{"url",
    "headers"?}`` (streamable HTTP). Raises ``SettingsError`` for a file that cannot be read
    or holds anything else: a broken configuration stops the start, while a server that
    does not answer never does."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(f"TETHER_MCP_CONFIG={path!r} cannot be read: "
                            f"{exc.strerror or exc}") from exc
    except ValueError as exc:
        raise SettingsError(f"TETHER_MCP_CONFIG={path!r} is not valid JSON: {exc}") from exc
    servers = raw.get("mcpServers") if isinstance(raw, dict) else None
    if not isinstance(servers, dict):
        raise SettingsError(f"TETHER_MCP_CONFIG={path!r} has no \"mcpServers\" object")
    return tuple(_mcp_server(path, name, entry) for name, entry in servers.items())


def _mcp_server(path: str, name: str, entry: Any) -> McpServerConfig:
    where = f"TETHER_MCP_CONFIG={path!r}: server {name!r}"
    if not _MCP_SERVER_NAME.fullmatch(name):
        raise SettingsError(f"{where}: a name is 1 to 64 of A-Z a-z 0-9 _ -")
    if not isinstance(entry, dict):
        raise SettingsError(f"{where} is not an object")
    kind = entry.get("type", entry.get("transport"))
    if kind in ("sse",):
        raise SettingsError(f"{where}: the old HTTP+SSE transport is not supported; "
                            "use the server's streamable HTTP endpoint")
    if "url" in entry and "command" not in entry:
        url = entry["url"]
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise SettingsError(f"{where}: url must be an http(s) URL")
        return McpHttpServer(name, url, _string_map(where, "headers", entry.get("headers")))
    command = entry.get("command")
    if not isinstance(command, str) or not command:
        raise SettingsError(f"{where} needs a \"command\" (stdio) or a \"url\" (HTTP)")
    args = entry.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise SettingsError(f"{where}: args must be a list of strings")
    cwd = entry.get("cwd")
    if cwd is not None and not isinstance(cwd, str):
        raise SettingsError(f"{where}: cwd must be a string")
    return McpStdioServer(name, command, tuple(args), _string_map(where, "env", entry.get("env")),
                          cwd)


def _string_map(where: str, key: str, value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise SettingsError(f"{where}: {key} must be an object of strings")
    return dict(value)


def read_dotenv(path: Path) -> dict[str, str]:
    """``TETHER_*`` assignments from a ``.env`` file (``NAME=value`` lines, ``#`` comments,
    optional quotes). Variables already in the environment win over the file."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        name, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        if name.strip().startswith("TETHER_"):
            values[name.strip()] = value
    return values


def _parse_keys(raw: str) -> dict[str, str]:
    """``key=user`` pairs separated by commas or new lines."""
    keys: dict[str, str] = {}
    for item in raw.replace("\n", ",").split(","):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        key, sep, user = item.partition("=")
        if not sep or not key.strip() or not user.strip():
            raise SettingsError(f"API key entry {item!r} is not key=user")
        keys[key.strip()] = user.strip()
    return keys


def _parse_origins(raw: str) -> tuple[str, ...]:
    """Comma-separated origins (``https://chat.example.com``), compared with a browser's
    ``Origin`` header as it sends it: lower case, no path, no trailing slash."""
    origins = []
    for item in raw.split(","):
        origin = item.strip().rstrip("/").lower()
        if not origin:
            continue
        if origin != "*" and "://" not in origin:
            raise SettingsError(f"TETHER_WS_ALLOWED_ORIGINS entry {item.strip()!r} is not "
                                "an origin such as https://chat.example.com")
        origins.append(origin)
    return tuple(origins)


def _parse(name: str, type_name: Any, raw: str) -> Any:
    kind = str(type_name)
    if name == "ws_allowed_origins":
        return _parse_origins(raw)
    try:
        if name == "api_keys":
            return _parse_keys(raw)
        if kind == "bool":
            lowered = raw.strip().lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind == "int":
            return int(raw)
        if kind == "float":
            return float(raw)
        return raw
    except ValueError as exc:
        raise SettingsError(f"TETHER_{name.upper()}={raw!r} is not a valid {kind}") from exc
