"""The local search provider (server/providers/search/local.py): a SQLite full-text index of
a folder of documents, its ranking, titles and URLs, what it reads back, and queries that
would be FTS syntax. No network: the corpus is a temporary folder, or the project's docs."""

from __future__ import annotations

from pathlib import Path

import pytest
import trio

from server.config import Settings
from server.providers.search.local import LocalSearch, fts_match_expression


def _write(root: Path, relative: str, text: str) -> None:
    path = root / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


@pytest.fixture
def corpus(tmp_path: Path) -> Path:
    _write(tmp_path, "nurseries.md", "# Nurseries\n\nA nursery waits for every child task.\n")
    _write(tmp_path, "guide/cancel.md", "# Cancel scopes\n\nCancelling a scope stops its tasks.")
    _write(tmp_path, "notes.txt", "Plain notes about penguins and their habits.")
    _write(tmp_path, "untitled.markdown", "No heading here, only otters.")
    _write(tmp_path, "image.png", "penguins penguins penguins")
    _write(tmp_path, ".hidden/secret.md", "# Secret\n\npenguins")
    return tmp_path


async def test_local_search_finds_documents_by_word(corpus: Path) -> None:
    results = await LocalSearch(corpus).search("how do I cancel?", 5)
    assert [r.url for r in results] == ["/api/local-docs/guide/cancel.md"]
    (result,) = results
    assert result.title == "Cancel scopes"
    assert "Cancelling a scope" in result.snippet
    assert result.content == "# Cancel scopes\n\nCancelling a scope stops its tasks."


async def test_a_document_marked_not_searched_is_left_out(corpus: Path) -> None:
    _write(corpus, "dev/notes.md", "<!-- not searched -->\n# Cancel internals\n\ncancel cancel")
    search = LocalSearch(corpus)
    assert [r.url for r in await search.search("cancel", 5)] == ["/api/local-docs/guide/cancel.md"]
    assert await search.document("dev/notes.md") is None


async def test_local_search_stems_and_ranks(corpus: Path) -> None:
    results = await LocalSearch(corpus).search("nurseries tasks", 5)
    assert results[0].url == "/api/local-docs/nurseries.md"
    assert {r.url for r in results} == {
        "/api/local-docs/nurseries.md",
        "/api/local-docs/guide/cancel.md",
    }


async def test_local_search_titles_and_file_types(corpus: Path) -> None:
    index = await LocalSearch.build(corpus)
    penguins = await index.search("penguins", 5)
    assert [(r.url, r.title) for r in penguins] == [("/api/local-docs/notes.txt", "notes.txt")]
    otters = await index.search("otters", 5)
    assert [(r.url, r.title) for r in otters] == [
        ("/api/local-docs/untitled.markdown", "untitled.markdown")
    ]


async def test_local_search_reads_back_indexed_documents_only(corpus: Path) -> None:
    _write(corpus.parent, "outside.md", "# Outside\n\npenguins")
    index = LocalSearch(corpus, max_content_chars=10)
    # The whole text, whatever the cap on a result's content.
    assert await index.document("guide/cancel.md") == (
        "# Cancel scopes\n\nCancelling a scope stops its tasks."
    )
    for path in (
        "../outside.md",
        "guide/../nurseries.md",
        "/nurseries.md",
        ".hidden/secret.md",
        "image.png",
        "missing.md",
        "guide",
        "",
    ):
        assert await index.document(path) is None, path


async def test_local_search_urls_are_percent_encoded(tmp_path: Path) -> None:
    _write(tmp_path, "two words/ünïcode #1.md", "# Walruses\n\nWalruses dive.")
    [result] = await LocalSearch(tmp_path).search("walruses", 3)
    assert result.url == "/api/local-docs/two%20words/%C3%BCn%C3%AFcode%20%231.md"


async def test_local_search_caps_content_and_count(tmp_path: Path) -> None:
    for i in range(5):
        _write(tmp_path, f"doc{i}.md", f"# Doc {i}\n\n" + "walrus " * 1000)
    results = await LocalSearch(tmp_path, max_content_chars=50).search("walrus", 3)
    assert len(results) == 3
    assert all(r.content is not None and len(r.content) == 50 for r in results)


@pytest.mark.parametrize(
    "query",
    [
        '"AND OR NEAR( *',
        'title:secret OR "',
        "NEAR(a b, 3)",
        "* ^ - + ()",
        "AND",
        "'; DROP TABLE docs; --",
        "cancel\x00scope",
        "🐧 émoji",
    ],
)
async def test_local_search_survives_fts_syntax_in_queries(corpus: Path, query: str) -> None:
    results = await LocalSearch(corpus).search(query, 5)
    assert isinstance(results, list)


def test_fts_match_expression_quotes_every_word() -> None:
    assert fts_match_expression('"AND OR NEAR( *') == '"near"'
    assert fts_match_expression("x-y x") == '"x" OR "y"'
    assert fts_match_expression("how do I cancel a task?") == '"cancel" OR "task"'
    assert fts_match_expression("what is it") == '"what" OR "is" OR "it"'
    assert fts_match_expression(" ?! ") is None


async def test_local_search_of_a_missing_or_empty_folder_has_no_results(tmp_path: Path) -> None:
    assert await LocalSearch(tmp_path / "missing").search("anything", 3) == []
    assert await LocalSearch(tmp_path).search("anything", 3) == []
    assert await LocalSearch(tmp_path).search("", 3) == []


async def test_concurrent_first_searches_share_one_index(corpus: Path) -> None:
    index = LocalSearch(corpus)
    found: list[int] = []

    async def one() -> None:
        found.append(len(await index.search("penguins", 5)))

    async with trio.open_nursery() as nursery:
        for _ in range(10):
            nursery.start_soon(one)
    assert found == [1] * 10


async def test_the_project_docs_are_searchable() -> None:
    index = LocalSearch(Settings().search_local_dir)
    results = await index.search("cancel scope", 3)
    assert results
    assert all(r.url.startswith("/api/local-docs/") and r.content for r in results)
