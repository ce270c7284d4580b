"""HTML to readable text, with a real parser (no pattern matching over markup).

CPU work only, no I/O: ``fetch.fetch_page`` runs big documents in a worker thread.
"""

from __future__ import annotations

from selectolax.lexbor import LexborHTMLParser, LexborNode

__all__ = ["extract_text", "fragment_text"]

# Never part of the readable text, wherever they are.
_DROP_TAGS = frozenset(
    {
        "script", "style", "noscript", "template", "svg", "math", "canvas", "iframe",
        "object", "embed", "video", "audio", "picture", "img", "button", "input", "select",
        "textarea", "head", "title", "meta", "link",
    }
)  # fmt: skip
# Page chrome: dropped, except that a <header> inside the chosen <main>/<article> is
# usually the article's own heading and is kept.
_CHROME_TAGS = frozenset({"nav", "footer", "header"})
# Elements that start and end a paragraph.
_BLOCK_TAGS = frozenset(
    {
        "address", "article", "aside", "blockquote", "body", "caption", "center", "dd",
        "details", "dialog", "div", "dl", "dt", "fieldset", "figcaption", "figure", "form",
        "h1", "h2", "h3", "h4", "h5", "h6", "hr", "html", "li", "main", "ol", "p", "pre",
        "section", "summary", "table", "tbody", "tfoot", "thead", "tr", "ul",
    }
)  # fmt: skip
_CELL_TAGS = frozenset({"td", "th"})

_PARAGRAPH = "\n\n"
_LINE = "\n"


def extract_text(html: str) -> tuple[str, str]:
    """``(title, readable text)`` of an HTML document.

    Scripts, styles, navigation, headers and footers, forms' controls and other markup
    that is not prose are dropped; ``<main>`` (or a lone ``<article>``) is preferred
    over the whole body when the page has one. Whitespace is collapsed inside
    paragraphs and paragraphs are separated by a blank line.

    This is CPU work: callers on the event loop should run big documents in a thread.
    """
    tree = LexborHTMLParser(html)
    title_node = tree.css_first("title")
    title = _collapse(title_node.text()) if title_node is not None else ""

    for root, is_content in _candidate_roots(tree):
        text = _readable_text(root, keep_header=is_content)
        if text:
            if not title:
                heading = root.css_first("h1")
                title = _collapse(heading.text()) if heading is not None else ""
            return title, text
    return title, ""


def _candidate_roots(tree: LexborHTMLParser) -> list[tuple[LexborNode, bool]]:
    """Where the readable text may be, best first; the flag marks a content element."""
    roots: list[tuple[LexborNode, bool]] = []
    main = tree.css_first("main") or tree.css_first('[role="main"]')
    if main is not None:
        roots.append((main, True))
    articles = tree.css("article")
    if len(articles) == 1:
        roots.append((articles[0], True))
    fallback = tree.body or tree.root
    if fallback is not None:
        roots.append((fallback, False))
    return roots


def _readable_text(root: LexborNode, *, keep_header: bool) -> str:
    # An explicit stack instead of recursion: real pages nest deeper than Python's
    # recursion limit allows. Strings on the stack are separators to emit when the
    # walk leaves an element.
    pieces: list[str] = []
    stack: list[LexborNode | str] = [root]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            pieces.append(item)
            continue
        if item.is_text_node:
            pieces.append(_collapse_inline(item.text_content or ""))
            continue
        if not item.is_element_node:
            continue  # comments, doctype
        tag = item.tag or ""
        if tag in _DROP_TAGS or _is_hidden(item):
            continue
        if tag in _CHROME_TAGS and not (keep_header and tag == "header"):
            continue
        if tag == "br":
            pieces.append(_LINE)
            continue
        if tag == "pre":
            pieces.extend((_PARAGRAPH, item.text(), _PARAGRAPH))
            continue
        if tag in _BLOCK_TAGS:
            pieces.append(_PARAGRAPH)
            stack.append(_PARAGRAPH)
        elif tag in _CELL_TAGS:
            stack.append(" ")
        stack.extend(reversed(list(item.iter(include_text=True))))
    return _paragraphs("".join(pieces))


def _is_hidden(node: LexborNode) -> bool:
    attributes = node.attributes
    if "hidden" in attributes:
        return True
    return (attributes.get("aria-hidden") or "").strip().lower() == "true"


def _collapse(text: str) -> str:
    return " ".join(text.split())


def _collapse_inline(text: str) -> str:
    """Collapse whitespace but keep one space at either end, where words meet tags."""
    core = " ".join(text.split())
    if not core:
        return " " if text else ""
    lead = " " if text[0].isspace() else ""
    trail = " " if text[-1].isspace() else ""
    return f"{lead}{core}{trail}"


def _paragraphs(raw: str) -> str:
    """Tidy lines and keep at most one blank line between paragraphs."""
    out: list[str] = []
    blank = False
    for line in raw.split("\n"):
        line = _collapse(line)
        if not line:
            blank = bool(out)
            continue
        if blank:
            out.append("")
            blank = False
        out.append(line)
    return "\n".join(out)


def fragment_text(fragment: str) -> str:
    """Plain text of a short HTML fragment (search snippets carry ``<strong>`` and entities)."""
    if "<" not in fragment and "&" not in fragment:
        return _collapse(fragment)
    tree = LexborHTMLParser(fragment)
    return _collapse(tree.text(separator=""))
