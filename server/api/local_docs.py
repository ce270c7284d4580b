"""GET /api/local-docs/<path>: a document of the ``local`` search provider's folder, the
target of that provider's source links.

Only what the index holds is served, looked up by its exact relative path: a path with
``..``, an absolute path, a hidden file or a file the provider does not index is 404, as is
every path when the search provider is not ``local``. Like every ``/api`` route it takes
the API key when keys are configured.
"""

from __future__ import annotations

from pathlib import PurePosixPath

from quart import Blueprint, Response

from server.api.common import current_user, runtime
from server.providers.search.local import DOCUMENT_URL_PREFIX, LocalSearch
from server.schemas import RequestError

blueprint = Blueprint("local_docs", __name__)

_MARKDOWN_SUFFIXES = frozenset({".md", ".markdown"})


# merge_slashes off: "//etc/passwd" is answered 404 here, not redirected to "/etc/passwd".
@blueprint.get(DOCUMENT_URL_PREFIX + "<path:path>", merge_slashes=False)
async def local_document(path: str) -> Response:
    """The document's text: Markdown as ``text/markdown``, other text as ``text/plain``."""
    current_user()
    search = runtime().search
    # An index that cannot be read (SearchError) is the server's fault: 500, logged.
    text = await search.document(path) if isinstance(search, LocalSearch) else None
    if text is None:
        raise RequestError(
            404, "not_found", f"No document {path!r} in the local search folder.", param="path"
        )
    kind = "markdown" if PurePosixPath(path).suffix.lower() in _MARKDOWN_SUFFIXES else "plain"
    return Response(
        text,
        status=200,
        headers={
            "Content-Type": f"text/{kind}; charset=utf-8",
            "X-Content-Type-Options": "nosniff",
            # The text is shown, never run: nothing in it may load or script anything.
            "Content-Security-Policy": "default-src 'none'; sandbox",
            "Cache-Control": "no-cache",
        },
    )
