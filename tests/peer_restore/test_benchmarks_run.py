"""The peer-restore benchmarks still run, end to end, at a tiny size.

``make bench`` is not part of ``make test``; without this a benchmark can fall behind an
API change and only fail when someone next measures. Each is run as a user would run it
(a subprocess, its own arguments) at a size that takes seconds, and must print its summary
line with numbers in it. No timing is asserted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.multiproc

REPO = Path(__file__).resolve().parents[2]
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def _run(args: list[str], env: dict[str, str] | None = None) -> str:
    done = subprocess.run(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.returncode == 0, f"{args[0]} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr[-3000:]  # e.g. a thread that died
    return done.stdout.strip().splitlines()[-1]


def test_round_scale_runs_both_exchanges() -> None:
    last = _run(
        ["benchmarks/round_scale.py", "--ranks", "32", "--per-pod", "4", "--procs", "2",
         "--repeats", "1"]
    )  # fmt: skip
    assert re.fullmatch(
        rf"RESULT ranks=32 round_seconds_per_rank={NUMBER} previous_seconds_per_rank={NUMBER}",
        last,
    ), last


def test_peer_restore_runs_every_method_on_every_workload() -> None:
    last = _run(["benchmarks/peer_restore.py", "--repeats", "1"], {"PEER_RESTORE_SCALE": "0.002"})
    assert re.fullmatch(
        rf"RATIOS small_vs_previous={NUMBER} model_vs_previous={NUMBER} "
        rf"receiver_vs_floor={NUMBER}",
        last,
    ), last
