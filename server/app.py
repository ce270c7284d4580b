"""``create_app(settings)``: the quart-trio app, its routes and its lifecycle.

The app owns the runtime (HTTP client, providers, task manager). The task manager runs in
its own nursery, started from ``app.nursery`` at start-up, so that no task's failure can
close the app's nursery (an exception escaping a task started there closes it for good).
"""

from __future__ import annotations

import logging
from functools import partial

import trio
from opentelemetry.sdk.trace import TracerProvider
from quart import Response
from quart_trio import QuartTrio
from werkzeug.exceptions import HTTPException

from server.access_log import close_access_log, log_access, open_access_log
from server.api import chat, health, local_docs, models, openapi, page, skip, tasks, tools, ws
from server.api.admission import refusal
from server.api.binding import bind_to_connection, route_websocket
from server.api.body_rate import BodyRateFloor
from server.api.common import close_if_body_unread, error_response
from server.api.responses import routes as responses
from server.config import Settings
from server.runtime import Runtime, build_runtime
from server.schemas import RequestError
from server.startup_check import check_dependencies
from server.tasks.errors import TaskRefused

log = logging.getLogger("tether")

_HTTP_CODES = {
    400: "invalid_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "payload_too_large",
    429: "too_many_tasks",
    503: "shutting_down",
}


def create_app(
    settings: Settings | None = None, *, tracer_provider: TracerProvider | None = None
) -> QuartTrio:
    """The app for ``settings`` (read from the environment if None); traced spans go to
    ``tracer_provider`` if given (see ``build_runtime``)."""
    settings = settings or Settings.from_env()
    # No framework static folder: api/page.py serves the package's own, with its rules.
    app = QuartTrio("tether", static_folder=None)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    app.config["RESPONSE_TIMEOUT"] = None
    app.config["BODY_TIMEOUT"] = 60
    runtime: Runtime = build_runtime(settings, tracer_provider=tracer_provider)
    app.extensions["tether"] = runtime
    hub = ws.WsHub(settings.ws_send_timeout_s)
    app.extensions["tether_ws"] = hub
    runtime.manager.add_reach_listener(hub.reach_changed)

    # Outside bind_to_connection: a body that arrives too slowly is answered 408 and its
    # connection closed at once, not drained (binding._draining_on_close) at its own pace.
    body_floor = BodyRateFloor(
        settings.request_body_min_rate, settings.request_body_window_s, runtime.metrics
    )
    app.asgi_app = route_websocket(  # type: ignore[method-assign,assignment]
        body_floor.wrap(bind_to_connection(app.asgi_app)), ws.PATH, partial(ws.serve, runtime, hub)
    )
    # TETHER_ACCESS_LOG: a file that cannot be opened stops the start (SettingsError).
    access_log = open_access_log(settings.access_log)
    if access_log is not None:
        app.asgi_app = log_access(  # type: ignore[method-assign,assignment]
            app.asgi_app, access_log
        )
    for blueprint in (
        chat.blueprint,
        tasks.blueprint,
        models.blueprint,
        health.blueprint,
        page.blueprint,
        tools.blueprint,
        local_docs.blueprint,
        openapi.blueprint,
        responses.blueprint,
        skip.blueprint,
    ):
        app.register_blueprint(blueprint)

    @app.before_serving
    async def start() -> None:
        if runtime.mcp is not None:
            # Each MCP server answers or fails its first attempt (bounded) before the first
            # request, so that its tools are there; one that is down never stops the start.
            await app.nursery.start(runtime.mcp.run)
        await app.nursery.start(runtime.manager.run)
        await app.nursery.start(runtime.sessions.run)
        app.nursery.start_soon(hub.run)
        await app.nursery.start(body_floor.run)
        app.nursery.start_soon(runtime.load.run)
        app.nursery.start_soon(_refresh_models, runtime)

    @app.after_serving
    async def stop() -> None:
        await runtime.manager.shutdown()
        if runtime.mcp is not None:  # after the tasks: none is left calling a tool
            await runtime.mcp.close()
        await runtime.http.aclose()
        if runtime.pages_http is not runtime.http:
            await runtime.pages_http.aclose()
        await runtime.model_http.aclose()
        await runtime.tracing.aclose()
        if access_log is not None:
            close_access_log(access_log)

    app.after_request(close_if_body_unread)

    @app.errorhandler(RequestError)
    async def request_error(error: RequestError) -> Response:
        return error_response(error)

    @app.errorhandler(TaskRefused)
    async def task_refused(error: TaskRefused) -> Response:
        return error_response(refusal(error))

    @app.errorhandler(HTTPException)
    async def http_error(error: HTTPException) -> Response:
        status = error.code or 500
        code = _HTTP_CODES.get(status, "http_error")
        message = error.description or error.name
        if status == 413:
            message = f"The request body is larger than {settings.max_body_bytes} bytes."
        return error_response(RequestError(status, code, message))

    @app.errorhandler(Exception)
    async def internal_error(error: Exception) -> Response:
        log.error("unhandled error", exc_info=error)
        return error_response(RequestError(500, "internal_error", "Internal server error."))

    return app


async def _refresh_models(runtime: Runtime) -> None:
    """Keep the upstream's model list fresh so that validating a model needs no I/O. The
    first fetch is the start-up check's, which also tells the log whether the upstream and
    the search provider answer."""
    await check_dependencies(runtime.settings, runtime.models, runtime.http)
    while True:
        await trio.sleep(60)
        await runtime.models.refresh()
