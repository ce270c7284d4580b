"""Skipping one step of a task, as HTTP (``POST /api/tasks/{id}/skip``) and the WebSocket
(``skip``) both ask for it: one copy, so that both answer the same states and errors."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, Response

from server.api.common import current_user, json_response, read_json_body, runtime
from server.runtime import Runtime
from server.schemas import RequestError

blueprint = Blueprint("skip", __name__)


class StepEnded(RequestError):
    """409: the step has ended already; nothing changed. The answer says how it ended."""

    def __init__(self, task_id: str, step: str, state: str) -> None:
        super().__init__(
            409, "step_ended", f"The step {step!r} has ended already ({state}).", param="step"
        )
        self.step_state = {"task_id": task_id, "step": step, "state": state}

    def body(self) -> dict[str, Any]:
        return {**super().body(), "step": self.step_state}


async def skip_step(rt: Runtime, user: str, task_id: str, step: str) -> dict[str, Any]:
    """Skip the user's task's step wherever the task runs; its state after it, once the
    step has ended if the task runs here (``TaskManager.skip_step``). Raises 404 for another
    user's or an unknown task and for a step the task never began, 409 for a step that has
    ended (nothing changes). Cancelling it leaves the skip given or not."""
    if await rt.manager.get(user, task_id) is None:
        raise RequestError(404, "not_found", f"No task {task_id!r}.", param="task_id")
    outcome = await rt.manager.skip_step(task_id, step, user)
    if outcome is None:
        raise RequestError(404, "not_found", f"The task has no step {step!r}.", param="step")
    state, was_running = outcome
    if not was_running:
        raise StepEnded(task_id, step, state)
    return {"task_id": task_id, "step": step, "state": state}


@blueprint.post("/api/tasks/<task_id>/skip")
async def skip(task_id: str) -> Response:
    """Skip one step of the caller's task: the search phase (``web_search``), a page read
    (``page:<url>``) or a tool call (its id); the task goes on without it."""
    body = await read_json_body()
    step = body.get("step") if isinstance(body, dict) else None
    if not isinstance(step, str) or not step:
        raise RequestError(400, "invalid_request", "Missing field 'step'.", param="step")
    answer = await skip_step(runtime(), current_user(), task_id, step)
    return json_response(answer, headers={"X-Task-Id": task_id})
