"""For the built-in ``local`` model: which offered function a message asks for, and its
arguments, read from the message. Pure computation, no I/O.

A function fits a message by the words they share: each word of the message that is in
the function's name counts 2, one that is only in its description counts 1 (words as
``extractive.terms`` makes them, so "weather" meets ``get_weather``). The best fit whose
required parameters can all be filled from the message is called; ties go to the function
offered first. When the request requires a call (``tool_choice: "required"`` or a named
function), a function that shares no word may be called too.

A parameter is filled from its JSON schema: ``const`` as it is; ``enum`` with the value the
message names (else the first); a number or integer with the first such number in the
message, within ``minimum``/``maximum``; a boolean with true when the message names the
parameter (false after "no", "not", "without"); a string by what the parameter is for:
a URL (format ``uri`` or a name like ``url``) from the message's first http(s) URL, a place
(a name or description like ``location`` or ``city``) from the capitalised words after
"in", "at", "for", "near", "from" or "to" (else the first capitalised words inside a
sentence), a query (``query``, ``q``, ``search``, ``topic`` ...) from what follows
"search for", "look up", "find" or "about" (else the message's keywords), and anything
else from the whole message. A string must meet ``minLength`` and ``maxLength``; one with
a ``pattern`` is not guessed (a client's pattern is not run here, where a slow one would
hold the event loop). Optional parameters are filled only when the message says them (a
named enum value, a number, a URL, a place, a named flag); arrays, nested objects and
``anyOf`` cannot be filled, so a function that requires one is not called.

The work is bounded whatever the request holds: the message is read once (its first
10,000 characters), and what the parameters take from it (its place, its query, its runs
of words) is worked out once for all the functions.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from server.providers.llm.local.extractive import STOP_WORDS, terms

__all__ = ["FunctionSpec", "choose_function", "find_url"]

_URL = re.compile(r"https?://[^\s<>\"'`]+", re.IGNORECASE)
_NUMBER = re.compile(r"(?<![\w.])-?\d+(?:\.\d+)?(?!\.?\w)")
_WORD = re.compile(r"[^\W_]+(?:['’][^\W_]+)?")
_NAME_PART = re.compile(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+")
# The space before a word that does not start the message or a sentence; a run of
# non-spaces.
_INNER_WORD = re.compile(r"(?<=[^.!?\s])\s+(?=[^\W\d_])")
_SPAN = re.compile(r"\S+")
_PLACE_LEAD = re.compile(r"\b(?:in|at|for|near|from|to)\s+(?:the\s+)?(?=[^\W\d_])", re.IGNORECASE)
# "search (the docs) for X", "look up X", "find X", "about X": X, up to a clause's end.
_QUERY_LEAD = re.compile(
    r"\b(?:search(?:\s+[\w-]+){0,2}?\s+for|look\s+up|find|about)\s+"
    r"([^,;:!?\n]+)",
    re.IGNORECASE,
)
# An enum value of more words than this is not looked for in the message.
_MAX_ENUM_WORDS = 4
# What is read of a message: a request to a demo model gets no more of its attention.
_MAX_MESSAGE_CHARS = 10_000
_NEGATION = frozenset({"no", "not", "without", "don't", "dont", "never", "disable"})

_URL_WORDS = frozenset({"url", "uri", "link", "href", "website", "webpage"})
_PLACE_WORDS = frozenset(
    {
        "location",
        "city",
        "place",
        "town",
        "country",
        "region",
        "address",
        "destination",
        "where",
        "area",
        "state",
        "locality",
    }
)
# A description says "the city and state" or "the location" of a place parameter; "state"
# or "area" alone say too little there.
_PLACE_DESCRIPTION_WORDS = frozenset({"city", "location", "place", "town", "country"})
_QUERY_WORDS = frozenset(
    {"query", "q", "search", "keywords", "keyword", "question", "topic", "term", "terms", "prompt"}
)


@dataclass(frozen=True)
class FunctionSpec:
    """One function tool of a request: its name, description and parameters schema."""

    name: str
    description: str = ""
    parameters: dict[str, Any] = field(default_factory=dict)


class _Unfillable(Exception):
    """A required parameter that the message gives no value for."""


def choose_function(
    message: str, functions: Sequence[FunctionSpec], *, call_required: bool = False
) -> tuple[str, dict[str, Any]] | None:
    """The best-fitting function of ``functions`` whose required parameters ``message``
    fills, with its arguments; None when there is none (see the module docstring)."""
    if not functions:
        return None
    read = _Message(message[:_MAX_MESSAGE_CHARS])
    words = read.terms
    ranked: list[tuple[int, int, FunctionSpec]] = []
    for order, spec in enumerate(functions):
        name_words = set(terms(" ".join(_NAME_PART.findall(spec.name))))
        description_words = set(terms(spec.description))
        score = 2 * len(words & name_words) + len(words & description_words - name_words)
        if score > 0 or call_required:
            ranked.append((-score, order, spec))
    for _, _, spec in sorted(ranked, key=lambda r: (r[0], r[1])):
        try:
            return spec.name, _fill_arguments(read, spec.parameters)
        except _Unfillable:
            continue
    return None


class _Message:
    """What a message offers to parameters, each worked out on first use, then kept."""

    def __init__(self, text: str) -> None:
        self.text = text

    @cached_property
    def terms(self) -> set[str]:
        return set(terms(self.text))

    @cached_property
    def words(self) -> list[str]:
        return [w.lower() for w in _WORD.findall(self.text)]

    @cached_property
    def word_terms(self) -> list[set[str]]:
        return [set(terms(word)) for word in self.words]

    @cached_property
    def word_runs(self) -> set[str]:
        """Every run of up to ``_MAX_ENUM_WORDS`` words, so that an enum value is one
        lookup: the work grows with the message plus the values, not with their product."""
        words = self.words
        return {
            " ".join(words[i : i + n])
            for n in range(1, _MAX_ENUM_WORDS + 1)
            for i in range(len(words) - n + 1)
        }

    @cached_property
    def url(self) -> str | None:
        return find_url(self.text)

    @cached_property
    def place(self) -> str | None:
        return _place(self.text)

    @cached_property
    def query(self) -> str:
        return _query(self.text)


def _fill_arguments(message: _Message, schema: dict[str, Any]) -> dict[str, Any]:
    """Arguments for a function's ``parameters`` schema, read from ``message``.

    Raises ``_Unfillable`` when a required parameter cannot be filled."""
    properties = schema.get("properties")
    if not isinstance(properties, dict):
        properties = {}
    required = [r for r in schema.get("required") or [] if isinstance(r, str)]
    if any(r not in properties for r in required):
        raise _Unfillable()  # required but not described: nothing says what it takes
    arguments: dict[str, Any] = {}
    for name, prop in properties.items():
        if not isinstance(name, str) or not isinstance(prop, dict):
            continue
        is_required = name in required
        try:
            arguments[name] = _value(message, name, prop, required=is_required)
        except _Unfillable:
            if is_required:
                raise
    return arguments


def find_url(text: str) -> str | None:
    """The first http(s) URL in ``text``, without the punctuation that ends a sentence."""
    found = _URL.search(text)
    if found is None:
        return None
    url = found.group(0).rstrip(".,;:!?")
    if url.endswith(")") and url.count("(") < url.count(")"):
        url = url[:-1]  # "(see https://x.org/a)": the bracket is the sentence's
    return url


def _value(message: _Message, name: str, prop: dict[str, Any], *, required: bool) -> Any:
    if "const" in prop:
        if not required:
            raise _Unfillable()
        return prop["const"]
    enum = prop.get("enum")
    if isinstance(enum, list) and enum:
        return _enum_value(message, enum, required=required)
    kind = _type_of(prop)
    if kind in ("number", "integer"):
        return _number(message, prop, integer=kind == "integer")
    if kind == "boolean":
        return _flag(message, name, required=required)
    if kind == "string":
        return _string(message, name, prop, required=required)
    raise _Unfillable()  # arrays, objects, unions: not read from a message


def _type_of(prop: dict[str, Any]) -> str | None:
    if "type" not in prop:
        # No type: text, unless it is a union or an object by its keywords.
        return None if {"anyOf", "oneOf", "allOf", "properties"} & prop.keys() else "string"
    kind = prop["type"]
    if isinstance(kind, list):  # ["string", "null"]: the first that is not null
        kind = next((k for k in kind if k != "null"), None)
    return kind if isinstance(kind, str) else None


def _enum_value(message: _Message, enum: list[Any], *, required: bool) -> Any:
    for value in enum:
        if isinstance(value, str) and " ".join(_WORD.findall(value.lower())) in message.word_runs:
            return value
    if required:
        return enum[0]
    raise _Unfillable()


def _number(message: _Message, prop: dict[str, Any], *, integer: bool) -> int | float:
    for match in _NUMBER.finditer(message.text):
        text = match.group(0)
        if integer and "." in text:
            continue
        # "3" is 3 and "2.5" is 2.5, for a number as for an integer.
        value: int | float = float(text) if "." in text else int(text)
        if _within(value, prop):
            return value
    raise _Unfillable()


def _within(value: float, prop: dict[str, Any]) -> bool:
    """Whether ``value`` meets the schema's bounds (those that are numbers)."""

    def bound(key: str) -> float | None:
        found = prop.get(key)
        return found if isinstance(found, int | float) and not isinstance(found, bool) else None

    low, high = bound("minimum"), bound("maximum")
    above, below = bound("exclusiveMinimum"), bound("exclusiveMaximum")
    return (
        (low is None or value >= low)
        and (high is None or value <= high)
        and (above is None or value > above)
        and (below is None or value < below)
    )


def _flag(message: _Message, name: str, *, required: bool) -> bool:
    named = set(terms(" ".join(_NAME_PART.findall(name))))
    if named & message.terms:
        words = message.words
        for i, stems in enumerate(message.word_terms):
            if named & stems:
                # "without the forecast", "don't include it": a negation just before.
                return not any(w in _NEGATION for w in words[max(0, i - 3) : i])
    if required:
        return False
    raise _Unfillable()


def _string(message: _Message, name: str, prop: dict[str, Any], *, required: bool) -> str:
    about = {w.lower() for w in _NAME_PART.findall(name)}
    described = {w.lower() for w in _WORD.findall(str(prop.get("description") or ""))}
    value: str | None
    if "pattern" in prop:
        value = None
    elif prop.get("format") in ("uri", "url", "iri") or about & _URL_WORDS:
        value = message.url
    elif about & _PLACE_WORDS or (
        described & _PLACE_DESCRIPTION_WORDS and not about & _QUERY_WORDS
    ):
        value = message.place
    elif not required:
        value = None  # an optional free-text parameter: the message does not name it
    elif about & _QUERY_WORDS:
        value = message.query
    else:
        value = " ".join(message.text.split()) or None
    if value is None or not _string_fits(value, prop):
        raise _Unfillable()
    return value


def _place(message: str) -> str | None:
    """The capitalised words after a preposition ("in Paris today" gives "Paris"), else the
    first capitalised words that do not start a sentence."""
    for lead in _PLACE_LEAD.finditer(message):
        place = _capitalised_run(message, lead.end())
        if place:
            return place
    for space in _INNER_WORD.finditer(message):
        place = _capitalised_run(message, space.end())
        if place and place != "I":
            return place
    return None


def _capitalised_run(text: str, start: int) -> str | None:
    """The run of capitalised words from ``start`` ("New York, NY today" gives
    "New York, NY"), or None. A word that ends a sentence or a clause ends the run. Reads
    only the run and the word after it."""
    words: list[str] = []
    for match in _SPAN.finditer(text, start):
        word = match.group(0)
        bare = word.rstrip(".,;:!?)\"'’")
        if not bare or not (bare[0].isalpha() and bare[0].isupper()):
            break
        tail = word[len(bare) :]
        words.append(bare + ("," if tail == "," else ""))
        if tail and tail != ",":
            break
    return " ".join(words).rstrip(",") or None


def _query(message: str) -> str:
    lead = _QUERY_LEAD.search(message)
    if lead is not None:
        phrase = lead.group(1).strip().rstrip(".").strip()
        if phrase:
            return " ".join(phrase.split())
    words = _WORD.findall(message)
    kept = [w for w in words if w.lower() not in STOP_WORDS]
    return " ".join(kept or words) or " ".join(message.split())


def _string_fits(value: str, prop: dict[str, Any]) -> bool:
    low, high = prop.get("minLength"), prop.get("maxLength")
    return not (
        (isinstance(low, int) and len(value) < low) or (isinstance(high, int) and len(value) > high)
    )
