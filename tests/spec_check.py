"""Validation against OpenAI's published OpenAPI document (issue 17).

The schemas come from ``tests/data/openai-openapi/responses.schemas.json``, an extract of
the document made by the script beside it (its README names the repository and commit).
They are used as written: ``oneOf`` (where the document also names a ``discriminator``,
exactly one variant must match, which is what the discriminator selects) and ``anyOf`` are
checked by ``jsonschema``'s Draft 2020-12 validator, the dialect of OpenAPI 3.1.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError, best_match
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

SPEC_FILE = Path(__file__).parent / "data" / "openai-openapi" / "responses.schemas.json"
SPEC_URI = "urn:openai-openapi"


@cache
def _document() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(SPEC_FILE.read_text(encoding="utf-8"))
    return document


@cache
def validator(schema: str) -> Draft202012Validator:
    """A validator of the document's ``components.schemas[schema]``, its ``$ref``s resolved
    in the document."""
    document = _document()
    if schema not in document["components"]["schemas"]:
        raise KeyError(f"{schema} is not in {SPEC_FILE.name}: add it to ROOTS in extract.py")
    registry: Registry[Any] = Registry().with_resource(
        SPEC_URI, Resource.from_contents(document, default_specification=DRAFT202012)
    )
    return Draft202012Validator(
        {"$ref": f"{SPEC_URI}#/components/schemas/{schema}"}, registry=registry
    )


def spec_errors(schema: str, instance: Any) -> list[str]:
    """Why ``instance`` is not a valid ``schema`` of the document (empty when it is)."""
    errors = list(validator(schema).iter_errors(instance))
    if not errors:
        return []
    best = _cause(best_match(errors))
    where = "/".join(str(p) for p in best.absolute_path) or "(root)"
    rest = [f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}" for e in errors]
    return [f"{where}: {best.message}", *rest]


def _cause(error: ValidationError) -> ValidationError:
    """The deepest cause of a oneOf/anyOf failure: in the variant whose ``type`` matched
    (the one the discriminator names), else the likeliest."""
    while error.context:
        branches: dict[Any, list[ValidationError]] = {}
        for sub in error.context:
            branches.setdefault(sub.schema_path[0], []).append(sub)
        typed = [
            errs for errs in branches.values() if not any(list(e.path) == ["type"] for e in errs)
        ]
        error = best_match(typed[0] if len(typed) == 1 else error.context)
    return error


def assert_spec_valid(schema: str, instance: Any) -> None:
    errors = spec_errors(schema, instance)
    assert not errors, f"not a valid {schema}: " + "\n".join(errors[:8])
