"""Extract from OpenAI's published OpenAPI document the schemas the Responses tests need.

Usage: python tests/data/openai-openapi/extract.py <openapi.json> [<commit>]

Reads the whole document (``openapi.json`` of github.com/openai/openai-openapi) and writes
``responses.schemas.json`` beside this script: the schemas named in ``ROOTS`` and every
schema they ``$ref``, unchanged, under ``components.schemas`` (so that every ``$ref`` of the
document still resolves), with the document's ``openapi`` and ``info`` and where it came from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

# What Tether's /v1/responses answers and takes: the Response, its stream events, the input
# items list, the error body, and the request (to tell a spec-invalid body from one the spec
# allows and Tether refuses).
ROOTS = ("Response", "ResponseStreamEvent", "ResponseItemList", "ErrorResponse", "CreateResponse")
PREFIX = "#/components/schemas/"


def _refs(node: Any, out: set[str]) -> None:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                if not value.startswith(PREFIX):
                    raise ValueError(f"a $ref outside components.schemas: {value}")
                out.add(value.removeprefix(PREFIX))
            else:
                _refs(value, out)
    elif isinstance(node, list):
        for value in node:
            _refs(value, out)


def extract(document: dict[str, Any]) -> dict[str, dict[str, Any]]:
    schemas: dict[str, dict[str, Any]] = document["components"]["schemas"]
    kept: set[str] = set()
    todo = list(ROOTS)
    while todo:
        name = todo.pop()
        if name in kept:
            continue
        kept.add(name)
        found: set[str] = set()
        _refs(schemas[name], found)
        todo.extend(found - kept)
    return {name: schemas[name] for name in sorted(kept)}


def main() -> None:
    source = Path(sys.argv[1])
    commit = sys.argv[2] if len(sys.argv) > 2 else "unknown"
    document = json.loads(source.read_text(encoding="utf-8"))
    out = {
        "source": {
            "repository": "https://github.com/openai/openai-openapi",
            "commit": commit,
            "file": "openapi.json",
            "roots": list(ROOTS),
        },
        "openapi": document["openapi"],
        "info": document["info"],
        "components": {"schemas": extract(document)},
    }
    target = Path(__file__).with_name("responses.schemas.json")
    target.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"{target}: {len(out['components']['schemas'])} schemas")


if __name__ == "__main__":
    main()
