"""Rendering the chart with the real helm for the packaging tests: objects as dicts."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "peer-recovery"


def helm(bin_dir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(bin_dir / "helm"), *args], capture_output=True, text=True, timeout=120, check=check
    )


def render(bin_dir: Path, *sets: str, namespace: str = "ops") -> list[dict[str, Any]]:
    """``helm template rel CHART`` with ``--set`` for each of ``sets``; the objects."""
    argv = ["template", "rel", str(CHART), "--namespace", namespace]
    for s in sets:
        argv += ["--set", s]
    return [d for d in yaml.safe_load_all(helm(bin_dir, *argv).stdout) if d]


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = by_kind(objects, kind)
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def metrics_service(objects: list[dict[str, Any]]) -> dict[str, Any]:
    """The metrics Service (the webhook has a Service of its own)."""
    found = [o for o in by_kind(objects, "Service")
             if o["metadata"]["labels"].get("app.kubernetes.io/component") == "metrics"]  # fmt: skip
    assert len(found) == 1, f"{len(found)} metrics Services"
    return found[0]
