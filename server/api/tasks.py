"""Task routes: list, read, stop (two paths), stop a chat, and the events SSE."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

from quart import Blueprint, Response, request

from server.api import sse
from server.api.answers import TaskList
from server.api.common import current_user, json_response, runtime, sse_headers
from server.record import TaskRecord
from server.runtime import Runtime
from server.schemas import RequestError
from server.tasks.backend import next_events
from server.tasks.errors import BackendUnavailable

log = logging.getLogger("tether.api")

blueprint = Blueprint("tasks", __name__)


def _not_found(task_id: str) -> RequestError:
    return RequestError(404, "not_found", f"No task {task_id!r}.", param="task_id")


async def _own_task(task_id: str) -> tuple[str, TaskRecord]:
    user = current_user()
    record = await runtime().manager.get(user, task_id)
    if record is None:
        raise _not_found(task_id)
    return user, record


@blueprint.get("/api/tasks")
async def list_tasks() -> Response:
    user = current_user()
    include = request.args.get("include_finished", "false").lower() in ("1", "true", "yes")
    records = await runtime().manager.store.list_tasks(
        user, chat_id=request.args.get("chat_id"), include_finished=include
    )
    return json_response(_task_list(records))


@blueprint.get("/api/tasks/<task_id>")
async def get_task(task_id: str) -> Response:
    _, record = await _own_task(task_id)
    return json_response(record.to_dict(), headers={"X-Task-Id": record.id})


@blueprint.post("/api/tasks/<task_id>/stop")
@blueprint.post("/api/tasks/stop/<task_id>")
async def stop_task(task_id: str) -> Response:
    """Stop the caller's task and answer it once ended. Cancelling the request
    only stops the wait: the stop has already been given."""
    await _own_task(task_id)
    manager = runtime().manager
    await manager.stop(task_id, "stop")
    record = await manager.wait_ended(task_id)
    if record is None:
        raise _not_found(task_id)
    return json_response(record.to_dict(), headers={"X-Task-Id": record.id})


@blueprint.post("/api/chats/<chat_id>/stop")
async def stop_chat(chat_id: str) -> Response:
    """Stop every task of the caller in a chat. Cancelling the request only
    stops the wait."""
    user = current_user()
    manager = runtime().manager
    records = await manager.store.list_tasks(user, chat_id=chat_id)
    for record in records:
        await manager.stop(record.id, "stop")
    ended = [await manager.wait_ended(record.id) or record for record in records]
    return json_response(_task_list(ended))


def _task_list(records: list[TaskRecord]) -> dict[str, Any]:
    return TaskList.model_validate({"tasks": [r.to_dict() for r in records]}).model_dump()


@blueprint.get("/api/tasks/<task_id>/events")
async def task_events(task_id: str) -> Response:
    """The task's events as SSE. Closing the connection ends the reader only."""
    _, record = await _own_task(task_id)
    after = _cursor()
    response = Response(_events(runtime(), record, after), headers=sse_headers(record.id))
    response.timeout = None
    return response


def _cursor() -> int:
    raw = request.args.get("after") or request.headers.get("Last-Event-ID") or "0"
    try:
        after = int(raw)
    except ValueError:
        raise RequestError(
            400, "invalid_request", "'after' must be an integer.", param="after"
        ) from None
    if after < 0:
        raise RequestError(400, "invalid_request", "'after' must be >= 0.", param="after")
    return after


async def _events(rt: Runtime, record: TaskRecord, after: int) -> AsyncIterator[str]:
    """Replay the log past ``after``, then follow it live until the terminal event.

    Closing the connection ends only this reader; the task goes on. If the task store
    fails meanwhile (beyond what it rides out), the stream ends where it is: the client
    resumes from its last id (``Last-Event-ID``) once the store is back.
    """
    store = rt.manager.store
    task_id = record.id
    cursor = after
    try:
        with rt.manager.resume_span(record, "sse", after), store.reading(task_id):
            while (
                events := await next_events(
                    store, task_id, cursor, limit=500, wait_s=rt.settings.sse_keepalive_s
                )
            ) is not None:
                if not events:
                    yield sse.KEEPALIVE
                    continue
                for event in events:
                    cursor = event.seq
                    yield sse.event(event.json, id=event.seq)
                    if event.terminal:
                        return
    except BackendUnavailable as exc:
        log.warning("task=%s: its event stream ended early: %s", task_id, exc)
