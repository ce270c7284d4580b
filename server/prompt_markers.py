"""The markers in the prompts the pipeline writes: the line that opens a query-writing
prompt, and the tags around the numbered sources. The pipeline writes them; the built-in
``local`` model reads them to answer without a real model. Both take them from here."""

from __future__ import annotations

QUERY_PROMPT_MARKER = "### Task: generate search queries"
SOURCES_OPEN = "<sources>"
SOURCES_CLOSE = "</sources>"
