"""Pure rules: pod records, detection, the catch-up rule, lifecycle verdicts, settings."""

from __future__ import annotations

from datetime import timedelta

import pytest

from peer_recovery.contract import names
from peer_recovery.contract.records import parse_recovery
from peer_recovery_operator.config import ConfigError, OperatorConfig, from_sources
from peer_recovery_operator.detection import KnownPod, detect_change, detect_missed_replacement
from peer_recovery_operator.lifecycle import Action, decide, may_need_action
from peer_recovery_operator.views import BadInput, job_view, pod_view
from tests.operator.bodies import T0, job_body, pod_body, ts

CONFIG = OperatorConfig(namespaces=("ns",), max_attempts=2)


def test_pod_view_names_the_missing_field() -> None:
    body = pod_body()
    del body["metadata"]["labels"][names.LABEL_REPLICA_TYPE]
    with pytest.raises(
        BadInput, match=r"pod ns/train-worker-0: label training.kubeflow.org/replica-type"
    ):
        pod_view(body)


def test_job_resolved_from_owner_reference_when_label_missing() -> None:
    body = pod_body()
    del body["metadata"]["labels"][names.LABEL_JOB_NAME]
    body["metadata"]["ownerReferences"] = [
        {"kind": "PyTorchJob", "name": "train", "controller": True}
    ]
    assert pod_view(body).job == "train"


def test_shm_only_counts_when_memory_emptydir_is_mounted_at_dev_shm() -> None:
    assert pod_view(pod_body(shm_memory=True)).shm_in_memory
    body = pod_body(shm_memory=True)
    body["spec"]["volumes"][0]["emptyDir"] = {}
    assert not pod_view(body).shm_in_memory


def test_job_view_ordinals_and_annotation_problems() -> None:
    job = job_view(job_body())
    assert (job.ordinal("master", 0), job.ordinal("worker", 0)) == (0, 1)
    assert job_view(job_body(master=False)).ordinal("worker", 0) == 0
    bad = job_view(job_body(annotations={names.ANNOTATION_ENABLED: "true"}))
    assert not bad.enabled and "peer-recovery='true'" in bad.problem
    with pytest.raises(BadInput, match="unknown types"):
        body = job_body()
        body["spec"]["pytorchReplicaSpecs"]["Launcher"] = {"replicas": 1}
        job_view(body)


def test_detect_change_rules() -> None:
    old = pod_view(pod_body(uid="a", created=1))
    known = KnownPod.of(old)
    replaced = detect_change(known, pod_view(pod_body(uid="b", created=5)))
    assert replaced and (replaced.reason, replaced.mode) == (
        names.Reason.POD_REPLACED,
        names.Mode.PEER,
    )
    assert detect_change(KnownPod.of(pod_view(pod_body(uid="b", created=5))), old) is None  # stale
    assert detect_change(known, pod_view(pod_body(uid="b", created=5, terminating=True))) is None
    assert detect_change(known, old) is None
    restarted = detect_change(known, pod_view(pod_body(uid="a", restarts=1, shm_memory=True)))
    assert restarted and restarted.mode is names.Mode.LOCAL
    assert detect_change(None, old) is None


def test_catch_up_rule() -> None:
    late = pod_view(pod_body(uid="late", created=100))
    others = [T0 + timedelta(seconds=1)] * 3
    grace = timedelta(seconds=60)
    found = detect_missed_replacement(late, others, grace=grace, recorded_uids=())
    assert found and found.reason is names.Reason.POD_REPLACED
    assert detect_missed_replacement(late, others, grace=grace, recorded_uids=["late"]) is None
    assert (
        detect_missed_replacement(late, others, grace=timedelta(seconds=120), recorded_uids=())
        is None
    )
    assert detect_missed_replacement(late, [], grace=grace, recorded_uids=()) is None


def _rec(
    phase: str,
    *,
    since: float = 0,
    source_uid: str = "src",
    mode: str = "Peer",
    by: str = "operator",
    reason: str = "",
) -> object:
    body = {
        "metadata": {"name": "r", "namespace": "ns", "resourceVersion": "5"},
        "spec": {
            "jobName": "train",
            "target": {
                "pod": "train-worker-0",
                "podUID": "t",
                "replicaType": "worker",
                "replicaIndex": 0,
                "ordinal": 1,
            },
            "source": {
                "pod": "train-worker-1",
                "podUID": source_uid,
                "replicaType": "worker",
                "replicaIndex": 1,
                "ordinal": 2,
            },
            "mode": mode,
            "reason": "PodReplaced",
            "attempt": 1,
            "plannedBy": by,
        },
        "status": {
            "phase": phase,
            "conditions": [
                {"type": phase, "status": "True", "reason": reason, "lastTransitionTime": ts(since)}
            ],
        },
    }
    return parse_recovery(body, seen_at=T0)


def _decide(
    rec: object,
    *,
    now: float = 1,
    slot_uid: str = "t",
    source: object = "alive",
    attempts: int = 1,
    newer: bool = False,
) -> object:
    slot = pod_view(pod_body("train", "worker", 0, uid=slot_uid))
    src = pod_view(pod_body("train", "worker", 1, uid="src")) if source == "alive" else source
    return decide(
        rec,
        now=T0 + timedelta(seconds=now),
        slot_pod=slot,
        source_pod=src,
        attempts_in_episode=attempts,
        newer_attempt_exists=newer,
        config=CONFIG,
    )


def test_lifecycle_verdicts() -> None:
    assert _decide(_rec("Planned")).action is Action.KEEP
    assert _decide(_rec("Planned"), slot_uid="other").action is Action.FAIL
    assert _decide(_rec("Planned"), source=None).action is Action.REPLAN
    assert _decide(_rec("Streaming"), source=None, attempts=2).action is Action.FAIL
    assert _decide(_rec("Planned"), now=CONFIG.plan_deadline + 1).action is Action.REPLAN
    assert _decide(_rec("Streaming"), now=CONFIG.plan_deadline + 1).action is Action.KEEP
    assert (
        _decide(_rec("Planned", mode="Local"), now=CONFIG.plan_deadline + 1).action is Action.FAIL
    )
    assert _decide(_rec("Pending"), now=CONFIG.sweep_interval + 1).action is Action.PROMOTE
    assert _decide(_rec("Planned", by="runtime"), source=None).action is Action.KEEP
    assert _decide(_rec("Failed", reason="Replanning")).action is Action.RESUME_REPLAN
    assert _decide(_rec("Failed", reason="Replanning"), newer=True).action is Action.KEEP
    assert _decide(_rec("Succeeded"), source=None).action is Action.KEEP


def test_config_precedence_and_errors() -> None:
    env = {"PEER_RECOVERY_MAX_ATTEMPTS": "5", "PEER_RECOVERY_PLAN_DEADLINE": "7"}
    config = from_sources({"namespaces": ["a"], "plan_deadline": 3.0}, env)
    assert (config.max_attempts, config.plan_deadline, config.namespaces) == (5, 3.0, ("a",))
    with pytest.raises(ConfigError, match="PEER_RECOVERY_MAX_ATTEMPTS='x'"):
        from_sources({"namespaces": ["a"]}, {"PEER_RECOVERY_MAX_ATTEMPTS": "x"})
    with pytest.raises(ConfigError, match="--namespace NS"):
        from_sources({}, {})
    with pytest.raises(ConfigError, match="--metrics-address"):
        OperatorConfig(all_namespaces=True, metrics_address="nope")


def test_catch_up_measures_lateness_from_the_end_of_the_creation_burst() -> None:
    grace = timedelta(seconds=10)
    burst = [T0 + timedelta(seconds=s) for s in (0, 8, 16, 24, 32)]  # slow, steady creation
    pod = pod_view(pod_body(uid="p", created=40))
    assert detect_missed_replacement(pod, burst, grace=grace, recorded_uids=()) is None
    late = pod_view(pod_body(uid="q", created=60))
    assert detect_missed_replacement(late, burst, grace=grace, recorded_uids=()) is not None


def test_only_restarts_of_the_pytorch_container_count() -> None:
    known = KnownPod.of(pod_view(pod_body(uid="a")))
    sidecar = pod_body(uid="a")
    sidecar["status"]["containerStatuses"].append({"name": "log-shipper", "restartCount": 3})
    assert pod_view(sidecar).restarts == 0
    assert detect_change(known, pod_view(sidecar)) is None
    trainer = pod_body(uid="a", restarts=1)
    trainer["status"]["containerStatuses"].append({"name": "log-shipper", "restartCount": 3})
    assert pod_view(trainer).restarts == 1
    assert detect_change(known, pod_view(trainer)) is not None


def test_may_need_action_agrees_with_decide_on_records_it_skips() -> None:
    # Every record the sweep skips must be one decide() keeps whatever the pods and time.
    for phase in ("Pending", "Planned", "Streaming", "Succeeded", "Failed", "FellBack"):
        for by in ("operator", "runtime"):
            for reason in ("SourceChosen", "Replanning", "DeadlineExceeded"):
                rec = _rec(phase, by=by, reason=reason)
                if may_need_action(rec):
                    continue
                for kwargs in ({}, {"source": None}, {"slot_uid": "other"}, {"now": 10**6}):
                    assert _decide(rec, **kwargs).action is Action.KEEP, (phase, by, reason)
    assert may_need_action(_rec("Planned"))
    assert may_need_action(_rec("Failed", reason="Replanning"))
    assert not may_need_action(_rec("Succeeded"))
    assert not may_need_action(_rec("Planned", by="runtime"))
