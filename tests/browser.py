"""A real Chromium for the page's tests: Debian's ``chromium`` driven by Playwright.

Playwright's Python API is asyncio or sync, and these tests run on trio. The server and the
fakes run in the test's trio loop, as in every other test, so that a test can look at what
the fakes recorded (a search connection closed) and at the server's tasks directly. The
browser side runs with Playwright's sync API in one worker thread
(``trio.to_thread.run_sync``), which leaves the trio loop free to serve the browser, and a
scenario that needs to wait on the trio side calls back with ``on_trio``
(``trio.from_thread.run``). One thread holds the whole Playwright session because the sync
API is bound to the thread (and greenlet) that started it. A server in a subprocess would
have worked too, but then the fakes' records would be behind their control API.

Playwright's own browser download is never used: the tests launch ``/usr/bin/chromium``
(``apt-get install chromium``; ``TETHER_TEST_CHROMIUM`` names another). Without it they are
skipped, unless ``TETHER_TEST_REQUIRE_BROWSER=1`` (CI), which makes a missing browser a
failure. Every Playwright wait has a timeout, so a scenario cannot hang the thread, which
trio cannot cancel.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trio
from playwright.sync_api import BrowserContext, Page, sync_playwright

CHROMIUM = os.environ.get("TETHER_TEST_CHROMIUM", "/usr/bin/chromium")
# --no-sandbox: Chromium refuses to run as root with its sandbox, and containers often lack
# the user namespaces it needs otherwise; these tests load only pages of their own servers
# on loopback. The rest keep the browser from calling Google's services.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
TIMEOUT_MS = 15_000  # generous upper bound for anything a scenario waits on in the page
TRIO_WAIT_S = 15.0

T = TypeVar("T")


def require_chromium() -> str:
    """The Chromium to drive; skips the test without one (fails with
    ``TETHER_TEST_REQUIRE_BROWSER=1``)."""
    if Path(CHROMIUM).is_file() and os.access(CHROMIUM, os.X_OK):
        return CHROMIUM
    reason = (
        f"no Chromium at {CHROMIUM}: the browser tests need Debian's chromium "
        "(apt-get install chromium) or TETHER_TEST_CHROMIUM"
    )
    if os.environ.get("TETHER_TEST_REQUIRE_BROWSER") == "1":
        pytest.fail(reason + " (TETHER_TEST_REQUIRE_BROWSER=1)", pytrace=False)
    pytest.skip(reason)


async def in_browser(scenario: Callable[[BrowserContext], T], **context_options: Any) -> T:
    """Run ``scenario`` with a fresh browser context in a new Chromium, in a worker thread;
    returns what it returns. The browser is closed however the scenario ends."""
    return await trio.to_thread.run_sync(partial(_run, scenario, context_options))


def _run(scenario: Callable[[BrowserContext], T], context_options: dict[str, Any]) -> T:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=require_chromium(), args=CHROMIUM_ARGS)
        try:
            context = browser.new_context(**context_options)
            context.set_default_timeout(TIMEOUT_MS)
            return scenario(context)
        finally:
            browser.close()


def on_trio(afn: Callable[..., Awaitable[T]], *args: Any, timeout: float = TRIO_WAIT_S) -> T:
    """From a scenario: run ``afn(*args)`` in the test's trio loop and return its result."""

    async def bounded() -> T:
        with trio.fail_after(timeout):
            return await afn(*args)

    return trio.from_thread.run(bounded)


class PageErrors:
    """The uncaught JavaScript errors of a page, to assert there were none."""

    def __init__(self, page: Page) -> None:
        self.errors: list[str] = []
        page.on("pageerror", lambda error: self.errors.append(str(error)))

    def assert_none(self) -> None:
        assert not self.errors, self.errors


class CuttableProxy:
    """A loopback TCP proxy in front of a server, whose connections a test can cut at once,
    as a dropped network would: the browser sees its WebSocket close abnormally (1006), the
    server sees the client go. Pages are loaded through it, so they are same-origin with
    the WebSocket they open through it."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = 0
        self.websockets = 0  # connections that opened with an upgrade to /ws
        self._scopes: set[trio.CancelScope] = set()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, nursery: trio.Nursery) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        self.port = listeners[0].socket.getsockname()[1]
        nursery.start_soon(trio.serve_listeners, self._relay, listeners)

    def cut(self) -> None:
        """Close every connection open now, both ways; new ones are relayed as before."""
        for scope in list(self._scopes):
            scope.cancel()

    async def _relay(self, client: trio.SocketStream) -> None:
        with trio.CancelScope() as scope:
            self._scopes.add(scope)
            try:
                async with (
                    client,
                    await trio.open_tcp_stream("127.0.0.1", self.target_port) as server,
                ):
                    async with trio.open_nursery() as nursery:
                        nursery.start_soon(self._pipe, client, server, nursery.cancel_scope)
                        nursery.start_soon(self._pipe, server, client, nursery.cancel_scope)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                self._scopes.discard(scope)

    async def _pipe(
        self, source: trio.SocketStream, sink: trio.SocketStream, both: trio.CancelScope
    ) -> None:
        first = True
        try:
            async for data in source:
                if first and sink.socket.getpeername()[1] == self.target_port:
                    self.websockets += data.startswith(b"GET /ws")
                first = False
                await sink.send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass  # a side reset its connection (the browser does, on a cut): as a close
        both.cancel()  # one side closed: close the other too
