"""The contract modules are shared with the operator image, which has no torch: importing
them in a fresh interpreter must pull in neither torch nor kopf nor kubernetes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

MODULES = [
    "peer_recovery.api",
    "peer_recovery.bodies",
    "peer_recovery.job_annotations",
    "peer_recovery.planning",
]


@pytest.mark.parametrize("module", MODULES)
def test_contract_module_imports_nothing_heavy(module: str) -> None:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = {name.split(".")[0] for name in json.loads(result.stdout)}
    assert not loaded & {"torch", "kopf", "kubernetes", "numpy"}, sorted(loaded)
