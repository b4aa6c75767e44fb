"""The cluster integration's pure parts and its writer, over an in-memory API seam.

The seam (``RecoveryApi``) is faked here only to provoke what a live API server rarely does
on cue (a 409 between read and write, an outage mid-report); the end-to-end tests run the
same code against the real control plane.
"""

from __future__ import annotations

import random
from typing import Any

import pytest

from peer_recovery.contract import names
from peer_recovery.contract.bodies import PodRef, build_peer_recovery, build_status
from peer_recovery.contract.errors import ApiError, Unreachable
from peer_recovery.contract.moves import Move
from peer_recovery.contract.names import ConditionReason
from peer_recovery.contract.records import for_target
from peer_recovery.kube.identity import pod_identity
from peer_recovery.kube.plans import KubePlanSource, read_plan
from peer_recovery.kube.report import PodRound, moves, runtime_record
from peer_recovery.kube.setup import cluster_integration
from peer_recovery.kube.status import apply_moves, deliver
from peer_recovery.protocol.records import PodIdentity, RankAgreed, RankResult
from tests.fake_api import FakeApi

ME = PodIdentity("ddp-worker-1", "uid-new", "ns", "ddp", "worker", 1, "node-2")
SOURCE = PodIdentity("ddp-master-0", "uid-m", "ns", "ddp", "master", 0, "node-0")


def ref(who: PodIdentity, ordinal: int) -> PodRef:
    return PodRef(who.pod, who.uid, who.replica_type, who.replica_index, ordinal, who.node)


def body(phase: str | None, *, attempt: int = 1, planned_by: str = "operator", mode: str = "Peer",
         source: bool = True, target_uid: str = ME.uid, rv: str = "1") -> dict[str, Any]:  # fmt: skip
    target = (
        ref(ME, 2) if target_uid == ME.uid else PodRef("ddp-worker-2", target_uid, "worker", 2, 3)
    )
    made = build_peer_recovery(
        namespace="ns", job_name="ddp", job_uid="job-uid", target=target, mode=mode,
        reason="PodReplaced", attempt=attempt, planned_by=planned_by,
        source=ref(SOURCE, 0) if source and mode == "Peer" else None,
    )  # fmt: skip
    made["metadata"]["resourceVersion"] = rv
    if phase is not None:
        made["status"] = build_status(phase, attempt=attempt, message="chosen")
    return made


# --- identity -------------------------------------------------------------------------------


def test_identity_from_downward_api_env() -> None:
    env = {"POD_NAME": "my-job-worker-3", "POD_UID": "u", "POD_NAMESPACE": "n", "NODE_NAME": "x"}
    who = pod_identity(env)
    assert who == PodIdentity("my-job-worker-3", "u", "n", "my-job", "worker", 3, "x")
    assert pod_identity({}) is None
    with pytest.raises(ValueError, match=r"POD_UID \(from metadata.uid\)"):
        pod_identity({"POD_NAME": "j-master-0", "POD_NAMESPACE": "n"})
    with pytest.raises(ValueError, match="not a PyTorchJob pod name"):
        pod_identity({**env, "POD_NAME": "trainer"})
    with pytest.raises(ValueError, match="does not belong to job"):
        pod_identity({**env, "PEER_RECOVERY_JOB_NAME": "other"})


def test_plan_source_selection() -> None:
    env = {"POD_NAME": "j-master-0", "POD_UID": "u", "POD_NAMESPACE": "n"}
    assert cluster_integration({}, {}) is None
    assert cluster_integration({"plan_source": "none"}, env) is None
    assert cluster_integration({}, env) is not None
    with pytest.raises(ValueError, match="needs the pod identity env"):
        cluster_integration({}, {"PEER_RECOVERY_PLAN_SOURCE": "kubernetes"})
    with pytest.raises(ValueError, match="not one of"):
        cluster_integration({"plan_source": "etcd"}, env)


# --- reading the plan -----------------------------------------------------------------------


def test_planned_record_is_the_plan() -> None:
    reading = read_plan([body("Planned"), body("Planned", target_uid="other")], ME, 2)
    assert reading.final and reading.entry is not None
    assert (reading.entry.target, reading.entry.source, reading.entry.planned_by) == (
        2, 0, names.PlannedBy.OPERATOR,
    )  # fmt: skip


def test_pending_or_absent_means_wait_and_a_fell_back_replacement_means_stop() -> None:
    assert not read_plan([], ME, 2).final
    assert not read_plan([body(None)], ME, 2).final
    fell = read_plan([body("FellBack", source=False)], ME, 2)
    assert fell.final and fell.entry is None and "FellBack" in fell.note
    wrong = read_plan([body("Planned")], ME, 3)
    assert wrong.final and wrong.entry is None and "ordinal 2" in wrong.note


def test_newest_live_attempt_wins() -> None:
    old = body("Failed", attempt=1)
    new = body("Planned", attempt=2)
    new["spec"]["source"]["ordinal"] = 3
    reading = read_plan([new, old], ME, 2)
    assert reading.entry is not None and reading.entry.source == 3


def test_reader_waits_within_its_bound_and_records_why_it_gave_up() -> None:
    fake = FakeApi()
    fake.down = True
    source = KubePlanSource(ME, lambda: fake)
    assert source.plan_for(run_id="r", target=2, round_no=4, timeout=0.3) is None
    _, note, reachable = source.ledger.get(4) or (None, "", True)
    assert "no operator plan within 0.3s" in note and "unreachable" in note and not reachable
    fake.down = False
    fake.add(body("Planned"))
    entry = source.plan_for(run_id="r", target=2, round_no=5, timeout=5)
    assert entry is not None and entry.source == 0


def test_forbidden_gives_up_at_once() -> None:
    class Forbidden(FakeApi):
        def list_recoveries(self, *a: Any, **k: Any) -> list[dict[str, Any]]:
            raise ApiError("403 forbidden")

    source = KubePlanSource(ME, lambda: Forbidden())
    assert source.plan_for(run_id="r", target=2, round_no=1, timeout=60) is None
    assert "refused" in (source.ledger.get(1) or ("", "", True))[1]


# --- what to report -------------------------------------------------------------------------


def agreed(ok: bool = True, action: str | None = "peer", by: str | None = "operator") -> RankAgreed:
    return RankAgreed(4, 1, ok, 6 if ok else None, action if ok else None,
                      0 if action == "peer" else None, by, "" if ok else "no holder")  # fmt: skip


def test_moves_follow_the_round() -> None:
    assert moves(PodRound(2, None)) == []
    assert [m.phase for m in moves(PodRound(2, [agreed(False)]))] == [names.Phase.FELL_BACK]
    assert [m.phase for m in moves(PodRound(2, [agreed()]))] == [names.Phase.STREAMING]
    done = moves(PodRound(2, [agreed()], [RankResult(4, True, 6, 1000, 0.5)]))
    assert [m.phase for m in done] == [names.Phase.STREAMING, names.Phase.SUCCEEDED]
    assert (done[1].step, done[1].bytes, done[1].duration_seconds) == (6, 1000, 0.5)
    voted_no = moves(PodRound(2, [agreed()], [RankResult(4, False, None, 0, 0.0)]))
    assert voted_no[-1].phase is names.Phase.FELL_BACK
    died = moves(PodRound(2, [agreed()], None, ended=True))
    assert died[-1].phase is names.Phase.FAILED and "transfer failed" in died[-1].message


def test_runtime_record_only_when_the_operator_made_none() -> None:
    pr = PodRound(2, [agreed(by="runtime")], plan_note="no operator plan within 3s")
    made = runtime_record(me=ME, ordinal=2, pr=pr, existing=[], sources={0: SOURCE}, job_uid=None)
    assert made is not None
    created, first = made
    assert created["spec"]["plannedBy"] == "runtime" and created["spec"]["attempt"] == 1
    assert created["spec"]["source"]["podUID"] == SOURCE.uid
    assert created["metadata"]["ownerReferences"][0]["kind"] == "Pod"
    assert first.phase is names.Phase.PLANNED and "no operator plan within 3s" in first.message
    with_job = runtime_record(me=ME, ordinal=2, pr=pr, existing=[], sources={}, job_uid="j")
    assert with_job is not None and with_job[0]["metadata"]["ownerReferences"][0]["uid"] == "j"
    assert "source" not in with_job[0]["spec"]  # the source pod's identity was not published
    live = for_target([body("Planned")], ME.uid)
    assert runtime_record(me=ME, ordinal=2, pr=pr, existing=live, sources={}, job_uid="j") is None
    failed = for_target([body("Failed")], ME.uid)
    again = runtime_record(me=ME, ordinal=2, pr=pr, existing=failed, sources={}, job_uid="j")
    assert again is not None and again[0]["spec"]["attempt"] == 2


# --- writing it -----------------------------------------------------------------------------

SUCCEED = [
    Move(names.Phase.STREAMING, ConditionReason.TRANSFER_STARTED, "go"),
    Move(
        names.Phase.SUCCEEDED,
        ConditionReason.RESTORED,
        "done",
        step=6,
        bytes=10,
        duration_seconds=0.2,
    ),
]


def test_moves_are_written_in_order_and_a_retry_is_idempotent() -> None:
    fake = FakeApi(body("Planned"))
    name = next(iter(fake.recoveries))[1]
    apply_moves(fake, "ns", name, SUCCEED)
    status = fake.recovery(name)["status"]
    assert (status["phase"], status["step"], status["bytes"]) == ("Succeeded", 6, 10)
    assert [c["type"] for c in status["conditions"]] == ["Streaming", "Succeeded"]
    apply_moves(fake, "ns", name, SUCCEED)  # again, e.g. after a lost answer
    assert fake.patches == [(name, "Streaming"), (name, "Succeeded")]


def test_a_conflict_is_re_read_and_re_validated() -> None:
    fake = FakeApi(body("Streaming"))
    name = next(iter(fake.recoveries))[1]
    fake.race = {"phase": "Failed", "message": "deadline (operator)"}  # lands first
    apply_moves(fake, "ns", name, SUCCEED[1:])
    assert fake.recovery(name)["status"]["phase"] == "Failed"  # not overwritten
    assert fake.patches == []


def test_moves_outside_the_table_are_refused() -> None:
    fake = FakeApi(body(None))  # Pending, planned by the operator
    name = next(iter(fake.recoveries))[1]
    apply_moves(fake, "ns", name, SUCCEED)
    assert fake.patches == []  # Pending -> Streaming is not a runtime move


def test_deliver_retries_while_unreachable_until_back_or_the_bound() -> None:
    fake = FakeApi(body("Planned"))
    name = next(iter(fake.recoveries))[1]
    fake.down = True
    naps: list[float] = []

    def nap(seconds: float) -> None:
        naps.append(seconds)
        if len(naps) == 3:
            fake.down = False  # the API server is back

    fractions = iter([0.0, 0.5, 0.9, 0.3])
    deliver(lambda: apply_moves(fake, "ns", name, SUCCEED), deadline=1e12, what="t", sleep=nap,
            uniform=fractions.__next__)  # fmt: skip
    assert fake.recovery(name)["status"]["phase"] == "Succeeded"
    # Backoff 0.5, 1, 2 s; each wait between half and all of it.
    assert naps == pytest.approx([0.25, 0.75, 1.9])
    fake.down = True
    assert deliver(lambda: fake.list_recoveries("ns", "ddp"), deadline=0, what="t") is None


class _Enough(BaseException):
    """Ends a retry loop from its sleep (deliver catches Exception around attempts only)."""


def test_pods_retrying_after_an_outage_do_not_wait_in_lockstep() -> None:
    """Two pods' reporters, each with its own random stream: their waits differ, each stays
    within half and all of the backoff, and the backoff still doubles up to its cap."""

    def waits(seed: int) -> list[float]:
        naps: list[float] = []

        def down() -> None:
            raise Unreachable("connection refused")

        def nap(seconds: float) -> None:
            naps.append(seconds)
            if len(naps) == 6:
                raise _Enough  # stop the loop: enough waits seen

        with pytest.raises(_Enough):
            deliver(down, deadline=1e12, what="t", sleep=nap, uniform=random.Random(seed).random)
        return naps

    first, second = waits(1), waits(2)
    assert first != second
    for naps in (first, second):
        for nap, backoff in zip(naps, [0.5, 1.0, 2.0, 4.0, 5.0, 5.0], strict=True):
            assert backoff / 2 <= nap <= backoff


def test_a_refusal_is_retried_only_right_after_an_outage() -> None:
    from peer_recovery.contract.errors import Forbidden

    answers: list[BaseException | None] = [
        Unreachable("down"),
        Forbidden("403 rbac warming up"),
        None,
    ]
    calls: list[int] = []

    def attempt() -> str:
        calls.append(1)
        answer = answers.pop(0)
        if answer is not None:
            raise answer
        return "written"

    assert deliver(attempt, deadline=1e12, what="t", sleep=lambda s: None) == "written"
    assert len(calls) == 3

    def refused() -> str:
        calls.append(1)
        raise Forbidden("403 no role")

    calls.clear()
    assert deliver(refused, deadline=1e12, what="t", sleep=lambda s: None) is None
    assert len(calls) == 1  # no outage before: a refusal is final
