"""Extractive answers for the built-in ``local`` model: the sentences of the web sources that
best answer a question. Pure computation, no I/O.

The ``local`` model does not write; it quotes. The sources' text is cut into sentences
(Markdown headings, code blocks, table rows, rules and list markers are structure, not
sentences), and each sentence is scored against the question with BM25, every sentence
standing as one document: a question word scores by how often the sentence has it (with
diminishing returns, and less in a long sentence) and by how rare it is among all the
sentences (a word that most sentences have tells little). Words are compared after a light
suffix stripping, so that "cancel", "cancels", "cancelled" and "cancellation" match.

Two adjustments make the pick read like an answer rather than a keyword hit. A sentence
adds half the score of the better of its neighbours in the same paragraph: the sentence
after "All of this runs inside the task's cancel scope." says how the stop goes on, in
words of its own. And the sources come ranked by the search engine, so each place down
the list divides a sentence's score a little more (1, 1.3, 1.6, ...).

A sentence needs a question word of its own to be quoted, and only those that reach half
the best one's score are kept, so that a source with nothing relevant is not cited as
filler.

The work is bounded whatever a request holds (this runs on the event loop): the sources
are read up to 100,000 characters in all, far more than the pipeline gives (a few pages
of ``TETHER_PAGE_MAX_CHARS``).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["STOP_WORDS", "Sentence", "best_sentences", "split_sentences", "terms"]

STOP_WORDS = frozenset(
    """
a about an and any are as at be been being but by can could did do does doing for from
had has have how i i'd i'm if in into is it it's its just know me my need of on or our
please say should so some tell than that that's the their them then there these they this
those to us was we were what what's when where which who why will with would you your
""".split()
)

# BM25's usual constants: how fast the repeats of a word stop adding (k1) and how much a
# long sentence is penalised (b).
_K1 = 1.2
_B = 0.75
_NEIGHBOUR_SHARE = 0.5
_RANK_PENALTY = 0.3
# A sentence is kept when it scores at least this share of the best sentence's score.
_KEEP_RATIO = 0.5
# Shorter "sentences" are labels or asides ("Yes.", "See below."), not statements.
_MIN_WORDS = 4
_MAX_SENTENCE_CHARS = 400
_MAX_SOURCE_CHARS = 100_000

_FENCE = re.compile(r"^(```|~~~)")
_HEADING = re.compile(r"^#{1,6}(?:\s|$)")
_SETEXT_UNDERLINE = re.compile(r"^(?:=+|-+)$")
_RULE = re.compile(r"^(?:(?:\*\s*){3,}|(?:-\s*){3,}|(?:_\s*){3,})$")
_LIST_MARKER = re.compile(r"^(?:[-*+]|\d{1,9}[.)])\s+")
_QUOTE_MARKER = re.compile(r"^(?:>\s?)+")
_HTML_LINE = re.compile(r"^<[^>]*>$")
# A sentence ends at . ! or ? and the closing quotes, brackets and emphasis after it,
# before white space and a next sentence that does not start in lower case.
_SENTENCE_BREAK = re.compile(r"(?<=[.!?])([\"'”’)\]*_`]*)\s+(?=[^\sa-z])")
_ABBREVIATION = re.compile(r"(?:\b(?:e\.g|i\.e|etc|vs|cf|Mr|Mrs|Ms|Dr|St)|\b[A-Z])\.$")
# A paragraph's bold lead-in ("**Nurseries.** Concurrent tasks ...") is a heading.
_LABEL = re.compile(r"(\*\*|__)[^*_]+\1")
# Letters and digits; snake_case names stay one word, as code means them.
_TERM = re.compile(r"[^\W_]+(?:_[^\W_]+)*")


@dataclass(frozen=True)
class Sentence:
    """One sentence of a source: the source's number, the sentence's paragraph and place
    in the source's text, and the sentence."""

    source: int
    paragraph: int
    position: int
    text: str


def best_sentences(
    question: str, sources: Sequence[tuple[int, str]], count: int = 3
) -> list[Sentence]:
    """Up to ``count`` sentences of ``sources`` (``(number, text)``, best source first)
    that best answer ``question``, in the order they come in the sources; empty when no
    sentence has a word of the question."""
    query = _query_terms(question)
    if not query or count <= 0:
        return []
    sentences: list[Sentence] = []
    bags: list[Counter[str]] = []
    budget = _MAX_SOURCE_CHARS
    for number, text in sources:
        if budget <= 0:
            break
        text, budget = text[:budget], budget - len(text)
        for sentence in split_sentences(text, source=number):
            # A lead-in to a list ("It has a phase that says what it is doing:") says
            # nothing without the list, which is not a sentence.
            if len(sentence.text.split()) >= _MIN_WORDS and not sentence.text.endswith(":"):
                sentences.append(sentence)
                bags.append(Counter(terms(sentence.text)))
    n = len(sentences)
    if n == 0:
        return []
    df = Counter(term for bag in bags for term in set(bag) & query)
    idf = {term: math.log(1 + (n - df[term] + 0.5) / (df[term] + 0.5)) for term in query}
    average_length = sum(bag.total() for bag in bags) / n or 1.0
    own: list[float] = []
    for bag in bags:
        norm = _K1 * (1 - _B + _B * bag.total() / average_length)
        own.append(sum(idf[t] * bag[t] * (_K1 + 1) / (bag[t] + norm) for t in query if bag[t]))

    rank: dict[int, int] = {}
    for place, (number, _) in enumerate(sources):
        rank.setdefault(number, place)
    scored: list[tuple[float, int]] = []
    for i, sentence in enumerate(sentences):
        if own[i] <= 0:
            continue
        neighbours = [
            own[j]
            for j in (i - 1, i + 1)
            if 0 <= j < n
            and (sentences[j].source, sentences[j].paragraph)
            == (sentence.source, sentence.paragraph)
        ]
        score = own[i] + _NEIGHBOUR_SHARE * max(neighbours, default=0.0)
        scored.append((score / (1 + _RANK_PENALTY * rank[sentence.source]), i))
    if not scored:
        return []
    scored.sort(key=lambda pair: (-pair[0], pair[1]))  # ties: the earlier sentence
    best = scored[0][0]
    return [
        sentences[i]
        for i in sorted(i for score, i in scored[:count] if score >= _KEEP_RATIO * best)
    ]


def split_sentences(text: str, source: int = 0) -> list[Sentence]:
    """The sentences of a Markdown or plain text, in order.

    Headings (and bold paragraph lead-ins), fenced code, table rows, rules and lines that
    are only an HTML tag are skipped; list and quote markers are dropped; a sentence never
    runs from one paragraph or list item into the next. A sentence over 400 characters is
    cut at a word and ends with "...".
    """
    sentences: list[Sentence] = []
    for paragraph, block in enumerate(_blocks(text)):
        pieces: list[str] = []
        start = 0
        for match in _SENTENCE_BREAK.finditer(block):
            # Only the last few characters can be an abbreviation: looked at in place, so
            # that a paragraph of many of them is still read in one pass.
            if _ABBREVIATION.search(block, max(start, match.start() - 8), match.start()):
                continue
            pieces.append(block[start : match.end(1)])
            start = match.end()
        pieces.append(block[start:])
        for piece in pieces:
            piece = piece.strip()
            if piece and not _LABEL.fullmatch(piece):
                sentences.append(Sentence(source, paragraph, len(sentences), _shorten(piece)))
    return sentences


def terms(text: str) -> list[str]:
    """The words of ``text`` that carry meaning, lower-cased and stemmed (stop words and
    single characters dropped)."""
    return [
        _stem(word)
        for word in _TERM.findall(text.lower())
        if len(word) > 1 and word not in STOP_WORDS
    ]


def _query_terms(question: str) -> set[str]:
    kept = set(terms(question))
    # A question made only of stop words ("who are you") still asks about its words.
    return kept or {_stem(w) for w in _TERM.findall(question.lower()) if len(w) > 1}


def _blocks(text: str) -> list[str]:
    """The paragraphs and list items of the text, each on one line."""
    blocks: list[str] = []
    lines: list[str] = []

    def close_block() -> None:
        if lines:
            blocks.append(" ".join(lines))
            lines.clear()

    in_fence = False
    for raw in text.splitlines():
        line = raw.strip()
        if _FENCE.match(line):
            in_fence = not in_fence
            close_block()
            continue
        if in_fence:
            continue
        if lines and _SETEXT_UNDERLINE.match(line):
            lines.pop()  # the line above it was a heading ("Title" over "=====")
            close_block()
            continue
        if (
            not line
            or _HEADING.match(line)
            or line.startswith("|")
            or _RULE.match(line)
            or _HTML_LINE.match(line)
        ):
            close_block()
            continue
        line = _QUOTE_MARKER.sub("", line)
        marker = _LIST_MARKER.match(line)
        if marker is not None:
            close_block()
            line = line[marker.end() :]
        if line:
            lines.append(line)
    close_block()
    return blocks


def _stem(word: str) -> str:
    """A light English suffix stripper: plurals, -ing, -ed, -ation, -ence and kin, a final
    e, a doubled last letter. Crude, but the same word always gives the same stem, which
    is all matching needs ("cancellation", "cancelled", "cancels" all give "cancel")."""
    if len(word) <= 3 or not word.isalpha():
        return word
    if word.endswith("ies") and len(word) > 4:
        word = word[:-3] + "y"
    elif word.endswith(("sses", "ches", "shes", "xes", "zes")):
        word = word[:-2]
    elif word.endswith("s") and not word.endswith(("ss", "us", "is")):
        word = word[:-1]
    for suffix, shortest_stem in (
        ("ation", 3),
        ("ency", 4),
        ("ence", 4),
        ("ent", 4),
        ("ing", 3),
        ("ed", 3),
    ):
        if word.endswith(suffix) and len(word) - len(suffix) >= shortest_stem:
            word = word[: -len(suffix)]
            if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "lsz":
                word = word[:-1]  # "stopped", "running"
            break
    if word.endswith("e") and len(word) > 3:
        word = word[:-1]
    if word.endswith("at") and len(word) > 5:
        word = word[:-2]  # "generate", "generated", "generating", "generation": "gener"
    if word.endswith("ll") and len(word) > 4:
        word = word[:-1]  # "cancel" and "cancell(ed|ing|ation)"
    return word


def _shorten(sentence: str) -> str:
    if len(sentence) <= _MAX_SENTENCE_CHARS:
        return sentence
    cut = sentence.rfind(" ", 0, _MAX_SENTENCE_CHARS)
    return sentence[: cut if cut > 0 else _MAX_SENTENCE_CHARS].rstrip(" ,;:") + "..."
