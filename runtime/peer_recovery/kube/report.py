"""Which status writes one round's outcome calls for (pure: no I/O, no clock).

The agent learns from its workers (their ``outcome`` records) what the round's agreement
decided for this pod's ranks and whether their restore and the all-or-nothing vote succeeded. From that,
:func:`moves` gives the phase moves to make on this pod's PeerRecovery, in order:

- no agreement was reached, or it says "load the checkpoint" -> ``FellBack``;
- agreed -> ``Streaming`` (the transfer, or the local load, begins); then
  - every rank of the pod restored -> ``Succeeded`` with step, bytes and duration;
  - some rank did not (the vote failed) -> ``FellBack``;
  - the round ended with no result (a transfer failed and the worker exited, or a worker
    died) -> ``Failed``; the next round loads the checkpoint.

:func:`runtime_record` builds the object the runtime creates when the operator made none
for a rejoining pod (``plannedBy: runtime``), with the body builder of
:mod:`peer_recovery.contract.bodies`; its first move is ``Planned`` (or ``FellBack``).
Every move is validated against the phase table by the writer when it is made.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from peer_recovery.contract import names, phases
from peer_recovery.contract.bodies import PodRef, build_peer_recovery
from peer_recovery.contract.moves import Move
from peer_recovery.contract.names import ANNOTATION_RESTART_COUNT, ConditionReason
from peer_recovery.contract.records import RecoveryRecord
from peer_recovery.protocol.records import PodIdentity, RankAgreed, RankResult

__all__ = ["PodRound", "moves", "runtime_record"]


@dataclass(frozen=True)
class PodRound:
    """What the agent knows about its pod's part of one round."""

    round_no: int
    #: Every local rank's view of the agreement; None until they are all in.
    agreed: Sequence[RankAgreed] | None
    #: Every local rank's result; None until they are all in.
    results: Sequence[RankResult] | None = None
    #: No more records will come (next round began, the agent is exiting, or timed out).
    ended: bool = False
    #: What the plan reader saw ("" when it was not asked: the pod held a snapshot).
    plan_note: str = ""
    #: Pod name by ordinal, for messages (as the agents published them).
    pods: Mapping[int, str] | None = None

    def source_ordinal(self) -> int | None:
        sources = sorted({a.source_ordinal for a in self.agreed or () if a.action == "peer"})
        return sources[0] if sources else None

    def receives(self) -> bool:
        return any(a.action == "peer" for a in self.agreed or ())

    def planned_by(self) -> str | None:
        return next((a.planned_by for a in self.agreed or () if a.planned_by), None)


def _pod(pr: PodRound, ordinal: int | None) -> str:
    if ordinal is None:
        return "no pod"
    name = (pr.pods or {}).get(ordinal)
    return f"pod {name} (ordinal {ordinal})" if name else f"pod ordinal {ordinal}"


def _how(pr: PodRound) -> str:
    if not pr.receives():
        return "from its own snapshot"
    who = _pod(pr, pr.source_ordinal())
    by = pr.planned_by()
    chosen = "the operator's plan" if by == "operator" else "chosen in-band by the runtime"
    note = f" ({pr.plan_note})" if pr.plan_note and by != "operator" else ""
    return f"from {who}, {chosen}{note}"


def moves(pr: PodRound) -> list[Move]:
    """The moves this round calls for, so far (see the module docstring)."""
    agreed = pr.agreed
    if agreed is None:
        return []  # the workers never said: nothing to report (the reason is in their logs)
    n = pr.round_no
    if not agreed or not all(a.ok for a in agreed):
        why = next((a.reason for a in agreed if not a.ok and a.reason), "no agreement")
        return [Move(names.Phase.FELL_BACK, ConditionReason.CHECKPOINT_LOADED, f"round {n}: {why}")]
    step = agreed[0].step
    start = Move(
        names.Phase.STREAMING,
        ConditionReason.TRANSFER_STARTED if pr.receives() else ConditionReason.LOCAL_LOAD_STARTED,
        f"round {n}: restoring step {step} {_how(pr)}",
    )
    if pr.results is None:
        if not pr.ended:
            return [start]
        return [
            start,
            Move(
                names.Phase.FAILED,
                ConditionReason.TRANSFER_FAILED,
                f"round {n} ended before this pod's workers reported a result (a transfer "
                "failed or a worker died); the next round loads the checkpoint",
            ),
        ]
    if pr.results and all(r.restored for r in pr.results):
        total = sum(r.bytes for r in pr.results)
        seconds = max(r.seconds for r in pr.results)
        return [
            start,
            Move(
                names.Phase.SUCCEEDED,
                ConditionReason.RESTORED,
                f"round {n}: restored step {step} {_how(pr)}: {total} bytes in {seconds:.3f}s",
                step=step,
                bytes=total,
                duration_seconds=seconds,
            ),
        ]
    return [
        start,
        Move(
            names.Phase.FELL_BACK,
            ConditionReason.VOTE_FAILED,
            f"round {n}: not every rank restored step {step} (the all-or-nothing vote "
            "failed; the reason is in the workers' logs); the job loads its checkpoint",
        ),
    ]


def runtime_record(
    *,
    me: PodIdentity,
    ordinal: int,
    pr: PodRound,
    existing: Sequence[RecoveryRecord],
    sources: Mapping[int, PodIdentity],
    job_uid: str | None,
) -> tuple[dict[str, object], Move] | None:
    """The PeerRecovery the runtime creates for this rejoining pod, and its first move; None
    when a record exists already (the newest attempt did not fail) or nothing was agreed.

    Owned by the PyTorchJob when its UID is known (from any record of the job); otherwise by
    the target pod itself, which the job owns, so it still goes when the job goes (the
    runtime's Role cannot read PyTorchJobs).
    """
    if pr.agreed is None:
        return None
    if existing and existing[0].phase not in phases.REPLAN_FROM:
        return None
    attempt = existing[0].attempt + 1 if existing else 1
    ok = bool(pr.agreed) and all(a.ok for a in pr.agreed)
    source_ordinal = pr.source_ordinal() if ok else None
    source = sources.get(source_ordinal) if source_ordinal is not None else None
    target = _ref(me, ordinal)
    body = build_peer_recovery(
        namespace=me.namespace,
        job_name=me.job,
        job_uid=job_uid or me.uid,
        target=target,
        mode=names.Mode.PEER,
        reason=names.Reason.CONTAINER_RESTARTED if existing else names.Reason.POD_REPLACED,
        attempt=attempt,
        planned_by=names.PlannedBy.RUNTIME,
        source=None if source is None else _ref(source, source_ordinal or 0),
    )
    metadata = body["metadata"]
    metadata["annotations"] = {ANNOTATION_RESTART_COUNT: "0"}
    if job_uid is None:
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Pod", "name": me.pod, "uid": me.uid,
             "controller": False, "blockOwnerDeletion": False}
        ]  # fmt: skip
    note = f": {pr.plan_note}" if pr.plan_note else ""
    if ok:
        first = Move(
            names.Phase.PLANNED,
            ConditionReason.IN_BAND_PLAN,
            f"planned in-band by the runtime, {_pod(pr, source_ordinal)} streams to {me.pod}{note}",
        )
    else:
        first = moves(pr)[0]
    return body, first


def _ref(who: PodIdentity, ordinal: int) -> PodRef:
    return PodRef(
        pod=who.pod,
        pod_uid=who.uid,
        replica_type=who.replica_type,
        replica_index=who.replica_index,
        ordinal=ordinal,
        node=who.node,
    )
