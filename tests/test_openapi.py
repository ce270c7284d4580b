"""GET /openapi.json: a well-formed OpenAPI 3.1 document that names every route the app serves,
and whose answer schemas the server's real answers meet. (The contract run, `make contract`,
fuzzes the running server against the same document.)"""

from __future__ import annotations

import re
from typing import Any

import jsonschema

from server.api import openapi
from server.app import create_app
from server.config import Settings
from tests.conftest import Tether

_METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
# Not part of the JSON API: the WebSocket is routed below quart (not in the url map), and
# the page's files are static.
_NOT_DOCUMENTED = ("/static/",)


def _refs(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in _refs(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in _refs(value)]
    return []


def test_the_document_is_openapi_3_1_in_structure() -> None:
    doc = openapi.document()
    assert doc["openapi"].startswith("3.1.")
    assert doc["info"]["title"] and doc["info"]["version"]
    schemas = doc["components"]["schemas"]
    for schema in schemas.values():
        # OpenAPI 3.1's schema objects are JSON Schema 2020-12.
        jsonschema.Draft202012Validator.check_schema(schema)
    for ref in _refs(doc):
        assert ref.startswith("#/components/schemas/") and ref.rsplit("/", 1)[1] in schemas, ref
    operation_ids: list[str] = []
    for path, item in doc["paths"].items():
        assert path.startswith("/")
        templated = set(re.findall(r"\{([^}]+)\}", path))
        for method, op in item.items():
            assert method in _METHODS, (path, method)
            operation_ids.append(op["operationId"])
            assert op["responses"], (path, method)
            for status, answer in op["responses"].items():
                assert re.fullmatch(r"[1-5][0-9]{2}", status), (path, status)
                assert answer["description"] is not None
                for media_type, content in answer.get("content", {}).items():
                    jsonschema.Draft202012Validator.check_schema(content["schema"])
                    if int(status) >= 400:  # every error has OpenAI's shape (API.md, Errors)
                        assert media_type == "application/json"
                        assert content["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
            params = op.get("parameters", [])
            assert {p["name"] for p in params if p["in"] == "path"} == templated, path
            for param in params:
                assert param["in"] in ("path", "query", "header", "cookie")
                assert param["in"] != "path" or param["required"] is True
            for scheme in op.get("security", []):
                assert set(scheme) <= set(doc["components"]["securitySchemes"])
    assert len(operation_ids) == len(set(operation_ids)), "operationIds must be unique"


def test_every_route_the_app_serves_is_in_the_document() -> None:
    paths = openapi.document()["paths"]
    app = create_app(Settings())
    missing: list[str] = []
    for rule in app.url_map.iter_rules():
        if rule.rule.startswith(_NOT_DOCUMENTED):
            continue
        path = re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            if method.lower() not in paths.get(path, {}):
                missing.append(f"{method} {path}")
    assert not missing, "not in /openapi.json: " + ", ".join(missing)


def test_the_chat_body_schema_is_the_validating_model() -> None:
    """The request body is described by the model that checks it, not by a copy."""
    doc = openapi.document()
    for path in ("/api/chat/completions", "/v1/chat/completions"):
        body = doc["paths"][path]["post"]["requestBody"]["content"]["application/json"]
        assert body["schema"] == {"$ref": "#/components/schemas/ChatRequestModel"}
    schema = doc["components"]["schemas"]["ChatRequestModel"]
    assert schema["required"] == ["messages"]
    assert schema["properties"]["temperature"]["anyOf"][0] == {
        "type": "number",
        "minimum": 0,
        "maximum": 2,
    }
    streamed = doc["paths"]["/api/tasks/{task_id}/events"]["get"]["responses"]["200"]
    assert list(streamed["content"]) == ["text/event-stream"]


def _check(answer: Any, name: str) -> None:
    """``answer`` meets the document's schema ``name`` (its references resolved in place)."""
    doc = openapi.document()
    schema = {"$ref": f"#/components/schemas/{name}", "components": doc["components"]}
    jsonschema.validate(answer, schema, cls=jsonschema.Draft202012Validator)


async def test_the_document_is_served(tether: Tether) -> None:
    response = await tether.client.get("/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == openapi.document()


async def test_real_answers_meet_their_documented_schemas(tether: Tether) -> None:
    client = tether.client
    ask = {"model": "local", "messages": [{"role": "user", "content": "hi"}]}
    sync = await client.post("/api/chat/completions", json=ask)
    assert sync.status_code == 200
    _check(sync.json(), "ChatCompletion")
    accepted = await client.post("/api/chat/completions", json={**ask, "background": True})
    assert accepted.status_code == 202
    _check(accepted.json(), "BackgroundAccepted")
    task_id = accepted.json()["task_id"]
    await tether.events(task_id)
    _check((await client.get(f"/api/tasks/{task_id}")).json(), "Task")
    _check((await client.post(f"/api/tasks/{task_id}/stop")).json(), "Task")
    _check((await client.get("/api/tasks?include_finished=true")).json(), "TaskList")
    _check((await client.get("/api/models")).json(), "ModelList")
    _check((await client.get("/v1/models/local")).json(), "ModelObject")
    _check((await client.get("/api/tools")).json(), "ToolList")
    _check((await client.get("/healthz")).json(), "Health")
    _check((await client.get("/readyz")).json(), "Ready")
    for bad in (
        client.get("/api/tasks/task_nope"),
        client.post("/api/chat/completions", json={"messages": []}),
    ):
        response = await bad
        assert response.status_code in (400, 404)
        _check(response.json(), "ErrorBody")
