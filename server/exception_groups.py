"""Reading exception groups: a nursery or task group (trio's, anyio's in coredis and the
MCP SDK) wraps what its children raised, often more than once."""

from __future__ import annotations

import trio


def first_leaf(exc: BaseException) -> BaseException:
    """The exception that says what went wrong: ``exc`` itself, or, for a group, the first
    exception found by walking down its first members. A ``trio.Cancelled`` member is passed
    over when a sibling is something else: the cancel is usually the consequence (the group
    cancelled the other children after the failure), not the cause."""
    while isinstance(exc, BaseExceptionGroup):
        real = [e for e in exc.exceptions if not isinstance(e, trio.Cancelled)]
        exc = (real or list(exc.exceptions))[0]
    return exc
