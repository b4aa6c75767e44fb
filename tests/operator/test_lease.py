"""Leader election: the pure timing rule directly, the elector against the real API server.

The electors share one real kube-apiserver (so resourceVersion preconditions, AlreadyExists
and Conflict are the server's own), and each has a clock the test moves, so expiry is
exercised without sleeping.
"""

from __future__ import annotations

from typing import Any

import pytest

from peer_recovery_operator.lease import (
    LeaderElector,
    LeaseTiming,
    Observed,
    Step,
    next_step,
)

HELD = Observed(holder="a", renew_time="t1", transitions=0, resource_version="7")


@pytest.mark.parametrize(
    ("observed", "me", "changed_at", "now", "step"),
    [
        (None, "b", 0.0, 0.0, Step.CREATE),
        (HELD, "a", 0.0, 100.0, Step.RENEW),  # our own claim, however old
        (HELD, "b", 0.0, 14.9, Step.FOLLOW),  # held, renewed within the duration
        (HELD, "b", 0.0, 15.1, Step.TAKE_OVER),  # its holder stopped renewing
        (Observed("", "t1", 3, "9"), "b", 0.0, 0.1, Step.TAKE_OVER),  # released
    ],
)
def test_next_step(
    observed: Observed | None, me: str, changed_at: float, now: float, step: Step
) -> None:
    assert next_step(observed, me, changed_at=changed_at, now=now, duration=15.0) is step


@pytest.mark.parametrize(
    "timing", [(15.0, 15.0, 2.0), (15.0, 10.0, 10.0), (15.0, 10.0, 0.0), (5.0, 10.0, 2.0)]
)
def test_timing_must_leave_the_old_leader_time_to_stop(timing: tuple[float, float, float]) -> None:
    with pytest.raises(ValueError, match="--lease-renew-deadline"):
        LeaseTiming(*timing)


def test_an_elector_needs_an_identity() -> None:
    with pytest.raises(ValueError, match="identity"):
        LeaderElector(object(), "ns", "lease", "")  # type: ignore[arg-type]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def kube(control_plane: Any) -> Any:
    from peer_recovery_operator.kube import KubernetesApi

    return KubernetesApi(str(control_plane.kubeconfig))


def electors(kube: Any, namespace: str, *names: str) -> list[tuple[LeaderElector, Clock]]:
    out = []
    for name in names:
        clock = Clock()
        out.append((LeaderElector(kube, namespace, "ha", name, LeaseTiming(), clock=clock), clock))
    return out


@pytest.mark.cluster
def test_one_leader_takeover_after_expiry_and_release_on_a_real_api_server(
    kube: Any, namespace: str
) -> None:
    (a, clock_a), (b, clock_b) = electors(kube, namespace, "a", "b")
    assert a.tick() and a.leading()  # creates the Lease
    assert not b.tick() and not b.leading()
    lease = kube.get_lease(namespace, "ha")
    assert lease["spec"]["holderIdentity"] == "a"
    assert lease["spec"]["leaseDurationSeconds"] == 15

    # a renews (the record changes); b keeps following however much time passes meanwhile
    for _ in range(5):
        clock_a.now += 2
        clock_b.now += 2
        assert a.tick()
        assert not b.tick()
    renewed = kube.get_lease(namespace, "ha")
    assert renewed["spec"]["renewTime"] != lease["spec"]["renewTime"]

    # a stops renewing: after renew_deadline it no longer acts; after duration b takes over
    clock_a.now += 10.5
    assert not a.leading()
    clock_b.now += 10.5
    assert not b.tick()  # 10.5 s since b saw a change: not yet expired
    clock_b.now += 5
    assert b.tick() and b.leading()
    taken = kube.get_lease(namespace, "ha")["spec"]
    assert (taken["holderIdentity"], taken["leaseTransitions"]) == ("b", 1)

    # a comes back: it follows (the record changed under it) and cannot win it back
    clock_a.now += 1
    assert not a.tick() and not a.leading()

    # b releases on a clean stop: a takes over at once, without waiting for expiry
    b.release()
    assert not b.leading()
    assert kube.get_lease(namespace, "ha")["spec"]["holderIdentity"] == ""
    assert a.tick() and a.leading()
    assert kube.get_lease(namespace, "ha")["spec"]["leaseTransitions"] == 2


@pytest.mark.cluster
def test_two_standbys_racing_for_an_expired_lease_yield_one_leader(
    kube: Any, namespace: str
) -> None:
    (old, _), (b, clock_b), (c, clock_c) = electors(kube, namespace, "old", "b", "c")
    assert old.tick()
    assert not b.tick() and not c.tick()
    clock_b.now += 16
    clock_c.now += 16
    # both decide TAKE_OVER on the same read; the server accepts only the first write
    body = kube.get_lease(namespace, "ha")
    won_b = b._write(Step.TAKE_OVER, body)
    from peer_recovery.contract.errors import Conflict

    with pytest.raises(Conflict):
        c._write(Step.TAKE_OVER, body)
    assert won_b is not None
    assert not c.tick()
    assert b.tick()
    assert kube.get_lease(namespace, "ha")["spec"]["holderIdentity"] == "b"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lease-duration", "5", "--lease-renew-deadline", "5"], "--lease-renew-deadline"),
        (["--lease-retry-period", "0"], "--lease-retry-period"),
        (["--resync-interval", "0"], "--resync-interval must be > 0"),
    ],
)
def test_bad_lease_and_resync_flags_are_refused_naming_the_flag(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from peer_recovery_operator.cli import main

    assert main(["--namespace", "ns", *flags]) == 2
    assert message in capsys.readouterr().err


def test_kopf_peering_is_not_offered(capsys: pytest.CaptureFixture[str]) -> None:
    """High availability is the Lease's: a peering flag is refused, not silently half-used."""
    from peer_recovery_operator.cli import main

    with pytest.raises(SystemExit) as exited:
        main(["--namespace", "ns", "--peering", "p"])
    assert exited.value.code == 2
    assert "unrecognized arguments: --peering" in capsys.readouterr().err
