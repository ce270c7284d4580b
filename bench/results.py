"""Everything a run records, and where it is written (``bench/results/<name>.*``)."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.stats import summarize

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_PACKAGES = (
    "trio",
    "hypercorn",
    "quart",
    "quart-trio",
    "httpx2",
    "h11",
    "trio-websocket",
    "wsproto",
    "psutil",
    "matplotlib",
)


def machine_info() -> dict[str, Any]:
    cpu_model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_total_mb = None
    try:
        import psutil  # type: ignore[import-untyped]

        mem_total_mb = round(psutil.virtual_memory().total / 2**20)
    except ImportError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model,
        "memory_mb": mem_total_mb,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average_start": [round(x, 2) for x in os.getloadavg()],
    }


def versions() -> dict[str, str]:
    out: dict[str, str] = {}
    for name in _PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "missing"
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=RESULTS_DIR.parent.parent,
        )
        out["tether_commit"] = commit.stdout.strip() or "uncommitted"
    except (OSError, subprocess.SubprocessError):
        out["tether_commit"] = "unknown"
    return out


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Results:
    name: str
    mode: str
    started_at: float = field(default_factory=time.time)
    machine: dict[str, Any] = field(default_factory=machine_info)
    versions: dict[str, str] = field(default_factory=versions)
    settings: dict[str, Any] = field(default_factory=dict)
    # scenario -> set name -> summary (ms) plus metadata
    sets: dict[str, dict[str, dict[str, Any]]] = field(default_factory=dict)
    # scenario -> free-form figures (headline rows, per-level tables, ...)
    figures: dict[str, Any] = field(default_factory=dict)
    checks: list[Check] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    charts: list[str] = field(default_factory=list)

    def add_set(
        self, scenario: str, key: str, samples_s: list[float], **meta: Any
    ) -> dict[str, Any]:
        summary = {**summarize(samples_s), **meta}
        self.sets.setdefault(scenario, {})[key] = summary
        return summary

    def get_set(self, scenario: str, key: str) -> dict[str, Any] | None:
        return self.sets.get(scenario, {}).get(key)

    def check(self, name: str, ok: bool, detail: str) -> bool:
        self.checks.append(Check(name, ok, detail))
        return ok

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks) and not self.errors

    def to_json(self) -> dict[str, Any]:
        machine = dict(self.machine)
        machine["load_average_end"] = [round(x, 2) for x in os.getloadavg()]
        return {
            "name": self.name,
            "mode": self.mode,
            "started_at": self.started_at,
            "duration_s": round(time.time() - self.started_at, 1),
            "ok": self.ok,
            "machine": machine,
            "versions": self.versions,
            "settings": self.settings,
            "units": "milliseconds unless a key says otherwise",
            "sets": self.sets,
            "figures": self.figures,
            "checks": [c.__dict__ for c in self.checks],
            "notes": self.notes,
            "errors": self.errors,
            "charts": self.charts,
        }

    def write_json(self, directory: Path = RESULTS_DIR) -> Path:
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2, sort_keys=False) + "\n")
        tmp.replace(path)
        return path
