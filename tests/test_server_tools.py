"""The server-side tools (server/providers/tools/): the calculator's arithmetic and what it
refuses, current_time, the registry's schemas, and fetch_url over the page reader. fetch_url
is checked for what it makes of a page, so its pages come from httpx2's MockTransport
(tests/mock_upstream.py); the page reader's connection is tested in test_page_reader.py."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import httpx2
import pytest

from server.config import Settings
from server.providers.tools.base import ToolError
from server.providers.tools.calculator import CalculatorTool, evaluate
from server.providers.tools.current_time import CurrentTimeTool
from server.providers.tools.fetch_url import FetchUrlTool
from server.providers.tools.registry import build_tools
from server.providers.web.fetch import HttpPageReader
from tests.mock_upstream import MockUpstream


@pytest.fixture
def upstream() -> MockUpstream:
    return MockUpstream("http://pages.test")


@pytest.fixture
async def http(upstream: MockUpstream) -> AsyncIterator[httpx2.AsyncClient]:
    async with upstream.client() as client:
        yield client


# --------------------------------------------------------------------------- calculator


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", "7"),
        ("(1 + 2) * 3", "9"),
        ("2 ^ 10", "1024"),
        ("2 ** -1", "0.5"),
        ("7 // 2", "3"),
        ("7 % 3", "1"),
        ("10 / 4", "2.5"),
        ("10 / 2", "5"),
        ("-3 + +4", "1"),
        ("sqrt(16)", "4"),
        ("sqrt(2)", "1.41421356237"),
        ("round(2.567, 2)", "2.57"),
        ("max(3, 9, 4) - min(3, 9, 4)", "6"),
        ("abs(-12)", "12"),
        ("log(8, 2)", "3"),
        ("sin(0) + cos(0)", "1"),
        ("2 * pi", "6.28318530718"),
        ("e", "2.71828182846"),
        ("0.1 + 0.2", "0.3"),
        ("12345678901234567890 * 10", "123456789012345678900"),
    ],
)
async def test_calculator_evaluates_arithmetic(expression: str, expected: str) -> None:
    assert await CalculatorTool().run({"expression": expression}) == expected


@pytest.mark.parametrize(
    "expression",
    [
        "__import__('os')",
        "__import__('os').system('true')",
        "open('/etc/passwd')",
        "x + 1",
        "(1).real",
        "pi.__class__",
        "'a' * 3",
        "[1, 2]",
        "True + 1",
        "lambda: 1",
        "1 if 1 else 2",
        "1 < 2",
        "sqrt(x=4)",
        "",
        "1 +",
    ],
)
async def test_calculator_rejects_anything_but_arithmetic(expression: str) -> None:
    with pytest.raises(ToolError):
        await CalculatorTool().run({"expression": expression})


@pytest.mark.parametrize(
    "expression", ["9 ** 99999", "2 ** 10 ** 10", "10 ** 3000 * 10 ** 3000", "1e300 ** 2"]
)
async def test_calculator_refuses_huge_results(expression: str) -> None:
    with pytest.raises(ToolError):
        evaluate(expression)


@pytest.mark.parametrize("expression", ["1 / 0", "1 // 0", "5 % 0", "0 ** -1"])
async def test_calculator_reports_division_by_zero(expression: str) -> None:
    with pytest.raises(ToolError, match="division by zero"):
        evaluate(expression)


async def test_calculator_refuses_deep_nesting_and_long_input() -> None:
    with pytest.raises(ToolError):
        evaluate("-" * 500 + "1")
    with pytest.raises(ToolError):
        evaluate("1+" * 600 + "1")


async def test_calculator_needs_an_expression_string() -> None:
    with pytest.raises(ToolError):
        await CalculatorTool().run({})
    with pytest.raises(ToolError):
        await CalculatorTool().run({"expression": 42})


# ------------------------------------------------------------- current_time, registry, fetch_url


async def test_current_time_is_utc_iso_8601_by_default() -> None:
    fixed = datetime(2025, 3, 1, 12, 30, 5, tzinfo=UTC)
    tool = CurrentTimeTool(clock=lambda: fixed)
    assert await tool.run({}) == "2025-03-01T12:30:05+00:00"
    assert datetime.fromisoformat(await CurrentTimeTool().run({})).tzinfo is not None


async def test_current_time_converts_to_an_iana_zone() -> None:
    fixed = datetime(2025, 7, 1, 12, 0, 0, tzinfo=UTC)
    tool = CurrentTimeTool(clock=lambda: fixed)
    assert await tool.run({"timezone": "Europe/Paris"}) == "2025-07-01T14:00:00+02:00"


@pytest.mark.parametrize("zone", ["Mars/Olympus_Mons", "../../etc/passwd", 5])
async def test_current_time_rejects_unknown_zones(zone: object) -> None:
    with pytest.raises(ToolError):
        await CurrentTimeTool().run({"timezone": zone})


async def test_build_tools_names_the_three_tools_with_json_schemas(
    http: httpx2.AsyncClient,
) -> None:
    tools = build_tools(Settings(), HttpPageReader(http, Settings()))
    assert set(tools) == {"calculator", "current_time", "fetch_url"}
    for name, tool in tools.items():
        schema = tool.spec.openai_schema()
        assert schema["function"]["name"] == name
        assert schema["function"]["parameters"]["type"] == "object"
        json.dumps(schema)


async def test_fetch_url_tool_returns_title_and_text(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    page = b"<html><head><title>Cats</title></head><body><p>Cats purr.</p></body></html>"
    upstream.route(
        "GET",
        "/cats",
        httpx2.Response(200, content=page, headers={"content-type": "text/html; charset=utf-8"}),
    )
    tool = FetchUrlTool(HttpPageReader(http, Settings()))
    assert await tool.run({"url": upstream.base_url + "/cats"}) == "Title: Cats\n\nCats purr."


async def test_fetch_url_tool_turns_page_errors_into_tool_errors(
    upstream: MockUpstream, http: httpx2.AsyncClient
) -> None:
    upstream.route(
        "GET",
        "/missing",
        httpx2.Response(404, content=b"nope", headers={"content-type": "text/plain"}),
    )
    tool = FetchUrlTool(HttpPageReader(http, Settings()))
    with pytest.raises(ToolError, match="404"):
        await tool.run({"url": upstream.base_url + "/missing"})
    with pytest.raises(ToolError):
        await tool.run({"url": "file:///etc/passwd"})
