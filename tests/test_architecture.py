"""The shape of the house, held by tests: imports point down the layers, a misspelt event
type does not type-check, and the page's mirror of the terminal set matches the server's."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import mypy.api
import pytest

from server.events import TERMINAL_TYPES

ROOT = Path(__file__).resolve().parent.parent
SERVER = ROOT / "server"

# Top to bottom; a part may import only parts of lower layers (and its own modules). Parts
# in one layer are independent of each other: the pipeline does not know the task runtime
# that runs it, nor the runtime the pipeline.
LAYERS: list[set[str]] = [
    {"__main__"},
    {"cli"},
    {"app"},
    {"access_log"},
    {"api"},
    {"runtime", "startup_check"},
    {"sessions"},
    {"pipeline", "tasks"},
    {"providers"},
    {"auth"},
    {"schemas", "config", "metrics", "load", "prompt_markers", "tracing"},
    {"record", "events"},
    {"fastjson", "exception_groups", "library_internals"},
]


def _part(module: str) -> str:
    """``server.tasks.redis.store`` -> ``tasks``."""
    return module.split(".")[1]


def _imports() -> dict[str, set[str]]:
    """Each server module's imports of other server modules (anywhere in the module)."""
    graph: dict[str, set[str]] = {}
    for path in SERVER.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        module = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module == "server":
                found.update(f"server.{alias.name}" for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("server."):
                found.add(str(node.module))
            elif isinstance(node, ast.Import):
                found.update(a.name for a in node.names if a.name.startswith("server."))
        graph[module] = found
    return graph


def test_every_part_of_the_server_has_a_layer() -> None:
    known = set().union(*LAYERS)
    parts = {_part(m) for m in _imports() if m != "server"}
    assert parts <= known, f"no layer for {sorted(parts - known)}: add it to LAYERS"


def test_imports_point_down_the_layers_only() -> None:
    layer = {part: i for i, parts in enumerate(LAYERS) for part in parts}
    wrong = []
    for module, imported in _imports().items():
        if module == "server":
            continue
        for target in imported:
            here, there = _part(module), _part(target)
            if here != there and layer[there] <= layer[here]:
                wrong.append(f"{module} imports {target}")
    assert wrong == []


def _type_check(snippet: str, tmp_path: Path) -> str:
    path = tmp_path / "snippet.py"
    path.write_text(snippet)
    out, err, _ = mypy.api.run(
        [
            "--strict",
            "--no-incremental",
            "--follow-imports=silent",
            "--cache-dir",
            str(tmp_path / "cache"),
            str(path),
        ]
    )
    return out + err


@pytest.mark.parametrize(
    "snippet, error",
    [
        (
            "from server.events import Event\n\n\ndef f(e: Event) -> bool:\n"
            "    return e.type == 'dleta'\n",
            "comparison-overlap",
        ),
        (
            "from server.pipeline.emit import Emitter\n\n\nasync def f(emit: Emitter) -> None:\n"
            "    await emit.status({'phase': 'web_search', 'action': 'serach',\n"
            "                       'description': 'x', 'done': True})\n",
            "typeddict-item",
        ),
        (
            "from server.pipeline.emit import Emitter\n\n\nasync def f(emit: Emitter) -> None:\n"
            "    await emit.delta({'contnet': 'x'})\n",
            "typeddict",
        ),
    ],
)
def test_a_misspelt_event_type_or_field_fails_to_type_check(
    snippet: str,
    error: str,
    tmp_path: Path,
) -> None:
    assert error in _type_check(snippet, tmp_path)


def test_a_well_spelt_event_type_checks(tmp_path: Path) -> None:
    snippet = (
        "from server.events import Event\n\n\ndef f(e: Event) -> bool:\n"
        "    return e.type == 'delta'\n"
    )
    assert "Success" in _type_check(snippet, tmp_path)


def test_the_page_mirrors_the_servers_terminal_event_types() -> None:
    script = (SERVER / "static" / "tether.js").read_text()
    declared = re.search(r"TERMINAL_TYPES = Object\.freeze\(\[([^\]]*)\]\)", script)
    assert declared is not None
    assert set(re.findall(r'"([^"]+)"', declared.group(1))) == set(TERMINAL_TYPES)
