"""Runs a user-guide recipe as torchrun's training script, with a test's eyes and hands.

``python -m tests.packaging._recipe_runner RECIPE.py [ARGS...]`` runs the recipe unchanged
(``runpy``, as ``__main__``) after wrapping three ``PeerRecovery`` methods:

- ``restore`` appends a line to ``restores-rank<R>.jsonl`` (role, step, source,
  private_restored; role null and ``last_failure`` as why when it returned ``None``);
- ``snapshot`` at step ``$RECIPE_PAUSE_AT`` writes ``paused-rank<R>.json`` (with a hash of
  the registered state) and, until ``<out>/released`` exists, waits there to be killed, as
  a job would be when a pod is lost;
- ``close`` writes ``final-rank<R>.json`` with the step and hash of the registered state.

``$RECIPE_OUT`` is the output directory.
"""

from __future__ import annotations

import json
import os
import runpy
import sys
import time
from pathlib import Path
from typing import Any

from peer_recovery.demo.train import digest_state
from peer_recovery.recovery import PeerRecovery

OUT = Path(os.environ["RECIPE_OUT"])
PAUSE_AT = int(os.environ.get("RECIPE_PAUSE_AT", "-1"))
RANK = int(os.environ.get("RANK", "0"))


def state_hash(recovery: PeerRecovery) -> str:
    """The digest of the replicated state (local shards of DTensors)."""
    objects = sorted(recovery.state.objects.items())
    return digest_state((name, obj.state_dict()) for name, obj in objects)


def write(name: str, value: dict[str, Any]) -> None:
    tmp = OUT / f"{name}.tmp"
    tmp.write_text(json.dumps(value))
    tmp.rename(OUT / name)


_restore, _snapshot, _close = PeerRecovery.restore, PeerRecovery.snapshot, PeerRecovery.close


def restore(self: PeerRecovery, *args: Any, **kwargs: Any) -> Any:
    result = _restore(self, *args, **kwargs)
    report: dict[str, Any] = {"role": None, "why": self.last_failure}
    if result is not None:
        report = {"role": result.role.value, "step": result.step, "source": result.source,
                  "private_restored": result.private_restored}  # fmt: skip
    with (OUT / f"restores-rank{RANK}.jsonl").open("a") as lines:
        lines.write(json.dumps(report) + "\n")
    return result


def snapshot(self: PeerRecovery, step: int) -> float:
    stall = _snapshot(self, step)
    if step == PAUSE_AT and not (OUT / "released").exists():
        self.wait()
        write(f"paused-rank{RANK}.json", {"step": step, "hash": state_hash(self)})
        while True:  # a pod is about to be lost; torchrun stops this worker
            time.sleep(0.2)
    return stall


def close(self: PeerRecovery, *args: Any, **kwargs: Any) -> None:
    write(f"final-rank{RANK}.json", {"step": self.stats.last_step, "hash": state_hash(self)})
    _close(self, *args, **kwargs)


PeerRecovery.restore, PeerRecovery.snapshot, PeerRecovery.close = restore, snapshot, close  # type: ignore[method-assign]

if __name__ == "__main__":
    recipe = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(recipe, run_name="__main__")
