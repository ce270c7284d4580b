"""The documentation stays inside the repository, the manual's index lists every page of docs/,
and API.md names every route the server has."""

from __future__ import annotations

import re
from pathlib import Path

from server.api import ws
from server.app import create_app
from server.config import Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS_DIR = ROOT / "docs"
DOCS = (
    "README.md",
    "API.md",
    "bench/README.md",
    *sorted(str(page.relative_to(ROOT)) for page in DOCS_DIR.glob("*.md")),
)
NOT_SEARCHED = "<!-- not searched -->"

_FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.MULTILINE | re.DOTALL)
_INLINE_LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
_REFERENCE_LINK = re.compile(r"^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s|$)", re.MULTILINE)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


def _without_code_blocks(text: str) -> str:
    return _FENCE.sub("", text)


def _links(text: str) -> list[str]:
    prose = _without_code_blocks(text)
    return _INLINE_LINK.findall(prose) + _REFERENCE_LINK.findall(prose)


def _anchors(markdown: Path) -> set[str]:
    """The heading anchors GitHub makes for a Markdown file (duplicates get -1, -2, ...)."""
    anchors: set[str] = set()
    for heading in _HEADING.findall(_without_code_blocks(markdown.read_text())):
        slug = re.sub(r"[^\w\- ]", "", heading.replace("`", "").strip().lower()).replace(" ", "-")
        unique, n = slug, 0
        while unique in anchors:
            n += 1
            unique = f"{slug}-{n}"
        anchors.add(unique)
    return anchors


def test_every_relative_link_in_the_docs_resolves_inside_the_repository() -> None:
    problems: list[str] = []
    for name in DOCS:
        doc = ROOT / name
        for target in _links(doc.read_text()):
            if _SCHEME.match(target):
                continue  # a web page (https:, mailto:, ...)
            path_part, _, anchor = target.partition("#")
            resolved = (doc.parent / path_part).resolve() if path_part else doc
            if not resolved.is_relative_to(ROOT):
                problems.append(f"{name}: {target} points outside the repository")
            elif not resolved.exists():
                problems.append(f"{name}: {target} does not exist")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
                problems.append(f"{name}: {target} names no heading of {resolved.name}")
    assert not problems, "\n".join(problems)


def test_the_readme_links_to_no_web_page() -> None:
    """The README is read in a clone, perhaps offline: what it needs is in the repository."""
    web = [t for t in _links((ROOT / "README.md").read_text()) if _SCHEME.match(t)]
    assert not web, f"README.md links outside the repository: {web}"


def test_the_docs_index_lists_every_page_of_docs() -> None:
    index = DOCS_DIR / "README.md"
    linked = {(index.parent / t.partition("#")[0]).resolve() for t in _links(index.read_text())}
    pages = {page.resolve() for page in DOCS_DIR.glob("*.md")} - {index.resolve()}
    unlisted = sorted(page.name for page in pages - linked)
    assert not unlisted, f"docs/README.md does not list: {unlisted}"


def test_the_docs_index_names_the_pages_that_are_not_searched() -> None:
    """The index says which pages the ``local`` search leaves out; it must say it right."""
    index = (DOCS_DIR / "README.md").read_text()
    section = index[index.index("## The `local` search reads this folder") :]
    section = section[: section.index("Adding a page")]
    named = {t for t in _links(section) if t.endswith(".md")}
    not_searched = {
        page.name
        for page in DOCS_DIR.glob("*.md")
        if page.name != "README.md" and page.read_text().startswith(NOT_SEARCHED + "\n")
    }
    assert named == not_searched
    assert index.startswith(NOT_SEARCHED + "\n")


def _route_pattern(rule: str) -> str:
    """A route as API.md writes it: ``{name}`` for a placeholder, a real path for a path."""
    parts = re.split(r"(<[^>]+>)", rule)
    pattern = ""
    for part in parts:
        if part.startswith("<"):
            pattern += r"[^\s`|)]+" if part.startswith("<path:") else r"\{[^{}/\s]+\}"
        else:
            pattern += re.escape(part)
    return pattern + r"(?![\w/{-])"


def test_api_md_names_every_route_of_the_app() -> None:
    api = (ROOT / "API.md").read_text()
    app = create_app(Settings())
    missing: list[str] = []
    rules = list(app.url_map.iter_rules())
    assert rules
    for rule in rules:
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            if not re.search(rf"{method}\s+{_route_pattern(rule.rule)}", api):
                missing.append(f"{method} {rule.rule}")
    # /ws is routed below quart (binding.route_websocket), so it is not in the url map.
    if not re.search(rf"^#+ WebSocket {re.escape(ws.PATH)}$", api, re.MULTILINE):
        missing.append(f"a 'WebSocket {ws.PATH}' section")
    assert not missing, "API.md does not name: " + ", ".join(missing)
