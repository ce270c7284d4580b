"""``python -m bench --target URL``'s code path (bench/target.py), with a handful of samples:
against a Tether server of the fixtures (every scenario, each against its floor), and against
a server that is not Tether (the fake model: the scenarios that apply, and the report says
which were skipped and why)."""

from __future__ import annotations

from typing import Any

import trio

from bench.progress import Progress
from bench.remote_report import target_section
from bench.results import Results
from bench.target import SKIP_LEVELS, SKIP_NOT_TETHER, TargetConfig, run_target
from tests.conftest import WAIT, Fakes, Tether

TINY = TargetConfig(
    mode="test",
    first_token_rounds=3,
    ttid_rounds=3,
    stop_samples=2,
    resume_rounds=2,
    levels=(1, 3),
    level_timeout_s=WAIT,
)
# 20 tokens 10 ms apart: long enough for a stop after the first token to land mid-answer.
ANSWER: dict[str, Any] = {"kind": "text", "tokens": 20, "rate": 100}


async def _run(url: str, model: str | None) -> Results:
    results = Results("test-target", "test")
    with trio.fail_after(4 * WAIT):
        await run_target(url, None, model, TINY, Progress(quiet=True), results)
    return results


async def test_target_runs_every_scenario_against_tether(tether: Tether, fakes: Fakes) -> None:
    fakes.model.configure(default_reply=ANSWER)
    results = await _run(tether.base_url, "fake-model")
    fig = results.figures["target"]

    assert not results.errors, results.errors
    assert fig["kind"] == "tether"
    assert fig["floor"] == "/healthz"
    assert fig["ran"] == ["first_token", "time_to_task_id", "stop", "resume", "levels"]
    assert fig["skipped"] == []
    for row in fig["first_token"] + fig["tether"]:
        assert row["n"] > 0 and row["failures"] == 0, row
        assert row["ratio_p50"] is not None and row["ratio_p50"] > 0, row
    measures = [row["measure"] for row in fig["tether"]]
    assert any(m.startswith("stop -> task:cancelled") for m in measures)
    assert [(r["streams"], r["completed"], r["errors"]) for r in fig["levels"]] == [
        (1, 1, 0),
        (3, 3, 0),
    ]
    assert all(r["tokens"] == r["completed"] * 20 for r in fig["levels"])  # from `usage`
    # The stopped tasks ended cancelled with the part of the answer they had, and their
    # model streams were closed at the fake.
    answer = await tether.client.get("/api/tasks?include_finished=true")
    cancelled = [t for t in answer.json()["tasks"] if t["status"] == "cancelled"]
    assert len(cancelled) >= TINY.stop_samples
    for task in cancelled:
        assert task["cancel_reason"] == "stop"
    stopped_mid_answer = [t for t in cancelled if t["content"]]
    assert len(stopped_mid_answer) >= TINY.stop_samples
    for task in stopped_mid_answer:
        assert task["content"].startswith("tok0 ")
        assert len(task["content"]) < len("".join(f"tok{i} " for i in range(20)))
    with trio.fail_after(WAIT):
        await fakes.model.wait_all_closed()

    text = "\n".join(target_section(results))
    assert "a Tether server" in text and "### Load levels" in text
    assert "### Skipped" not in text


async def test_target_that_is_not_tether_gets_what_applies(fakes: Fakes) -> None:
    results = await _run(fakes.model.base_url, None)
    fig = results.figures["target"]

    assert not results.errors, results.errors
    assert fig["kind"] == "other"
    assert fig["model"] == "fake-model"  # the first of its /v1/models
    assert fig["floor"] == "/v1/models"  # it has no health route
    assert fig["ran"] == ["first_token"]
    assert all(row["n"] == TINY.first_token_rounds for row in fig["first_token"])
    assert {s["scenario"]: s["reason"] for s in fig["skipped"]} == {
        "time_to_task_id": SKIP_NOT_TETHER,
        "stop": SKIP_NOT_TETHER,
        "resume": SKIP_NOT_TETHER,
        "levels": SKIP_LEVELS,
    }
    text = "\n".join(target_section(results))
    assert "not a Tether server" in text
    assert "### Skipped" in text
    assert f"- `levels`: {SKIP_LEVELS}" in text
    assert f"- `stop`: {SKIP_NOT_TETHER}" in text
