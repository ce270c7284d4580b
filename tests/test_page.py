"""GET / and GET /static/...: the chat page's files, their types, cache rules and CSP.

What the page does is tested in a real browser (test_browser.py); this is what any HTTP
client can see, and runs without a browser.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Any

from server.api.page import STATIC_DIR
from tests.conftest import Tether

HOOKS = (
    "prompt",
    "send",
    "stop",
    "web-search",
    "model",
    "status",
    "answer",
    "sources",
    "task-state",
    "skip-search",
    "skip-tool",
)
CHAT_PAGE_DOC = Path(__file__).resolve().parent.parent / "docs" / "chat-page.md"


async def test_the_page_is_html_with_a_strict_content_security_policy(tether: Tether) -> None:
    response = await tether.client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/html; charset=utf-8"
    policy = dict(
        part.strip().split(" ", 1)
        for part in response.headers["content-security-policy"].split(";")
    )
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'self'" and policy["connect-src"] == "'self'"
    assert policy["img-src"] == "'self'" and policy["frame-ancestors"] == "'none'"
    assert "unsafe" not in response.headers["content-security-policy"]
    html = response.text
    assert re.findall(r"<script\b[^>]*>", html) == [
        '<script type="module" src="/static/app.js">'
    ]  # no inline script
    assert not re.search(r"\son[a-z]+=", html)  # no inline event handlers either


async def test_every_hook_is_on_the_page_and_in_the_docs(tether: Tether) -> None:
    html = (await tether.client.get("/")).text
    script = (await tether.client.get("/static/app.js")).text
    documented = CHAT_PAGE_DOC.read_text()
    for hook in HOOKS:
        assert f'data-testid="{hook}"' in html or f'testid = "{hook}"' in script, hook
        assert f"`{hook}`" in documented, hook


async def test_static_files_have_a_javascript_type_and_are_revalidated(tether: Tether) -> None:
    response = await tether.client.get("/static/tether.js")
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/javascript; charset=utf-8"
    assert response.headers["cache-control"] == "no-cache"
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "expires" not in response.headers
    assert response.content == (STATIC_DIR / "tether.js").read_bytes()
    again = await tether.client.get(
        "/static/tether.js", headers={"If-None-Match": response.headers["etag"]}
    )
    assert again.status_code == 304


async def test_vendored_files_are_cached_for_good(tether: Tether) -> None:
    for path in ("vendor/marked-18.2.1/marked.esm.js", "vendor/dompurify-3.4.18/purify.es.mjs"):
        response = await tether.client.get("/static/" + path)
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/javascript; charset=utf-8"
        assert response.headers["cache-control"] == "public, max-age=31536000, immutable"


async def test_nothing_outside_the_static_folder_is_served(tether: Tether) -> None:
    for path in (
        "/static/%2e%2e/config.py",
        "/static/..%2fapp.py",
        "/static/nothing.js",
        "/static/vendor/marked-18.2.1/LICENSE",
        "/static/vendor",
    ):
        response = await tether.client.get(path)
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not_found"


async def test_the_page_needs_no_key(start_tether: Any) -> None:
    tether: Tether = await start_tether(api_keys={"key-alice": "alice"})
    assert (await tether.client.get("/")).status_code == 200
    assert (await tether.client.get("/static/tether.js")).status_code == 200
    assert (await tether.client.get("/v1/models")).status_code == 401


def test_vendored_libraries_are_the_pinned_files_with_their_licences() -> None:
    vendor = STATIC_DIR / "vendor"
    listed = (vendor / "README.md").read_text()
    for folder in sorted(p for p in vendor.iterdir() if p.is_dir()):
        assert (folder / "LICENSE").is_file(), folder.name
        assert f"`{folder.name}/`" in listed, folder.name
        for script in folder.glob("*.*js"):
            digest = hashlib.sha256(script.read_bytes()).hexdigest()
            assert digest in listed, f"{script.name} is not the file vendor/README.md names"
