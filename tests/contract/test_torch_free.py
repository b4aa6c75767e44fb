"""The contract modules are shared with the operator image, which has no torch: importing
them in a fresh interpreter must pull in neither torch nor kopf nor kubernetes."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

MODULES = [
    "peer_recovery.contract",
    "peer_recovery.contract.annotations",
    "peer_recovery.contract.bodies",
    "peer_recovery.contract.errors",
    "peer_recovery.contract.moves",
    "peer_recovery.contract.names",
    "peer_recovery.contract.ordinals",
    "peer_recovery.contract.phases",
    "peer_recovery.contract.planning",
    "peer_recovery.contract.records",
]


@pytest.mark.parametrize("module", MODULES)
def test_contract_module_imports_nothing_heavy(module: str) -> None:
    code = f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    loaded = {name.split(".")[0] for name in json.loads(result.stdout)}
    assert not loaded & {"torch", "kopf", "kubernetes", "numpy"}, sorted(loaded)
