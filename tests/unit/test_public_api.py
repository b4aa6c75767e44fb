"""``import peer_recovery`` offers the user API only, resolved lazily and without torch."""

from __future__ import annotations

import json
import subprocess
import sys

import peer_recovery

USER_API = {
    "DataPosition",
    "PeerRecovery",
    "RNGState",
    "RestoreResult",
    "Role",
    "SizingError",
    "TransferError",
}


def test_the_package_exports_the_user_api_and_nothing_else() -> None:
    assert set(peer_recovery.__all__) == USER_API | {"__version__"}
    for name in USER_API:
        assert getattr(peer_recovery, name).__name__ == name
    assert issubclass(peer_recovery.SizingError, Exception)
    assert issubclass(peer_recovery.TransferError, Exception)


def test_planner_internals_are_not_package_attributes() -> None:
    # In a fresh interpreter: a submodule imported earlier by another test would be an
    # attribute of the package (that is how Python binds submodules), which is no export.
    internals = ["assign_sources", "PlanEntry", "RankPlan", "Phase", "check_transition"]
    code = f"import peer_recovery as p; print([n for n in {internals!r} if hasattr(p, n)])"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "[]"
    for internal in internals:
        assert internal not in peer_recovery.__all__


def test_importing_the_package_does_not_import_torch() -> None:
    code = "import json, sys, peer_recovery; print(json.dumps(sorted(sys.modules)))"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert "torch" not in {m.split(".")[0] for m in json.loads(result.stdout)}
