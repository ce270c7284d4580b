"""Settings, read once from ``TETHER_*`` environment variables into a typed object.

Nothing else in the server reads the environment: ``Settings`` is built at start-up
(``Settings.from_env()``) and passed down.
"""

from __future__ import annotations

import difflib
import json
import os
import resource
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Final

from dotenv import dotenv_values
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    StringConstraints,
    Tag,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from server.library_internals import MappingEnvSource

PROJECT_ROOT = Path(__file__).resolve().parent.parent
# The corpus of the built-in ``local`` search: the repository's docs/ in a checkout; an
# installed wheel carries the same files inside the package (pyproject.toml, force-include).
_PACKAGED_DOCS = Path(__file__).resolve().parent / "docs"
DEFAULT_SEARCH_DIR = _PACKAGED_DOCS if _PACKAGED_DOCS.is_dir() else PROJECT_ROOT / "docs"


_PREFIX = "TETHER_"


class SettingsError(ValueError):
    """A TETHER_* variable has a value that cannot be used."""


def _default_max_tasks() -> int:
    # Tasks are mostly waiting on sockets, so the limit is about memory and file
    # descriptors rather than cores: 2,000 per core fits comfortably in a few GiB.
    return 2000 * (os.cpu_count() or 1)


def _open_files_limit() -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return 1 << 20 if soft == resource.RLIM_INFINITY else soft


def _default_max_connections() -> int:
    # Each client connection is one file descriptor, and the tasks it starts hold more
    # (model, search and page connections, Redis): half of the process's open-file limit
    # is left to those, so that past the cap a client gets a clean 503 rather than the
    # listener failing to accept. No more than 5,000 per core: an idle WebSocket costs
    # memory too (about 30 KB of RSS, see bench/results/ws-memory-after.md).
    return max(16, min(_open_files_limit() // 2, 5000 * (os.cpu_count() or 1)))


def _default_max_connections_per_client() -> int:
    # One address may hold half of the process's connections: enough for a busy proxy or
    # a load test, not enough for one client to lock everybody else out.
    return max(1, _default_max_connections() // 2)


def _parse_keys(raw: str, variable: str) -> dict[str, str]:
    """``key=user`` pairs separated by commas or new lines (``variable`` is named in the
    error)."""
    keys: dict[str, str] = {}
    for item in raw.replace("\n", ",").split(","):
        item = item.strip()
        if not item or item.startswith("#"):
            continue
        key, sep, user = item.partition("=")
        if not sep or not key.strip() or not user.strip():
            raise SettingsError(f"{variable}: API key entry {item!r} is not key=user")
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
            raise SettingsError(
                f"TETHER_WS_ALLOWED_ORIGINS entry {item.strip()!r} is not "
                "an origin such as https://chat.example.com"
            )
        origins.append(origin)
    return tuple(origins)


def _parse_sentinels(raw: str) -> tuple[str, ...]:
    """Comma-separated ``host:port`` addresses of Redis Sentinels."""
    out = []
    for item in raw.split(","):
        address = item.strip()
        if not address:
            continue
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise SettingsError(
                f"TETHER_REDIS_SENTINELS entry {address!r} is not host:port "
                "(for example 127.0.0.1:26379)"
            )
        out.append(f"{host}:{int(port)}")
    return tuple(out)


def _keys_from_env(raw: str) -> dict[str, str]:
    return _parse_keys(raw, "TETHER_API_KEYS")


def _from_text(kind: str, convert: Callable[[str], Any]) -> BeforeValidator:
    """A value given as text (an environment variable) converted as ``convert`` does, with
    the one-line error naming the variable; a value of any other type is left to pydantic."""

    def validate(value: Any, info: ValidationInfo) -> Any:
        if not isinstance(value, str):
            return value
        try:
            return convert(value)
        except ValueError as exc:
            raise SettingsError(
                f"{_variable(info.field_name)}={value!r} is not a valid {kind}"
            ) from exc

    return BeforeValidator(validate)


def _bool(raw: str) -> bool:
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ValueError(raw)


def _text_or(convert: Callable[[str], Any]) -> BeforeValidator:
    return BeforeValidator(lambda value: convert(value) if isinstance(value, str) else value)


# Text forms of the settings' types, exactly as the environment gives them: Python's own
# int() and float(), and these words for a bool (pydantic's lax parsing would take more).
Bool = Annotated[bool, _from_text("bool", _bool)]
Int = Annotated[int, _from_text("int", int)]
Float = Annotated[float, _from_text("float", float)]


class Settings(BaseSettings):
    """Every ``TETHER_<NAME>`` setting, typed and validated; immutable (``with_overrides``
    makes a changed copy). ``Settings(...)`` reads no environment: ``from_env`` does."""

    model_config = SettingsConfigDict(
        env_prefix=_PREFIX,
        case_sensitive=False,
        env_ignore_empty=True,
        frozen=True,
        extra="forbid",
        # Lists and the keys are comma-separated text (validators below), never JSON.
        enable_decoding=False,
    )

    host: str = "127.0.0.1"
    port: Int = 8080
    insecure: Bool = False
    # Secrets are left out of the settings' repr (a log line or a traceback may show it).
    api_keys: Annotated[Mapping[str, str], _text_or(_keys_from_env)] = Field(
        default_factory=dict, repr=False
    )
    api_keys_file: str | None = None
    # One line per request: "-" or "stdout", "stderr", or a file path (unset: no access log).
    access_log: str | None = None

    llm_base_url: str | None = None
    llm_api_key: str | None = Field(default=None, repr=False)
    llm_timeout_s: Float = 300.0
    default_model: str = "local"
    query_model: str | None = None
    local_model_tokens_per_s: Float = 40.0

    search_provider: str = "local"
    searxng_url: str | None = None
    brave_api_key: str | None = Field(default=None, repr=False)
    brave_base_url: str = "https://api.search.brave.com"
    tavily_api_key: str | None = Field(default=None, repr=False)
    tavily_base_url: str = "https://api.tavily.com"
    search_local_dir: str = str(DEFAULT_SEARCH_DIR)
    search_result_count: Int = 3
    search_fetch_pages: Bool = True
    search_query_generation: Bool = True
    search_timeout_s: Float = 30.0
    search_max_queries: Int = 3
    page_timeout_s: Float = 10.0
    page_max_bytes: Int = 2_000_000
    page_max_chars: Int = 4000
    # Page fetches (search results, fetch_url) refuse non-public addresses unless allowed.
    fetch_allow_private: Bool = False

    tool_timeout_s: Float = 30.0
    max_tool_rounds: Int = 8
    # MCP servers whose tools are offered as mcp:<server>:<tool> (a JSON file in the common
    # mcpServers shape; read at start-up by read_mcp_config).
    mcp_config: str | None = None
    # Calls in flight at once on one MCP server; more wait their turn (inside the task).
    mcp_max_concurrent_calls: Int = 8
    # Start (or reach), initialize and list the tools of one MCP server.
    mcp_connect_timeout_s: Float = 10.0
    # After a call was abandoned (stop, timeout), the server must answer a ping this fast,
    # or its session is restarted (a stdio server's process with it).
    mcp_ping_timeout_s: Float = 5.0
    # Longest MCP tool result given to the model, in characters.
    mcp_max_result_chars: Int = 16_000

    max_active_tasks: Int = Field(default_factory=_default_max_tasks)
    max_active_tasks_per_user: Int = Field(default_factory=_default_max_tasks)
    task_retention_s: Float = 600.0
    # Bounds on one task, so that an upstream that streams without end cannot grow memory
    # for the whole task timeout: past one, the task ends failed (task_too_large), the
    # content so far kept.
    max_task_events: Int = 100_000
    max_content_chars: Int = 4_000_000
    # Ended tasks kept for reading at most (the oldest unread ones go first past it).
    max_retained_tasks: Int = 20_000
    task_timeout_s: Float = 1800.0
    max_body_bytes: Int = 1_000_000
    sse_keepalive_s: Float = 15.0
    http_max_connections: Int = 1000
    # Slow clients (slowloris): a request head must arrive whole within this (from the
    # connection's opening, or from the first byte of a later request on a keep-alive
    # connection), or it is answered 408 and closed. 0: no bound.
    request_head_timeout_s: Float = 10.0
    # A request body must keep up this many bytes a second, measured over windows of
    # request_body_window_s: a window that ends short of rate x window bytes, with the body
    # not finished, ends the request with 408 and closes the connection. 0: no floor.
    request_body_min_rate: Int = 1024
    request_body_window_s: Float = 5.0
    # Open client connections (HTTP and WebSocket) per process, and per client address;
    # past either, a new connection is answered 503 (with Retry-After) and closed. 0 for
    # the per-client one: no per-client limit (behind a proxy every client has its address).
    max_connections: Int = Field(default_factory=_default_max_connections)
    max_connections_per_client: Int = Field(default_factory=_default_max_connections_per_client)
    # Where task state lives: "memory" (this process only) or "redis" (shared by every
    # process and replica that uses the same Redis and prefix).
    backend: str = "memory"
    redis_url: str | None = Field(default=None, repr=False)  # may hold a password
    redis_prefix: str = "tether"
    # What TETHER_REDIS_URL names: "single" (one redis-server), "cluster" (any node of a
    # Redis Cluster) or "auto" (asked of the server at start: INFO cluster).
    redis_mode: str = "auto"
    # On a Redis Cluster, the blocking reads that follow tasks run elsewhere (one per hash
    # slot of the followed tasks) held at once by a process: past it, the slots take turns
    # with short reads, so that Redis connections stay bounded however many are followed.
    redis_follow_reads: Int = 32
    # Instead of TETHER_REDIS_URL: the primary that these Redis Sentinels (host:port,...)
    # name for the service, followed through a failover; the sentinels' own password, and
    # the database on the primary.
    redis_sentinels: Annotated[tuple[str, ...], _text_or(_parse_sentinels)] = ()
    redis_sentinel_service: str | None = None
    redis_sentinel_password: str | None = Field(default=None, repr=False)
    redis_sentinel_db: Int = 0
    # Behind sentinels: the password (and the ACL user, if not "default") of the primary
    # and its replicas. With TETHER_REDIS_URL, they go in the URL instead.
    redis_password: str | None = Field(default=None, repr=False)
    redis_username: str | None = None
    # A replica that has not renewed its heartbeat for this long is taken for dead: its
    # running tasks end failed (replica_lost).
    replica_ttl_s: Float = 10.0
    # Worker processes serving the one port (`tether serve --workers N`); needs Redis.
    workers: Int = 1
    # The longest one step on shared task state may take (admission, the terminal event):
    # past it, admission answers 503 and a terminal write is given up and logged.
    backend_timeout_s: Float = 5.0

    ws_reconnect_grace_s: Float = 10.0
    ws_ping_interval_s: Float = 20.0
    ws_max_lag_events: Int = 10_000
    ws_send_timeout_s: Float = 30.0
    # Browser origins, besides the server's own, whose pages may open /ws (the Origin
    # header; "*" allows any). A WebSocket is not bound by the same-origin policy, so
    # without this check any site a user visits could drive their session.
    ws_allowed_origins: Annotated[tuple[str, ...], _text_or(_parse_origins)] = ()

    # Traces are not TETHER_* settings: ``from_env`` decides from the standard OTEL_*
    # variables (``otel_traces_wanted``), once; the SDK reads the rest of them itself.
    otel_traces: Bool = False
    otel_service_name: str = "tether"

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        if value not in ("memory", "redis"):
            raise SettingsError(f"TETHER_BACKEND={value!r} is not memory or redis")
        return value

    @field_validator("redis_mode")
    @classmethod
    def _known_redis_mode(cls, value: str) -> str:
        if value not in ("auto", "single", "cluster"):
            raise SettingsError(f"TETHER_REDIS_MODE={value!r} is not auto, single or cluster")
        return value

    @model_validator(mode="after")
    def _sentinels_and_service(self) -> Settings:
        if self.redis_sentinels and not self.redis_sentinel_service:
            raise SettingsError(
                "TETHER_REDIS_SENTINELS needs TETHER_REDIS_SENTINEL_SERVICE, the name the "
                "sentinels monitor the primary by (sentinel monitor <name> ...)"
            )
        if self.redis_sentinel_service and not self.redis_sentinels:
            raise SettingsError(
                "TETHER_REDIS_SENTINEL_SERVICE needs TETHER_REDIS_SENTINELS (host:port,...)"
            )
        if self.redis_sentinels and self.redis_url:
            raise SettingsError(
                "TETHER_REDIS_URL and TETHER_REDIS_SENTINELS both name a Redis: set one"
            )
        if (self.redis_password or self.redis_username) and not self.redis_sentinels:
            raise SettingsError(
                "TETHER_REDIS_PASSWORD and TETHER_REDIS_USERNAME are for the Redis behind "
                "TETHER_REDIS_SENTINELS; with TETHER_REDIS_URL, put them in the URL "
                "(redis://user:password@host:port/db)"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Keyword arguments only: the environment (and .env, which cli.py merges into it) is
        # read by from_env alone, from the mapping it is given.
        return (init_settings,)

    def with_overrides(self, **changes: Any) -> Settings:
        """A copy with ``changes`` (validated as at start-up)."""
        return _validated({**dict(self), **changes})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read every ``TETHER_<FIELD>`` variable of ``environ`` (the process's environment
        if None); unset or empty ones keep their defaults."""
        environ = os.environ if environ is None else environ
        values = MappingEnvSource(cls, environ)()
        values["otel_traces"] = otel_traces_wanted(environ)
        values["otel_service_name"] = environ.get("OTEL_SERVICE_NAME") or "tether"
        settings = _validated(values)
        if settings.backend == "redis" and not (settings.redis_url or settings.redis_sentinels):
            raise SettingsError(
                "TETHER_BACKEND=redis needs TETHER_REDIS_URL (for example "
                "redis://127.0.0.1:6379/0) or TETHER_REDIS_SENTINELS"
            )
        if settings.api_keys_file:
            keys = dict(settings.api_keys)
            keys.update(
                _parse_keys(Path(settings.api_keys_file).read_text(), "TETHER_API_KEYS_FILE")
            )
            settings = settings.with_overrides(api_keys=keys)
        return settings


def otel_traces_wanted(environ: Mapping[str, str]) -> bool:
    """Whether the standard OTEL_* variables ask for traces: an OTLP endpoint is named
    (``OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_ENDPOINT``), and neither
    ``OTEL_SDK_DISABLED=true``, ``OTEL_TRACES_EXPORTER=none`` nor
    ``OTEL_TRACES_SAMPLER=always_off`` says no. Without an endpoint there is nowhere to send
    spans, so none is made: the SDK's default of localhost:4318 is not guessed at."""
    if environ.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    if environ.get("OTEL_TRACES_EXPORTER", "").strip().lower() == "none":
        return False
    if environ.get("OTEL_TRACES_SAMPLER", "").strip().lower() == "always_off":
        return False
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "").strip()
        or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", "").strip()
    )


def _validated(values: Mapping[str, Any]) -> Settings:
    """``Settings`` from ``values``, a validation error made one line naming the variable."""
    try:
        return Settings.model_validate(values)
    except ValidationError as exc:
        raise _settings_error(exc) from None


def _settings_error(exc: ValidationError) -> SettingsError:
    error = exc.errors()[0]
    cause = error.get("ctx", {}).get("error")
    if isinstance(cause, SettingsError):
        return cause
    name = str(error["loc"][0]) if error["loc"] else "?"
    if error["type"] == "extra_forbidden":
        return SettingsError(f"{_variable(name)} is not a setting")
    return SettingsError(f"{_variable(name)}={error['input']!r}: {error['msg']}")


def _variable(field_name: str | None) -> str:
    return _PREFIX + (field_name or "").upper()


# TETHER_* variables that are not settings of the server: the test suite's own.
_NOT_SETTINGS_PREFIX = "TETHER_TEST_"


# Settings that no TETHER_* variable sets: ``from_env`` takes them from OTEL_*.
FROM_OTEL: Final = frozenset({"otel_traces", "otel_service_name"})


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """A line for each ``TETHER_*`` variable that names no setting (a typo would otherwise
    be silently ignored), with the closest setting's name when one is close."""
    known = {_variable(name) for name in Settings.model_fields if name not in FROM_OTEL}
    lines = []
    for name in sorted(environ):
        if (
            name.upper().startswith(_PREFIX)
            and name.upper() not in known
            and not name.upper().startswith(_NOT_SETTINGS_PREFIX)
        ):
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

# The mcpServers shape, as a model: a file that does not fit it is one line naming the server
# and the field (see _mcp_config_error). Keys Tether does not use ("type": "stdio",
# "disabled" and the like, which other clients write) are ignored; values are not coerced.


class _McpStdioEntry(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True)

    command: str = Field(min_length=1)
    args: list[str] = Field(default_factory=list, description="a list of strings")
    env: dict[str, str] = Field(default_factory=dict, description="an object of strings")
    cwd: str | None = Field(default=None, description="a string")


class _McpHttpEntry(BaseModel):
    model_config = ConfigDict(strict=True, frozen=True)

    url: str = Field(pattern=r"^https?://", description="an http(s) URL")
    headers: dict[str, str] = Field(default_factory=dict, description="an object of strings")


_MCP_ENTRIES: dict[str, type[BaseModel]] = {"stdio": _McpStdioEntry, "http": _McpHttpEntry}


def _mcp_transport(entry: Any) -> str | None:
    """Which shape an entry is: ``url`` without ``command`` is HTTP, anything else stdio;
    "sse" (the old HTTP+SSE transport) is no shape Tether takes; None: not an object."""
    if not isinstance(entry, dict):
        return None
    if entry.get("type", entry.get("transport")) == "sse":
        return "sse"
    return "http" if "url" in entry and "command" not in entry else "stdio"


# Server names become part of tool ids (mcp:<server>:<tool>) and of the function names the
# model sees, so they are kept to what both can carry.
_McpServerName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_-]{1,64}$")]
_McpEntry = Annotated[
    Annotated[_McpStdioEntry, Tag("stdio")] | Annotated[_McpHttpEntry, Tag("http")],
    Discriminator(_mcp_transport),
]


class _McpConfigFile(BaseModel):
    mcpServers: dict[_McpServerName, _McpEntry]  # noqa: N815 - the file's own key


def read_mcp_config(path: str) -> tuple[McpServerConfig, ...]:
    """The servers of an ``mcpServers`` JSON file (the shape Claude Desktop, Cursor and
    others use): each is ``{"command", "args"?, "env"?, "cwd"?}`` (stdio) or ``{"url",
    "headers"?}`` (streamable HTTP). Raises ``SettingsError`` for a file that cannot be read
    or holds anything else: a broken configuration stops the start, while a server that
    does not answer never does."""
    try:
        raw = json.loads(Path(path).read_text())
    except OSError as exc:
        raise SettingsError(
            f"TETHER_MCP_CONFIG={path!r} cannot be read: {exc.strerror or exc}"
        ) from exc
    except ValueError as exc:
        raise SettingsError(f"TETHER_MCP_CONFIG={path!r} is not valid JSON: {exc}") from exc
    try:
        config = _McpConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise _mcp_config_error(path, exc) from None
    return tuple(
        McpHttpServer(name, entry.url, entry.headers)
        if isinstance(entry, _McpHttpEntry)
        else McpStdioServer(name, entry.command, tuple(entry.args), entry.env, entry.cwd)
        for name, entry in config.mcpServers.items()
    )


def _mcp_config_error(path: str, exc: ValidationError) -> SettingsError:
    """The first problem of an mcpServers file, in one line naming the server and field."""
    error = exc.errors()[0]
    loc = error["loc"]
    if len(loc) < 2:
        return SettingsError(f'TETHER_MCP_CONFIG={path!r} has no "mcpServers" object')
    where = f"TETHER_MCP_CONFIG={path!r}: server {loc[1]!r}"
    if loc[2:] == ("[key]",):
        return SettingsError(f"{where}: a name is 1 to 64 of A-Z a-z 0-9 _ -")
    if error["type"] == "union_tag_not_found":
        return SettingsError(f"{where} is not an object")
    if error["type"] == "union_tag_invalid":
        return SettingsError(
            f"{where}: the old HTTP+SSE transport is not supported; "
            "use the server's streamable HTTP endpoint"
        )
    field = str(loc[3])
    if field == "command":
        return SettingsError(f'{where} needs a "command" (stdio) or a "url" (HTTP)')
    return SettingsError(
        f"{where}: {field} must be {_MCP_ENTRIES[str(loc[2])].model_fields[field].description}"
    )


def read_dotenv(path: Path) -> dict[str, str]:
    """``TETHER_*`` assignments (names in any case) from a ``.env`` file, as python-dotenv
    reads one (``NAME=value`` lines, ``export``, quotes, ``#`` comments); ``${VAR}`` is
    kept as written, not expanded. A name with no value is left out. Variables already in
    the environment win over the file (the caller merges them)."""
    if not path.is_file():
        return {}
    return {
        name: value
        for name, value in dotenv_values(path, interpolate=False).items()
        if value is not None and name.upper().startswith(_PREFIX)
    }
