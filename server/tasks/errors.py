"""Why the task layer refuses something, in its own terms. The API layer maps each to its
HTTP status and error body (``server.api.common.refusal``); nothing here knows HTTP."""

from __future__ import annotations


class TaskRefused(Exception):
    """A task (or a session) that cannot be had; ``message`` is fit for the client."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class TooManyTasks(TaskRefused):
    """Admission is full: the global or the per-user limit of active tasks."""


class ShuttingDown(TaskRefused):
    """This process no longer starts tasks."""


class BackendUnavailable(TaskRefused):
    """The shared task state (Redis) did not answer in time, or failed."""


class UnknownSession(TaskRefused):
    """A session that belongs to another user: to the caller it does not exist."""

    def __init__(self, session_id: str) -> None:
        super().__init__(f"No session {session_id!r}.")
        self.session_id = session_id
