"""The ``local`` model's extractive answers (server/providers/llm/local/extractive.py): how the
sources are cut into sentences, how words are compared, and which sentences are quoted."""

from __future__ import annotations

from server.providers.llm.local.extractive import best_sentences, split_sentences, terms


def test_split_sentences_keeps_prose_and_drops_markdown_structure() -> None:
    text = """Title
=====

# A heading
**Lead-in.** First sentence, e.g. with an abbreviation. Pi is 3.14 here! Is it
wrapped? Yes (it is.) Next one.

- A list item.
2) A numbered item
that wraps.
> A quote.

```sh
echo "Not a sentence."
```
| a | table. |
|---|---|
---
<div>
Last words."""
    assert [s.text for s in split_sentences(text)] == [
        "First sentence, e.g. with an abbreviation.",
        "Pi is 3.14 here!",
        "Is it wrapped?",
        "Yes (it is.)",
        "Next one.",
        "A list item.",
        "A numbered item that wraps.",
        "A quote.",
        "Last words.",
    ]


def test_split_sentences_cuts_a_very_long_sentence() -> None:
    [sentence] = split_sentences("word " * 200)
    assert len(sentence.text) <= 403 and sentence.text.endswith("...")


def test_terms_match_the_forms_of_a_word() -> None:
    assert len({*terms("cancel cancels cancelled cancelling cancellation")}) == 1
    assert terms("How do searches stop?") == terms("search stopped")
    assert terms("the web_search feature") == ["web_search", "featur"]


def test_best_sentences_keep_only_those_near_the_best() -> None:
    sources = [
        (
            1,
            "Penguins swim fast in cold water.\n\nThe zoo opens at nine every day."
            "\n\nA shop near the gate sells hats, maps, mugs, toy penguins and many "
            "other souvenirs.",
        ),
        (2, "Penguins and swimming go together."),
    ]
    # The shop's sentence names penguins, but scores under half the best: not quoted.
    quoted = best_sentences("Can penguins swim?", sources, count=5)
    assert [(q.source, q.text) for q in quoted] == [
        (1, "Penguins swim fast in cold water."),
        (2, "Penguins and swimming go together."),
    ]
    assert best_sentences("who are you?", sources) == []
