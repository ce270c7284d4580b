"""A page's readable text (server/providers/web/text.py): its title, its prose without the
page's furniture, its paragraph breaks. Pure computation on HTML strings."""

from __future__ import annotations

from server.providers.web.text import extract_text

ARTICLE = """<!doctype html>
<html><head><title> The  Daily   Fish </title>
<style>body { color: red }</style>
<script>var tracking = "SCRIPT-TEXT";</script>
</head>
<body>
<nav><a href="/">Home</a> <a href="/about">NAV-TEXT</a></nav>
<header>SITE-HEADER</header>
<main>
  <h1>Salmon swim upstream</h1>
  <p>Salmon   return to the
     river where they <b>hatched</b>.</p>
  <script>document.write("INLINE-SCRIPT")</script>
  <noscript>NOSCRIPT-TEXT</noscript>
  <svg><text>SVG-TEXT</text></svg>
  <template><p>TEMPLATE-TEXT</p></template>
  <div hidden>HIDDEN-TEXT</div>
  <ul><li>First</li><li>Second</li></ul>
  <p>Line one<br>Line two &amp; more</p>
</main>
<footer>FOOTER-TEXT</footer>
</body></html>
"""


def test_extract_text_gets_the_title_and_drops_non_prose() -> None:
    title, text = extract_text(ARTICLE)
    assert title == "The Daily Fish"
    assert "Salmon return to the river where they hatched." in text
    for junk in (
        "SCRIPT-TEXT", "INLINE-SCRIPT", "color: red", "NOSCRIPT-TEXT", "SVG-TEXT",
        "TEMPLATE-TEXT", "HIDDEN-TEXT", "NAV-TEXT", "SITE-HEADER", "FOOTER-TEXT",
    ):  # fmt: skip
        assert junk not in text


def test_extract_text_keeps_paragraph_breaks() -> None:
    _, text = extract_text(ARTICLE)
    assert text.split("\n\n") == [
        "Salmon swim upstream",
        "Salmon return to the river where they hatched.",
        "First",
        "Second",
        "Line one\nLine two & more",
    ]


def test_extract_text_prefers_a_lone_article_and_falls_back_to_the_body() -> None:
    html = "<body><div>MENU</div><article><p>The story.</p></article></body>"
    assert extract_text(html) == ("", "The story.")
    assert extract_text("<p>Just a <i>fragment</i></p>") == ("", "Just a fragment")
    assert extract_text("") == ("", "")


def test_extract_text_takes_the_first_heading_when_there_is_no_title() -> None:
    assert extract_text("<body><h1>Heading</h1><p>Body</p></body>")[0] == "Heading"


def test_extract_text_survives_very_deep_nesting() -> None:
    html = "<div>" * 5000 + "deep" + "</div>" * 5000
    assert extract_text(html)[1] == "deep"
