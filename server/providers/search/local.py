"""Search over a local folder of Markdown and text files (SQLite FTS5, in memory).

This is the provider the embedded default uses: no network, no keys, and it searches
the project's own ``docs/``. The index is built once, lazily, in a worker thread.

A result's URL is the path under which Tether serves that document,
``/api/local-docs/<relative path>`` (``api/local_docs.py``), relative to the server
because the provider does not know the address clients reach it at. ``document`` reads a
document back from the index by that path, so only indexed files can be served: nothing
outside the folder, no hidden file, no other type.

Threads and cancellation: every SQLite call runs in ``trio.to_thread.run_sync`` with
``abandon_on_cancel=True``, so a cancelled search returns at once and its thread
finishes on its own. The one connection is shared by those threads
(``check_same_thread=False``) behind a ``threading.Lock`` that is only ever taken
inside a worker thread, never on the event loop, so nothing async waits on it. An
index build that is abandoned still completes and is kept for the next search.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import trio

from server.providers.search.base import SearchError, SearchResult
from server.providers.web.markdown import markdown_title

__all__ = ["DOCUMENT_URL_PREFIX", "LocalSearch", "fts_match_expression"]

# Where the API serves the indexed documents; a result's URL is this and its path.
DOCUMENT_URL_PREFIX = "/api/local-docs/"

INDEXED_SUFFIXES = frozenset({".md", ".markdown", ".txt"})
_MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})
# Bigger files are not notes; skip them rather than fill memory.
MAX_FILE_BYTES = 2_000_000
# A file whose first line is this is left out of the index: the folder may hold notes for
# those who work on the code (docs/architecture.md) beside the manual that answers users.
NOT_SEARCHED = "<!-- not searched -->"
# A query is a handful of words; more terms only slow the match without helping it.
MAX_QUERY_TERMS = 32
SNIPPET_TOKENS = 32

# Title matches weigh more than body matches; the path column is not searched.
_SCHEMA = """
CREATE VIRTUAL TABLE docs USING fts5(
    title, body, path UNINDEXED, tokenize = 'porter unicode61 remove_diacritics 2'
)
"""
_QUERY = """
SELECT path, title, snippet(docs, 1, '', '', ' … ', ?), body
FROM docs WHERE docs MATCH ?
ORDER BY bm25(docs, 4.0, 1.0, 0.0)
LIMIT ?
"""


@dataclass(frozen=True)
class _Document:
    path: str
    title: str
    body: str


class LocalSearch:
    """Full-text search over the ``.md``, ``.markdown`` and ``.txt`` files under a folder.

    Results have the URL ``/api/local-docs/<relative path>`` (percent-encoded) and carry
    the document's text in ``content`` (capped at ``max_content_chars``), so no page fetch
    is needed. A folder
    that is missing or holds no such files gives no results. The folder is read once;
    later changes to it are not seen.
    """

    name = "local"

    def __init__(self, directory: str | os.PathLike[str], *, max_content_chars: int = 4000) -> None:
        self._directory = Path(directory)
        self._max_content_chars = max_content_chars
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        # Each indexed document's relative path and its row in the index.
        self._rows: dict[str, int] = {}

    @classmethod
    async def build(
        cls, directory: str | os.PathLike[str], *, max_content_chars: int = 4000
    ) -> LocalSearch:
        """A ``LocalSearch`` with its index already built (in a worker thread).

        Cancelling it abandons the indexing thread, which finishes on its own; the
        half-made provider is dropped.
        """
        index = cls(directory, max_content_chars=max_content_chars)
        await trio.to_thread.run_sync(index._ensure_index, abandon_on_cancel=True)
        return index

    async def search(self, query: str, count: int) -> list[SearchResult]:
        """Up to ``count`` documents matching any word of ``query``, best first (bm25).

        Raises ``SearchError`` if the index cannot be read. Cancelling it abandons the
        lookup running in a worker thread, which finishes on its own.
        """
        match = fts_match_expression(query)
        if match is None or count <= 0:
            return []
        rows = await trio.to_thread.run_sync(
            self._search_in_thread, match, count, abandon_on_cancel=True
        )
        return [
            SearchResult(
                url=DOCUMENT_URL_PREFIX + quote(path),
                title=title,
                snippet=" ".join(snippet.split()),
                content=body[: self._max_content_chars],
            )
            for path, title, snippet, body in rows
        ]

    async def document(self, path: str) -> str | None:
        """The whole text of the indexed document at ``path`` (relative to the folder, as
        in a result's URL, decoded), or None when no indexed document has that path.

        Raises ``SearchError`` if the index cannot be built or read. Cancelling it
        abandons the lookup running in a worker thread, which finishes on its own.
        """
        return await trio.to_thread.run_sync(self._document_in_thread, path, abandon_on_cancel=True)

    # Everything below runs in worker threads.

    def _document_in_thread(self, path: str) -> str | None:
        with self._lock:
            db = self._ensure_index_locked()
            row = self._rows.get(path)
            if row is None:
                return None
            try:
                found = db.execute("SELECT body FROM docs WHERE rowid = ?", (row,)).fetchone()
            except sqlite3.Error as exc:
                raise SearchError(f"local: the search index failed ({exc})") from None
            return None if found is None else str(found[0])

    def _search_in_thread(self, match: str, count: int) -> list[tuple[str, str, str, str]]:
        with self._lock:
            db = self._ensure_index_locked()
            try:
                cursor = db.execute(_QUERY, (SNIPPET_TOKENS, match, count))
                return [(str(a), str(b), str(c), str(d)) for a, b, c, d in cursor.fetchall()]
            except sqlite3.Error as exc:
                raise SearchError(f"local: the search index failed ({exc})") from None

    def _ensure_index(self) -> None:
        with self._lock:
            self._ensure_index_locked()

    def _ensure_index_locked(self) -> sqlite3.Connection:
        if self._db is not None:
            return self._db
        try:
            db = sqlite3.connect(":memory:", check_same_thread=False)
            db.execute(_SCHEMA)
            rows: dict[str, int] = {}
            with db:
                for d in _read_documents(self._directory):
                    cursor = db.execute(
                        "INSERT INTO docs (title, body, path) VALUES (?, ?, ?)",
                        (d.title, d.body, d.path),
                    )
                    rows[d.path] = int(cursor.lastrowid or 0)
        except sqlite3.Error as exc:
            raise SearchError(f"local: could not build the search index ({exc})") from None
        self._db, self._rows = db, rows
        return db


def _read_documents(directory: Path) -> list[_Document]:
    """Every indexable file under ``directory``, in a stable order; unreadable ones skipped."""
    if not directory.is_dir():
        return []
    documents: list[_Document] = []
    for current, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in sorted(filenames):
            path = Path(current, filename)
            suffix = path.suffix.lower()
            if filename.startswith(".") or suffix not in INDEXED_SUFFIXES:
                continue
            try:
                if path.stat().st_size > MAX_FILE_BYTES:
                    continue
                body = path.read_bytes().decode("utf-8", errors="replace")
            except OSError:
                continue
            if not body.strip() or body.lstrip("\ufeff").startswith(NOT_SEARCHED):
                continue
            title = (markdown_title(body) if suffix in _MARKDOWN_SUFFIXES else None) or filename
            relative = path.relative_to(directory).as_posix()
            documents.append(_Document(path=relative, title=title, body=body))
    return documents


# Words that match nearly every document: OR-ed in, they only blur the ranking.
_STOP_WORDS = frozenset(
    "a an and are as at be by can do does for from how i in is it its of on or that the "
    "this to was what when where which who why will with you".split()
)


def fts_match_expression(query: str) -> str | None:
    """A safe FTS5 MATCH expression for free text: each word quoted, the words OR-ed.

    The user's text never reaches MATCH as syntax: operators (``AND``, ``NEAR``, ``*``,
    ``^``, column filters, quotes, parentheses) all become plain words or vanish.
    Common English stop words are left out unless the query has nothing else.
    ``None`` when the text has no word in it.
    """
    words: list[str] = []
    for word in "".join(ch if ch.isalnum() else " " for ch in query).lower().split():
        if word not in words:
            words.append(word)
    words = [w for w in words if w not in _STOP_WORDS] or words
    quoted = ['"' + w.replace('"', '""') + '"' for w in words[:MAX_QUERY_TERMS]]
    return " OR ".join(quoted) if quoted else None
