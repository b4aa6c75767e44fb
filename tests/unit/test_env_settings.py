"""Settings the webhook passes to a pod as env vars, read by the runtime."""

from __future__ import annotations

import pytest

from peer_recovery import PeerRecovery
from peer_recovery._env import ENV_PODS_PER_REPLICA, pods_per_replica


def test_pods_per_replica_from_the_env() -> None:
    assert pods_per_replica({}) == 1
    assert pods_per_replica({ENV_PODS_PER_REPLICA: ""}, default=2) == 2
    assert pods_per_replica({ENV_PODS_PER_REPLICA: " 4 "}) == 4
    for bad, message in (("two", "not an integer"), ("0", "at least 1")):
        with pytest.raises(ValueError, match=rf"{ENV_PODS_PER_REPLICA}=.*{message}"):
            pods_per_replica({ENV_PODS_PER_REPLICA: bad})


def test_the_script_reads_it_through_the_facade(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV_PODS_PER_REPLICA, raising=False)
    assert PeerRecovery.pods_per_replica(default=2) == 2
    monkeypatch.setenv(ENV_PODS_PER_REPLICA, "3")
    assert PeerRecovery.pods_per_replica() == 3
