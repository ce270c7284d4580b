"""The chat page at / in a real Chromium: Stop from the first moment, stops in every phase,
reload and second tabs that lose nothing, keys, and output that never runs as code.

How the browser is driven (see tests/browser.py): the server and the loopback fakes run in
the test's trio loop as everywhere else; each test hands a scenario to Playwright's sync API
in a worker thread, which drives Debian's chromium, and calls back into trio (``on_trio``)
to wait on what the fakes and the server saw. Waits are on conditions (Playwright's
``expect``, the fakes' records), never fixed sleeps. The page is used only through its
``data-testid`` hooks and its visible controls, as a person or an automation would.

Set ``TETHER_TEST_SCREENSHOT_DIR`` to keep the screenshots the tests take (docs/chat-page.md's
come from ``TETHER_TEST_SCREENSHOT_DIR=docs``); otherwise they go to the test's temporary folder.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio
from playwright.sync_api import BrowserContext, Page, expect

from fakes.model import DieMidwayReply, HangReply, TextReply, ToolCallReply
from tests.browser import CuttableProxy, PageErrors, in_browser, on_trio, require_chromium
from tests.conftest import Fakes, Tether

KEYS = {"key-alice": "alice"}
# A WebSocket opened from the page, reporting how it went: open, closed (with its code)
# without ever opening, or blocked by the page's Content-Security-Policy.
OPEN_WS = """url => new Promise(resolve => {
  document.addEventListener("securitypolicyviolation",
    e => resolve("csp " + e.effectiveDirective), {once: true});
  try {
    const ws = new WebSocket(url);
    ws.onopen = () => { ws.close(); resolve("open"); };
    ws.onclose = e => resolve("closed " + e.code);
  } catch (e) {
    resolve("threw " + e.name);
  }
})"""


@pytest.fixture(autouse=True)
def chromium() -> str:
    return require_chromium()


def open_page(context: BrowserContext, url: str) -> tuple[Page, PageErrors]:
    """A new tab at ``url``, connected to its server (the connection line says so)."""
    page = context.new_page()
    errors = PageErrors(page)
    page.goto(url)
    expect(page.locator("#connection")).to_have_text("Connected")
    return page, errors


def ask(page: Page, question: str, *, web_search: bool = False) -> None:
    page.get_by_test_id("web-search").set_checked(web_search)
    page.get_by_test_id("prompt").fill(question)
    page.get_by_test_id("send").click()


def task_id_of(page: Page) -> str:
    """The task id of the last answer on the page."""
    task_id = page.locator("article.turn").last.get_attribute("data-task-id")
    assert task_id
    return task_id


def screenshot(page: Page, name: str, fallback: Path) -> None:
    folder = Path(os.environ.get("TETHER_TEST_SCREENSHOT_DIR") or fallback)
    folder.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(folder / name))


def tokens(count: int) -> str:
    """The text the fake model streams as ``TextReply(tokens=count)``, as the page shows it."""
    return " ".join(f"tok{i}" for i in range(count))


def assert_streams_every_token_once(page: Page, count: int) -> None:
    """The answer streams on as the fake model's ``count`` tokens, each once and in order,
    both while it runs (the terminal event's full text would hide a repeated delta) and at
    the end."""
    answer = page.get_by_test_id("answer")
    expect(answer).to_contain_text(f"tok{count // 3} ")
    assert page.get_by_test_id("task-state").inner_text() == "running", "ended too soon"
    shown = answer.inner_text()
    assert tokens(count).startswith(shown), shown
    expect(page.get_by_test_id("task-state")).to_have_text("completed", timeout=30_000)
    expect(answer).to_have_text(tokens(count))


async def test_stop_during_a_30_s_search_ends_it_cancelled_in_web_search(
    start_tether: Callable[..., Any], fakes: Fakes, tmp_path: Path
) -> None:
    fakes.search.configure(delay=30)
    tether: Tether = await start_tether()

    def scenario(context: BrowserContext) -> str:
        page, errors = open_page(context, tether.base_url)
        ask(page, "What is structured concurrency?", web_search=True)
        expect(page.get_by_test_id("stop")).to_be_enabled(timeout=1000)
        on_trio(fakes.search.wait_for_request, "/search")
        expect(page.get_by_test_id("status")).to_have_text(
            "Searching: What is structured concurrency?"
        )
        expect(page.get_by_test_id("task-state")).to_have_text("running")
        screenshot(page, "page-searching.png", tmp_path)
        page.get_by_test_id("stop").click()
        expect(page.get_by_test_id("task-state")).to_have_text("cancelled")
        expect(page.get_by_test_id("status")).to_have_text("Stopped during the web search.")
        expect(page.get_by_test_id("stop")).to_be_disabled()
        # The stop, not the end of the test, closed the search: wait for it here.
        on_trio(fakes.search.wait_all_closed)
        screenshot(page, "page-stopped.png", tmp_path)
        errors.assert_none()
        return task_id_of(page)

    task_id = await in_browser(scenario, viewport={"width": 960, "height": 540})
    # (Besides the start-up check's request to "/", closed after its answer.)
    [connection] = [c for c in fakes.search.connections if "/search" in c.paths]
    assert connection.closed_by == "client"
    task = (await tether.client.get(f"/api/tasks/{task_id}")).json()
    assert (task["status"], task["phase"], task["cancel_reason"]) == (
        "cancelled",
        "web_search",
        "stop",
    )


async def test_skip_search_while_a_page_is_read_answers_from_the_sources_found(
    start_tether: Callable[..., Any], fakes: Fakes, tmp_path: Path
) -> None:
    base = fakes.pages.base_url
    fakes.search.configure(
        results=[
            {"url": base + "/page/quick", "title": "Quick page", "content": "quick snippet"},
            {"url": base + "/slow/30", "title": "Slow page", "content": "slow snippet"},
        ]
    )
    fakes.model.push(TextReply(["Answered from what the search found."]))
    tether: Tether = await start_tether()

    def scenario(context: BrowserContext) -> str:
        page, errors = open_page(context, tether.base_url)
        skip = page.get_by_test_id("skip-search")
        expect(skip).to_be_hidden()
        ask(page, "What did the search find?", web_search=True)
        slow = on_trio(fakes.pages.wait_for_request, "/slow/30")
        expect(skip).to_be_enabled()
        expect(page.get_by_test_id("stop")).to_be_enabled()
        screenshot(page, "page-skip-search.png", tmp_path)
        skip.click()
        # The skip, not the end of the test, closed the slow page's connection.
        on_trio(fakes.pages.wait_connection_closed, slow.conn_id)
        expect(page.get_by_test_id("task-state")).to_have_text("completed")
        expect(page.get_by_test_id("answer")).to_have_text("Answered from what the search found.")
        # Both results are sources: the slow page with its snippet, as the search gave it.
        expect(page.get_by_test_id("sources").locator("li")).to_have_text(
            ["Quick page", "Slow page"]
        )
        expect(page.get_by_role("list", name="Progress").locator("li.skipped")).to_have_text(
            "Web search skipped: answering from 2 sources found"
        )
        expect(skip).to_be_hidden()
        expect(page.get_by_test_id("status")).to_have_text("Completed")
        errors.assert_none()
        return task_id_of(page)

    task_id = await in_browser(scenario)
    events = await tether.events(task_id)
    [skipped] = [e["data"] for e in events if e["type"] == "status" and e["data"].get("skipped")]
    assert (skipped["step"], skipped["by"]) == ("web_search", "local")
    task = (await tether.client.get(f"/api/tasks/{task_id}")).json()
    assert task["status"] == "completed"
    assert [s["title"] for s in task["sources"]] == ["Quick page", "Slow page"]
    # The model got both, the slow one as its snippet.
    [system] = [m for m in fakes.model.chat_requests[-1]["messages"] if m["role"] == "system"]
    assert "quick snippet" not in system["content"] and "slow snippet" in system["content"]


async def test_skip_search_while_the_search_hangs_answers_without_sources(
    start_tether: Callable[..., Any], fakes: Fakes
) -> None:
    fakes.search.configure(delay=30)
    fakes.model.push(TextReply(["Answered without sources."]))
    tether: Tether = await start_tether()

    def scenario(context: BrowserContext) -> None:
        page, errors = open_page(context, tether.base_url)
        ask(page, "Search for ever", web_search=True)
        request = on_trio(fakes.search.wait_for_request, "/search")
        page.get_by_test_id("skip-search").click()
        on_trio(fakes.search.wait_connection_closed, request.conn_id)
        expect(page.get_by_test_id("task-state")).to_have_text("completed")
        expect(page.get_by_test_id("answer")).to_have_text("Answered without sources.")
        expect(page.get_by_test_id("sources").locator("li")).to_have_count(0)
        expect(page.get_by_role("list", name="Progress").locator("li.skipped")).to_have_text(
            "Web search skipped: answering from 0 sources found"
        )
        expect(page.get_by_test_id("skip-search")).to_be_hidden()
        errors.assert_none()

    await in_browser(scenario)
    # The skip closed it (the client side), not the fake's own end of the 30 s wait.
    [connection] = [c for c in fakes.search.connections if "/search" in c.paths]
    assert connection.closed_by == "client"


async def test_skip_on_a_running_tool_call_gives_the_model_a_result_that_says_so(
    start_tether: Callable[..., Any], fakes: Fakes, tmp_path: Path
) -> None:
    slow_url = fakes.pages.base_url + "/slow/30"
    fakes.model.push(
        ToolCallReply([("fetch_url", {"url": slow_url})]),
        TextReply(["Went on without the page."]),
    )
    tether: Tether = await start_tether()

    def scenario(context: BrowserContext) -> str:
        page, errors = open_page(context, tether.base_url)
        page.get_by_label("Fetch URL").check()
        ask(page, "Read that slow page")
        slow = on_trio(fakes.pages.wait_for_request, "/slow/30")
        skip = page.get_by_test_id("skip-tool")
        expect(skip).to_have_count(1)
        step = skip.get_attribute("data-step")
        assert step
        expect(page.get_by_test_id("skip-search")).to_be_hidden()  # no search in this one
        screenshot(page, "page-skip-tool.png", tmp_path)
        skip.click()
        on_trio(fakes.pages.wait_connection_closed, slow.conn_id)
        expect(page.get_by_test_id("task-state")).to_have_text("completed")
        expect(page.get_by_test_id("answer")).to_have_text("Went on without the page.")
        expect(page.get_by_role("list", name="Progress").locator("li.skipped")).to_have_text(
            "fetch_url skipped: no result"
        )
        expect(page.get_by_test_id("skip-tool")).to_have_count(0)  # gone with the call
        errors.assert_none()
        return step

    step = await in_browser(scenario)
    results = {
        m["tool_call_id"]: m["content"]
        for m in fakes.model.chat_requests[-1]["messages"]
        if m["role"] == "tool"
    }
    assert results == {step: "The user skipped this call of fetch_url: no result."}


# tether.js's skip from a page: each answer in order, as the promise of its own skip.
SKIPS = """async taskId => {
  const { TetherClient } = await import("/static/tether.js");
  const client = new TetherClient();
  await client.connect();
  const outcome = (promise) => promise.then(
    (answer) => ({ answer }),
    (error) => ({ code: error.code, param: error.param, step: error.step }));
  const results = await Promise.all([
    outcome(client.skip(taskId, "web_search")),
    outcome(client.skip(taskId, "call_never_made")),
    outcome(client.skip("task_nope", "web_search")),
  ]);
  client.close();
  return results;
}"""


async def test_the_client_skip_rejects_with_the_servers_error(
    start_tether: Callable[..., Any], fakes: Fakes
) -> None:
    tether: Tether = await start_tether()

    def scenario(context: BrowserContext) -> Any:
        page, errors = open_page(context, tether.base_url)
        ask(page, "Search, then try to skip it", web_search=True)
        expect(page.get_by_test_id("task-state")).to_have_text("completed")
        expect(page.get_by_test_id("skip-search")).to_be_hidden()
        results = page.evaluate(SKIPS, task_id_of(page))
        errors.assert_none()
        return task_id_of(page), results

    task_id, results = await in_browser(scenario)
    assert results == [
        {
            "code": "step_ended",
            "param": "step",
            "step": {"task_id": task_id, "step": "web_search", "state": "completed"},
        },
        {"code": "not_found", "param": "step", "step": None},
        {"code": "not_found", "param": "task_id", "step": None},
    ]


async def test_stop_right_after_send_stops_the_task_before_its_id_is_shown(
    start_tether: Callable[..., Any], fakes: Fakes
) -> None:
    fakes.search.configure(delay=30)
    tether: Tether = await start_tether()

    def scenario(context: BrowserContext) -> str:
        page, errors = open_page(context, tether.base_url)
        page.get_by_test_id("web-search").check()
        page.get_by_test_id("prompt").fill("Stop me at once")
        # Both clicks in one turn of the page's event loop: the stop comes before the
        # server's answer with the task id can have arrived.
        page.evaluate("""() => {
          document.querySelector('[data-testid=send]').click();
          document.querySelector('[data-testid=stop]').click();
        }""")
        expect(page.get_by_test_id("task-state")).to_have_text("cancelled")
        errors.assert_none()
        return task_id_of(page)

    task_id = await in_browser(scenario)
    task = (await tether.client.get(f"/api/tasks/{task_id}")).json()
    assert (task["status"], task["cancel_reason"]) == ("cancelled", "stop")
    assert task["phase"] in ("queued", "web_search")


async def test_stop_during_generation_keeps_the_partial_text(
    start_tether: Callable[..., Any], fakes: Fakes
) -> None:
    fakes.model.push(TextReply(tokens=400, rate=20))
    tether: Tether = await start_tether()

    def scenario(context: BrowserContext) -> tuple[str, str]:
        page, errors = open_page(context, tether.base_url)
        ask(page, "Tell me a long story")
        expect(page.get_by_test_id("answer")).to_contain_text("tok5")
        page.get_by_test_id("stop").click()
        expect(page.get_by_test_id("task-state")).to_have_text("cancelled")
        expect(page.get_by_test_id("status")).to_have_text("Stopped while writing the answer.")
        errors.assert_none()
        return task_id_of(page), page.get_by_test_id("answer").inner_text()

    task_id, shown = await in_browser(scenario)
    task = (await tether.client.get(f"/api/tasks/{task_id}")).json()
    assert (task["status"], task["phase"]) == ("cancelled", "generating")
    assert shown.startswith(tokens(6))
    assert shown == task["content"].strip()  # the whole partial answer, as the server has it


async def test_a_failed_answer_keeps_its_partial_text_and_says_why(
    start_tether: Callable[..., Any], fakes: Fakes
) -> None:
    fakes.model.push(DieMidwayReply(["partial ", "answer "]))
    tether: Tether = await start_tether()

    def scenario(context: BrowserContext) -> None:
        page, errors = open_page(context, tether.base_url)
        ask(page, "Will this work?")
        expect(page.get_by_test_id("task-state")).to_have_text("failed")
        expect(page.get_by_test_id("answer")).to_have_text("partial answer")
        expect(page.get_by_test_id("status")).to_contain_text(
            "Failed while writing the answer (upstream error)"
        )
        errors.assert_none()

    await in_browser(scenario)


async def test_keyboard_enter_sends_shift_enter_adds_a_line_escape_stops(
    start_tether: Callable[..., Any], fakes: Fakes
) -> None:
    fakes.model.push(HangReply())
    tether: Tether = await start_tether()

    def scenario(context: BrowserContext) -> None:
        page, errors = open_page(context, tether.base_url)
        prompt = page.get_by_test_id("prompt")
        prompt.click()
        page.keyboard.type("line one")
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("line two")
        expect(prompt).to_have_value("line one\nline two")
        assert page.get_by_test_id("task-state").count() == 0  # nothing was sent
        page.keyboard.press("Enter")
        expect(page.get_by_test_id("task-state")).to_have_text("running")
        chat = on_trio(fakes.model.wait_for_request, "/v1/chat/completions")
        expect(page.locator(".question")).to_have_text("line one\nline two")
        page.keyboard.press("Escape")
        expect(page.get_by_test_id("task-state")).to_have_text("cancelled")
        # The stop closed the answer's model connection (another, idle in the pool after
        # an earlier request such as the model list, may stay open).
        on_trio(fakes.model.wait_connection_closed, chat.conn_id)
        errors.assert_none()

    await in_browser(scenario)


async def test_reload_mid_stream_ends_with_the_whole_answer(
    start_tether: Callable[..., Any], fakes: Fakes
) -> None:
    fakes.model.push(TextReply(tokens=120, rate=20))
    tether: Tether = await start_tether(ws_reconnect_grace_s=10)

    def scenario(context: BrowserContext) -> None:
        page, errors = open_page(context, tether.base_url)
        ask(page, "Count for me")
        expect(page.get_by_test_id("answer")).to_contain_text("tok5")
        session = page.evaluate("sessionStorage.getItem('tether.session')")
        task_id = task_id_of(page)
        page.reload()
        errors = PageErrors(page)
        expect(page.locator("#connection")).to_have_text("Connected")
        record = on_trio(tether.runtime.manager.store.get, task_id)
        assert record is not None and record.active, "the reload came after the answer ended"
        assert_streams_every_token_once(page, 120)
        expect(page.locator(".question")).to_have_text("Count for me")
        assert task_id_of(page) == task_id
        assert page.evaluate("sessionStorage.getItem('tether.session')") == session
        errors.assert_none()

    await in_browser(scenario)


async def test_a_dropped_connection_reconnects_and_the_answer_goes_on_without_loss(
    start_tether: Callable[..., Any], fakes: Fakes, nursery: trio.Nursery
) -> None:
    fakes.model.push(TextReply(tokens=120, rate=20))
    tether: Tether = await start_tether(ws_reconnect_grace_s=10)
    proxy = CuttableProxy(int(tether.base_url.rsplit(":", 1)[1]))
    await proxy.start(nursery)

    def scenario(context: BrowserContext) -> None:
        page, errors = open_page(context, proxy.base_url)
        ask(page, "Count for me")
        expect(page.get_by_test_id("answer")).to_contain_text("tok5")
        session = page.locator("body").get_attribute("data-session")
        trio.from_thread.run_sync(proxy.cut)
        assert_streams_every_token_once(page, 120)
        expect(page.locator("#connection")).to_have_text("Connected")
        assert page.locator("body").get_attribute("data-session") == session
        assert proxy.websockets >= 2, "the page did not reconnect"
        errors.assert_none()

    await in_browser(scenario)


async def test_two_tabs_of_one_session_show_the_same_task_live(
    start_tether: Callable[..., Any], fakes: Fakes
) -> None:
    fakes.model.push(TextReply(tokens=60, rate=20), TextReply(["second ", "answer"], interval=0.05))
    tether: Tether = await start_tether(ws_reconnect_grace_s=10)

    def scenario(context: BrowserContext) -> None:
        first, first_errors = open_page(context, tether.base_url)
        ask(first, "First question")
        expect(first.get_by_test_id("answer")).to_contain_text("tok3")
        session = first.locator("body").get_attribute("data-session")
        # The second tab joins mid-answer: it replays what came before, then follows live.
        second, second_errors = open_page(context, f"{tether.base_url}/#session={session}")
        expect(second.get_by_test_id("task-state")).to_have_text("running")
        for tab in (first, second):
            expect(tab.get_by_test_id("task-state")).to_have_text("completed")
            expect(tab.get_by_test_id("answer")).to_have_text(tokens(60))
        assert task_id_of(first) == task_id_of(second)
        assert second.locator("body").get_attribute("data-session") == session
        # A question asked in one tab shows up in the other as it is answered.
        ask(first, "Second question")
        for tab in (second, first):
            expect(tab.get_by_test_id("task-state")).to_have_text("completed")
            expect(tab.get_by_test_id("answer")).to_have_text("second answer")
        expect(second.locator(".question").last).to_have_text("Second question")
        assert task_id_of(first) == task_id_of(second)
        first_errors.assert_none()
        second_errors.assert_none()

    await in_browser(scenario)


async def test_with_keys_a_wrong_key_shows_a_clear_error(
    start_tether: Callable[..., Any], fakes: Fakes
) -> None:
    tether: Tether = await start_tether(api_keys=KEYS)

    def scenario(context: BrowserContext) -> None:
        page = context.new_page()
        errors = PageErrors(page)
        page.goto(tether.base_url)
        key_error = page.get_by_test_id("key-error")
        expect(key_error).to_have_text("This server needs an API key.")
        expect(page.get_by_test_id("send")).to_be_disabled()
        page.get_by_label("API key").fill("key-mallory")
        page.get_by_role("button", name="Use key").click()
        expect(key_error).to_have_text("The server refused this API key: Invalid API key.")
        expect(page.get_by_test_id("send")).to_be_disabled()
        page.get_by_label("API key").fill("key-alice")
        page.get_by_role("button", name="Use key").click()
        expect(page.locator("#connection")).to_have_text("Connected")
        expect(key_error).to_be_hidden()
        ask(page, "Hello?")
        expect(page.get_by_test_id("task-state")).to_have_text("completed")
        expect(page.get_by_test_id("answer")).to_have_text("Hello from the fake model.")
        assert page.evaluate("localStorage.getItem('tether.apiKey')") == "key-alice"
        assert "key-alice" not in page.url
        errors.assert_none()

    await in_browser(scenario)
    [task] = (
        await tether.client.get(
            "/api/tasks?include_finished=true", headers={"Authorization": "Bearer key-alice"}
        )
    ).json()["tasks"]
    assert task["user"] == "alice"


async def test_markup_in_model_output_and_page_titles_is_never_executed(
    start_tether: Callable[..., Any], fakes: Fakes
) -> None:
    # Search titles are HTML fragments: the entities reach the page as the characters < >.
    fakes.search.configure(
        results=[
            {
                "url": fakes.pages.base_url + "/page/1",
                "title": '&lt;img src=y onerror="window.pwned=4"&gt;A title',
                "content": "A snippet.",
            }
        ]
    )
    fakes.model.push(
        TextReply(
            [
                '<img src=x onerror="window.pwned=1">',
                " <script>window.pwned=2</script>",
                " **bold** and [a link](javascript:window.pwned=3) [1]",
                ' <a href="#" onclick="window.pwned=5">click</a>',
            ]
        )
    )
    tether: Tether = await start_tether()

    def scenario(context: BrowserContext) -> None:
        page, errors = open_page(context, tether.base_url)
        ask(page, "Show me markup", web_search=True)
        expect(page.get_by_test_id("task-state")).to_have_text("completed")
        answer = page.get_by_test_id("answer")
        expect(answer.locator("strong")).to_have_text("bold")  # Markdown is rendered...
        expect(answer.locator("[onerror], [onclick], script")).to_have_count(0)  # ...clean
        expect(answer.locator("a[href^='javascript']")).to_have_count(0)
        expect(answer.locator("a.cite")).to_have_attribute("href", f"#src-{task_id_of(page)}-1")
        sources = page.get_by_test_id("sources")
        expect(sources).to_have_text('<img src=y onerror="window.pwned=4">A title')
        expect(sources.locator("img")).to_have_count(0)
        answer.get_by_text("click", exact=True).click()
        answer.get_by_text("a link", exact=True).click()
        assert page.evaluate("window.pwned") is None
        errors.assert_none()

    await in_browser(scenario)


async def test_a_local_source_link_opens_its_document_in_a_new_tab(
    start_tether: Callable[..., Any],
) -> None:
    tether: Tether = await start_tether(
        llm_base_url=None,
        default_model="local",
        search_provider="local",
        search_query_generation=True,
    )

    def scenario(context: BrowserContext) -> None:
        page, errors = open_page(context, tether.base_url)
        ask(page, "How does Tether cancel a web search?", web_search=True)
        expect(page.get_by_test_id("task-state")).to_have_text("completed")
        link = page.get_by_test_id("sources").get_by_role("link", name="The web search pipeline")
        # The source's URL is relative to the server: the link resolves it against the page.
        document_url = tether.base_url + "/api/local-docs/web-search.md"
        expect(link).to_have_attribute("href", document_url)
        with context.expect_page() as opened:
            link.click()
        document = opened.value
        document.wait_for_load_state()
        assert document.url == document_url
        expect(document.locator("body")).to_contain_text("# The web search pipeline")
        errors.assert_none()

    await in_browser(scenario)


async def test_a_websocket_from_another_origin_is_refused(
    start_tether: Callable[..., Any], fakes: Fakes
) -> None:
    tether: Tether = await start_tether()

    def scenario(context: BrowserContext) -> None:
        elsewhere = context.new_page()
        elsewhere.goto(fakes.pages.base_url + "/page/1")  # another port: another origin
        assert elsewhere.evaluate(OPEN_WS, tether.ws_url) == "closed 1006"
        own, errors = open_page(context, tether.base_url)
        # The page's own origin may (connect-src 'self' covers ws: to the same host and
        # port in Chromium), and its CSP keeps it from connecting anywhere else.
        assert own.evaluate(OPEN_WS, tether.ws_url) == "open"
        blocked = fakes.pages.base_url.replace("http://", "ws://") + "/ws"
        assert own.evaluate(OPEN_WS, blocked) == "csp connect-src"
        errors.assert_none()

    await in_browser(scenario)
    assert not fakes.pages.requests_for("/ws")  # the CSP stopped it before any request


async def test_the_page_fits_a_phone(
    start_tether: Callable[..., Any], fakes: Fakes, tmp_path: Path
) -> None:
    tether: Tether = await start_tether()

    def scenario(context: BrowserContext) -> None:
        page, errors = open_page(context, tether.base_url)
        ask(
            page,
            "A question from a phone, long enough to wrap over several lines of text",
            web_search=True,
        )
        expect(page.get_by_test_id("task-state")).to_have_text("completed")
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
        for hook in ("prompt", "send", "stop", "web-search", "model"):
            expect(page.get_by_test_id(hook)).to_be_in_viewport()
        screenshot(page, "page-phone.png", tmp_path)
        errors.assert_none()

    await in_browser(scenario, viewport={"width": 360, "height": 740})
