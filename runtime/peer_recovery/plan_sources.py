"""Where a rejoining pod's plan (who streams to it) comes from.

A ``PlanSource`` answers, for one target pod and one rendezvous round, "which pod should
stream to you", or ``None`` when it has no plan within the bound it is given; the plugin
then lets the in-band planner decide (``plannedBy: runtime``). Implementations:

- ``LocalPlanSource``: a JSON file (demo, tests, or anything that can write a file);
- ``NoPlanSource``: never has a plan; every plan is made in-band;
- ``peer_recovery.kube.plans.KubePlanSource`` (the operator's ``PeerRecovery`` objects).

Which one an agent uses is the plugin's wiring (:mod:`peer_recovery.plugin`).

The file format is ``{"plans": [{"target": 2, "source": 1, "mode": "Peer",
"plannedBy": "operator"}, ...]}``; ``target`` and ``source`` are pod ordinals, ``mode``
is ``Peer`` or ``Local`` (``source`` null), ``plannedBy`` defaults to ``operator``.
Errors (:class:`peer_recovery.protocol.records.PlanError`) name the file and the entry that
was wrong.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Final, Protocol

from peer_recovery.protocol.records import PlanEntry, PlanError

__all__ = ["ENV_PLAN_FILE", "ENV_PLAN_TIMEOUT", "LocalPlanSource", "NoPlanSource", "PlanSource"]

ENV_PLAN_FILE: Final = "PEER_RECOVERY_PLAN_FILE"
ENV_PLAN_TIMEOUT: Final = "PEER_RECOVERY_PLAN_TIMEOUT"
_POLL_SECONDS: Final = 0.1


class PlanSource(Protocol):
    """Answers for one target pod; called by the plugin in that pod's agent, once a round."""

    def plan_for(
        self, *, run_id: str, target: int, round_no: int, timeout: float
    ) -> PlanEntry | None:
        """The plan for ``target``, waiting at most ``timeout`` seconds; None if there is none."""
        ...


class NoPlanSource:
    """No external planner: every plan is made in-band."""

    def plan_for(
        self, *, run_id: str, target: int, round_no: int, timeout: float
    ) -> PlanEntry | None:
        return None


class LocalPlanSource:
    """Plans from a JSON file, polled until the bound (it may be written late)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def _read(self) -> dict[int, PlanEntry] | None:
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return None
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan file {self.path}: not valid JSON ({exc})") from None
        plans = document.get("plans") if isinstance(document, dict) else None
        if not isinstance(plans, list):
            raise PlanError(f"plan file {self.path}: expected {{'plans': [...]}}")
        entries = [
            PlanEntry.from_json(raw, f"plan file {self.path}, plans[{i}]")
            for i, raw in enumerate(plans)
        ]
        return {entry.target: entry for entry in entries}

    def plan_for(
        self, *, run_id: str, target: int, round_no: int, timeout: float
    ) -> PlanEntry | None:
        deadline = time.monotonic() + timeout
        while True:
            plans = self._read()
            if plans is not None and target in plans:
                return plans[target]
            if time.monotonic() >= deadline:
                return None
            time.sleep(_POLL_SECONDS)
