"""Where a rejoining pod's plan (who streams to it) comes from.

A ``PlanSource`` answers, for one target pod and one rendezvous round, "which pod should
stream to you", or ``None`` when it has no plan within the bound it is given; the plugin
then lets the in-band planner decide (``plannedBy: runtime``). Implementations:

- ``LocalPlanSource``: a JSON file (demo, tests, or anything that can write a file);
- ``NoPlanSource``: never has a plan; every plan is made in-band;
- the Kubernetes reader (the operator's ``PeerRecovery`` objects) implements the same
  protocol in the cluster-integration work and is selected by ``plan_source_from_config``.

The file format is ``{"plans": [{"target": 2, "source": 1, "mode": "Peer",
"plannedBy": "operator"}, ...]}``; ``target`` and ``source`` are pod ordinals, ``mode``
is ``Peer`` or ``Local`` (``source`` null), ``plannedBy`` defaults to ``operator``.
Errors name the file and the entry that was wrong.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Protocol

from peer_recovery.contract.names import Mode, PlannedBy

__all__ = [
    "ENV_PLAN_FILE",
    "ENV_PLAN_TIMEOUT",
    "LocalPlanSource",
    "NoPlanSource",
    "PlanEntry",
    "PlanSource",
    "PlanSourceError",
    "plan_source_from_config",
]

ENV_PLAN_FILE: Final = "PEER_RECOVERY_PLAN_FILE"
ENV_PLAN_TIMEOUT: Final = "PEER_RECOVERY_PLAN_TIMEOUT"
_POLL_SECONDS: Final = 0.1


class PlanSourceError(ValueError):
    """A plan was present but malformed."""


@dataclass(frozen=True)
class PlanEntry:
    """One target's plan: stream from ``source`` (``Mode.PEER``) or restore locally."""

    target: int
    source: int | None
    mode: Mode
    planned_by: PlannedBy
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "source": self.source,
            "mode": self.mode.value,
            "plannedBy": self.planned_by.value,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str) -> PlanEntry:
        """Validate one entry; ``where`` names it in errors."""
        if not isinstance(raw, Mapping):
            raise PlanSourceError(f"{where}: a plan entry must be an object")
        target = raw.get("target")
        source = raw.get("source")
        if not isinstance(target, int) or isinstance(target, bool) or target < 0:
            raise PlanSourceError(f"{where}: 'target' must be a pod ordinal, got {target!r}")
        try:
            mode = Mode(raw.get("mode", Mode.PEER.value))
            planned_by = PlannedBy(raw.get("plannedBy", PlannedBy.OPERATOR.value))
        except ValueError as exc:
            raise PlanSourceError(f"{where}: {exc}") from None
        if mode is Mode.PEER:
            if not isinstance(source, int) or isinstance(source, bool) or source < 0:
                raise PlanSourceError(
                    f"{where}: a Peer plan needs 'source' as a pod ordinal, got {source!r}"
                )
            if source == target:
                raise PlanSourceError(f"{where}: pod {target} cannot be its own source")
        elif source is not None:
            raise PlanSourceError(f"{where}: a Local plan has no 'source' (got {source!r})")
        reason = raw.get("reason", "")
        return cls(target, source, mode, planned_by, reason if isinstance(reason, str) else "")


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
            raise PlanSourceError(f"plan file {self.path}: not valid JSON ({exc})") from None
        plans = document.get("plans") if isinstance(document, dict) else None
        if not isinstance(plans, list):
            raise PlanSourceError(f"plan file {self.path}: expected {{'plans': [...]}}")
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


def plan_source_from_config(config: Mapping[str, Any], env: Mapping[str, str]) -> PlanSource:
    """Choose the plan source: rdzv_conf ``plan_file`` first, then ``$PEER_RECOVERY_PLAN_FILE``."""
    path = config.get("plan_file") or env.get(ENV_PLAN_FILE)
    if path:
        return LocalPlanSource(path)
    from peer_recovery.kube.setup import cluster_plan_source  # in a pod: the operator's plans

    cluster = cluster_plan_source(config, env)
    return cluster if cluster is not None else NoPlanSource()
