"""The plugin's parts without torchrun: ordinals, launch checks, plan sources, the wiring,
the store protocol's codec."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

from peer_recovery.contract.names import Mode, PlannedBy
from peer_recovery.plan_sources import LocalPlanSource, NoPlanSource
from peer_recovery.protocol import codec, keys
from peer_recovery.protocol.records import Holding, PlanEntry, PlanError
from peer_recovery.rendezvous.identity import ordinal_from_env
from peer_recovery.rendezvous.launch import LaunchConfigError, check_launch, launch_problems
from peer_recovery.rendezvous.round import RoundPublisher

# --- identity ---------------------------------------------------------------------------


def test_the_ordinal_comes_from_the_first_variable_set_in_precedence_order() -> None:
    assert ordinal_from_env({"RANK": "2", "PET_NODE_RANK": "1"}, 4) == (1, "PET_NODE_RANK")
    assert ordinal_from_env({"RANK": "3"}, 4) == (3, "RANK")
    assert ordinal_from_env({"PEER_RECOVERY_REPLICA_INDEX": "0"}, 4) == (
        0,
        "PEER_RECOVERY_REPLICA_INDEX",
    )
    assert ordinal_from_env({"PEER_RECOVERY_ORDINAL": "2", "RANK": "0"}, 4)[0] == 2


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({}, "cannot tell this pod's ordinal"),
        ({"RANK": "two"}, "RANK='two' is not an integer"),
        ({"RANK": "4"}, "RANK=4 is out of range for a job of 4 nodes"),
        ({"RANK": "-1"}, "out of range"),
    ],
)
def test_a_missing_or_bad_ordinal_is_named(env: dict[str, str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ordinal_from_env(env, 4)


# --- launch checks ----------------------------------------------------------------------


def test_launch_settings_that_work() -> None:
    assert launch_problems(run_id="job", min_nodes=4, max_nodes=4, max_restarts=3) == []
    # Not under torchrun (max_restarts unknown): the other checks still apply.
    assert launch_problems(run_id="job", min_nodes=2, max_nodes=2, max_restarts=None) == []


def test_every_unmet_launch_requirement_is_listed_at_once() -> None:
    with pytest.raises(LaunchConfigError) as caught:
        check_launch(run_id="none", min_nodes=1, max_nodes=4, max_restarts=0)
    text = str(caught.value)
    assert "--max-restarts is 0" in text and "--rdzv-id is not set" in text
    assert "--nnodes is 1:4" in text


# --- plan sources -----------------------------------------------------------------------


def test_a_plan_file_gives_each_target_its_entry(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    path.write_text(
        json.dumps(
            {
                "plans": [
                    {"target": 2, "source": 1},
                    {"target": 3, "source": 0, "plannedBy": "runtime"},
                ]
            }
        )
    )
    source = LocalPlanSource(path)
    assert source.plan_for(run_id="j", target=2, round_no=1, timeout=0) == PlanEntry(
        2, 1, Mode.PEER, PlannedBy.OPERATOR
    )
    assert (
        source.plan_for(run_id="j", target=3, round_no=1, timeout=0).planned_by is PlannedBy.RUNTIME
    )
    assert source.plan_for(run_id="j", target=0, round_no=1, timeout=0) is None


def test_a_plan_file_written_late_is_read_within_the_bound(tmp_path: Path) -> None:
    path = tmp_path / "plan.json"
    script = f'import time, pathlib; time.sleep(0.5); pathlib.Path({str(path)!r}).write_text(\'{{"plans": [{{"target": 1, "source": 0}}]}}\')'
    writer = subprocess.Popen([sys.executable, "-c", script])
    try:
        entry = LocalPlanSource(path).plan_for(run_id="j", target=1, round_no=1, timeout=30)
    finally:
        writer.wait(timeout=30)
    assert entry is not None and entry.source == 0


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ("not json", "not valid JSON"),
        ('{"plan": []}', "expected"),
        ('{"plans": [{"target": "2", "source": 1}]}', "'target' must be a pod ordinal"),
        ('{"plans": [{"target": 2}]}', "a Peer plan needs 'source'"),
        ('{"plans": [{"target": 2, "source": 2}]}', "cannot be its own source"),
        ('{"plans": [{"target": 2, "source": 1, "mode": "Sideways"}]}', "Sideways"),
        (
            '{"plans": [{"target": 2, "source": 1, "mode": "Local"}]}',
            "a Local plan has no 'source'",
        ),
    ],
)
def test_a_malformed_plan_file_is_refused_with_what_was_wrong(
    tmp_path: Path, document: str, message: str
) -> None:
    path = tmp_path / "plan.json"
    path.write_text(document)
    with pytest.raises(PlanError, match=message) as caught:
        LocalPlanSource(path).plan_for(run_id="j", target=2, round_no=1, timeout=0)
    assert str(path) in str(caught.value)


# --- the store protocol's codec -----------------------------------------------------------------------


def test_values_from_the_store_are_json_objects_within_a_cap() -> None:
    assert codec.decode(codec.encode({"a": 1}), "x") == {"a": 1}
    with pytest.raises(codec.ExchangeError, match="not valid JSON"):
        codec.decode(b"\x80\x04pickle", "agent 1")
    with pytest.raises(codec.ExchangeError, match="expected a JSON object"):
        codec.decode(b"[1]", "agent 1")
    with pytest.raises(codec.ExchangeError, match="exceeds"):
        codec.decode(b" " * (codec.MAX_VALUE_BYTES + 1), "agent 1")


@pytest.fixture
def store():
    from torch.distributed import TCPStore

    server = TCPStore(
        "127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=10)
    )
    yield server


class _CountingSource:
    def __init__(self, entry: PlanEntry | None) -> None:
        self.entry, self.calls = entry, 0

    def plan_for(
        self, *, run_id: str, target: int, round_no: int, timeout: float
    ) -> PlanEntry | None:
        self.calls += 1
        return self.entry


def test_a_round_publishes_holdings_plans_and_consumes_a_load_checkpoint_marker(store) -> None:
    run, prefix = "job", keys.round_prefix("job", 7)
    held = [Holding(rank=1, step=5, shard_key="k", nbytes=10)]
    entry = PlanEntry(0, 1, Mode.PEER, PlannedBy.OPERATOR)
    source = _CountingSource(entry)
    store.set(keys.load_checkpoint_key(run), codec.encode({"reason": "round 6: rank 0 failed"}))
    # Pod 1 holds a snapshot: it publishes without asking for a plan.
    RoundPublisher(lambda: held, source).publish(store, run, 7, 1, 2)
    assert source.calls == 0
    # Pod 0 (rank 0's agent) rejoins empty: it asks, and publishes the directive once.
    RoundPublisher(lambda: [], source, plan_timeout=0.1).publish(store, run, 7, 0, 2)
    assert source.calls == 1
    agent1 = codec.decode(store.get(keys.agent_key(prefix, 1)), "a")
    assert agent1["holdings"] == [h.to_json() for h in held] and agent1["ordinal"] == 1
    assert codec.decode(store.get(keys.plan_key(prefix, 0)), "p")["plan"] == entry.to_json()
    assert codec.decode(store.get(keys.plan_key(prefix, 1)), "p")["plan"] is None
    directive = codec.decode(store.get(keys.directive_key(prefix)), "d")
    assert directive["load_checkpoint"] == "round 6: rank 0 failed"
    assert not store.check([keys.load_checkpoint_key(run)])  # consumed


def test_no_pod_waits_for_a_plan_when_no_pod_holds_a_snapshot(store) -> None:
    # A job's first start: both pods rejoin empty, concurrently, as agents do.
    from torch.distributed import TCPStore

    source = _CountingSource(None)
    clients = [TCPStore("127.0.0.1", store.port, is_master=False) for _ in range(2)]
    publishers = [
        threading.Thread(
            target=RoundPublisher(lambda: [], source, plan_timeout=30).publish,
            args=(clients[ordinal], "job", 1, ordinal, 2),
        )
        for ordinal in (0, 1)
    ]
    started = time.monotonic()
    for thread in publishers:
        thread.start()
    for thread in publishers:
        thread.join(timeout=60)
    assert source.calls == 0 and time.monotonic() - started < 30
    prefix = keys.round_prefix("job", 1)
    assert all(
        codec.decode(store.get(keys.plan_key(prefix, o)), "p")["plan"] is None for o in (0, 1)
    )


def test_importing_the_entry_point_is_cheap() -> None:
    code = (
        "import sys, peer_recovery.plugin as r; r.handler_creator();"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'kubernetes', 'kopf'}))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


# --- forwarding -------------------------------------------------------------------------


class _Recorder:
    """Stands in for c10d's handler: records which of its methods the wrapper called."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.settings = "c10d settings"

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)

        def method(*args, **kwargs):
            self.calls.append(name)
            return f"{name} result"

        return method

    @property
    def use_agent_store(self) -> bool:
        self.calls.append("use_agent_store")
        return False


def test_every_handler_method_but_the_backend_name_is_forwarded(store) -> None:
    from torch.distributed.elastic.rendezvous import RendezvousHandler

    from peer_recovery.rendezvous.handler import PeerRecoveryRendezvousHandler

    inner = _Recorder()
    handler = PeerRecoveryRendezvousHandler(
        inner,
        base_store=store,
        endpoint=("127.0.0.1", 1),
        ordinal=0,
        ordinal_from="RANK",
        local_addr=None,
    )
    assert handler.get_backend() == "peer-recovery"
    forwarded = {"is_closed", "set_closed", "num_nodes_waiting", "get_run_id", "shutdown"}
    for name in sorted(forwarded):
        result = getattr(handler, name)()
        assert result == (None if name == "set_closed" else f"{name} result")
    assert handler.use_agent_store is False
    assert handler.settings == "c10d settings"  # anything else c10d's handler offers
    assert inner.calls == [*sorted(forwarded), "use_agent_store"]
    # Every abstract method torch declares is covered (a new one would show up here).
    assert set(RendezvousHandler.__abstractmethods__) <= forwarded | {
        "get_backend",
        "next_rendezvous",
    }


def test_the_wiring_chooses_the_plan_source_and_the_round_observers(tmp_path) -> None:
    from peer_recovery.kube.plans import KubePlanSource
    from peer_recovery.plugin import round_publisher

    pod = {"POD_NAME": "j-worker-1", "POD_UID": "u", "POD_NAMESPACE": "n"}
    plans = tmp_path / "plans.json"
    from_file = round_publisher({"plan_file": str(plans)}, pod)
    assert isinstance(from_file._plan_source, LocalPlanSource) and not from_file._observers
    in_a_pod = round_publisher({}, pod)
    assert isinstance(in_a_pod._plan_source, KubePlanSource)
    assert len(in_a_pod._observers) == 1  # the cluster agent reports each round
    alone = round_publisher({"plan_timeout": "3"}, {})
    assert isinstance(alone._plan_source, NoPlanSource) and not alone._observers
    assert alone._plan_timeout == 3.0
    with pytest.raises(ValueError, match="plan_timeout"):
        round_publisher({"plan_timeout": "soon"}, {})
