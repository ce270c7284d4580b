"""Write ``bench/guidellm/tokenizer/``: a byte-level tokenizer for guidellm runs offline.

guidellm needs a Hugging Face tokenizer to make its synthetic prompts (it tokenizes filler text
and cuts it at the requested token count), and by default it looks for one named after the
model. Tether's ``local`` model has none on any hub, and with ``HF_HUB_OFFLINE=1`` nothing can
be fetched anyway. This one is made here with the ``tokenizers`` library: one token per byte
(a BPE model over the 256 byte symbols, with no merges), so it needs no training data and
round-trips any text, and ``prompt_tokens=N`` means a prompt of N bytes. ``local`` counts
word-sized tokens (a word and the space after it), so that is about N/6 of its tokens.

Run it with a Python that has ``tokenizers`` (guidellm's environment has it)::

    .tools/guidellm/bin/python bench/guidellm/make_tokenizer.py

It overwrites the two files; every run writes the same bytes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

OUT = Path(__file__).resolve().parent / "tokenizer"
# What transformers' AutoTokenizer reads beside tokenizer.json: the class to load it with
# (PreTrainedTokenizerFast, which transformers 4 and 5 both know).
CONFIG = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": 1 << 20}


def byte_level_tokenizer() -> Tokenizer:
    """One token per byte of the UTF-8 text."""
    # The byte-level pre-tokenizer writes each byte as one printable symbol; with no merges
    # the model maps each symbol to its own id and never joins two.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    tokenizer = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(alphabet)}, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def main() -> int:
    tokenizer = byte_level_tokenizer()
    sample = "Tether streams tokens: ¿qué? 東京\n"
    ids = tokenizer.encode(sample).ids
    if len(ids) != len(sample.encode()) or tokenizer.decode(ids) != sample:
        print("make_tokenizer: the tokenizer does not give one token per byte", file=sys.stderr)
        return 1
    OUT.mkdir(exist_ok=True)
    tokenizer.save(str(OUT / "tokenizer.json"))
    (OUT / "tokenizer_config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    print(f"wrote {OUT}/tokenizer.json and tokenizer_config.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
