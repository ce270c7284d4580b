"""What went wrong, read out of the exception groups that nurseries and task groups wrap
around it (server/exception_groups.py: the task's error, Redis's ping, an MCP session)."""

from __future__ import annotations

import trio

from server.exception_groups import first_leaf


async def _a_cancelled() -> trio.Cancelled:
    with trio.CancelScope() as scope:
        scope.cancel()
        try:
            await trio.lowlevel.checkpoint()
        except trio.Cancelled as exc:
            return exc
    raise AssertionError("the checkpoint was not cancelled")


def test_an_exception_that_is_no_group_is_its_own_leaf() -> None:
    failure = ValueError("bad")
    assert first_leaf(failure) is failure


def test_the_first_leaf_of_nested_groups_is_found() -> None:
    cause = ConnectionRefusedError("refused")
    group = ExceptionGroup("outer", [ExceptionGroup("inner", [cause, KeyError("k")])])
    assert first_leaf(group) is cause


async def test_a_cancel_beside_a_failure_is_passed_over_for_the_failure() -> None:
    cancelled = await _a_cancelled()
    cause = ValueError("the failure")
    assert first_leaf(BaseExceptionGroup("g", [cancelled, cause])) is cause
    assert first_leaf(BaseExceptionGroup("g", [cancelled])) is cancelled
