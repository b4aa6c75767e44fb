"""The round's exchange on a real TCPStore: rank 0 reads every record once and publishes
the agreement; every other rank reads that one record (threads stand for the ranks)."""

from __future__ import annotations

import random
import threading
from collections import Counter
from typing import Any

import pytest
from torch.distributed import TCPStore

from peer_recovery import exchange
from peer_recovery.agreement import Action, PodReport, agree
from peer_recovery.contract.names import Mode, PlannedBy
from peer_recovery.peer_restore import RoundContext, RoundSession
from peer_recovery.protocol import keys
from peer_recovery.protocol.codec import ExchangeError, encode, publish
from peer_recovery.protocol.records import (
    AgentRecord,
    AgreementRecord,
    Directive,
    Holding,
    Move,
    PlanEntry,
    PlanRecord,
    WorkerRecord,
)

KEY = "full-replica"
PREFIX = keys.round_prefix("test", 1)


class CountingStore:
    """A real TCPStore client that counts the keys this rank reads."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.read = inner, Counter[str]()

    def multi_get(self, names: list[str]) -> list[bytes]:
        self.read.update(names)
        return self.inner.multi_get(names)

    def get(self, name: str) -> bytes:
        self.read[name] += 1
        return self.inner.get(name)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@pytest.fixture
def master() -> Any:
    store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    yield store
    del store


def _publish_agents(store: Any, nnodes: int, per_pod: int, replaced: set[int], plans=None) -> None:
    """What the agents publish before workers start: holdings of step 20 but on ``replaced``."""
    plans = plans or {}
    publish(store, keys.directive_key(PREFIX), Directive(None, None))
    for o in range(nnodes):
        held = () if o in replaced else tuple(
            Holding(r, 20, KEY, 100) for r in range(o * per_pod, (o + 1) * per_pod)
        )  # fmt: skip
        publish(store, keys.agent_key(PREFIX, o), AgentRecord(o, f"node-{o}", 1, held))
        publish(store, keys.plan_key(PREFIX, o), PlanRecord(plans.get(o)))


def _run_round(port: int, nnodes: int, per_pod: int) -> dict[int, tuple[Any, CountingStore]]:
    world = nnodes * per_pod
    sessions: dict[int, tuple[Any, CountingStore]] = {}
    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            store = CountingStore(TCPStore("127.0.0.1", port, is_master=False))
            ctx = RoundContext("127.0.0.1", port, PREFIX, 1, nnodes, "test", r // per_pod,
                               r % per_pod, per_pod)  # fmt: skip
            session = RoundSession(ctx, store, r, world, env={})
            plan = session.agree(KEY, None, timeout=30)
            sessions[r] = ((plan, session.agreement), store)
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return sessions


def test_followers_read_only_the_leaders_agreement_and_all_ranks_get_the_same_plan(
    master: Any,
) -> None:
    # Failed before the leader exchange: every rank read all 2 * 4 + 8 + 1 records.
    nnodes, per_pod = 4, 2
    plan = PlanEntry(2, 1, Mode.PEER, PlannedBy.OPERATOR)
    _publish_agents(master, nnodes, per_pod, replaced={2}, plans={2: plan})
    sessions = _run_round(master.port, nnodes, per_pod)

    expected = agree(
        nnodes=nnodes,
        world_size=8,
        pods=[
            PodReport(
                o,
                () if o == 2 else tuple(Holding(r, 20, KEY, 100) for r in (2 * o, 2 * o + 1)),
                plan if o == 2 else None,
                f"node-{o}",
            )
            for o in range(nnodes)
        ],
        ranks=[WorkerRecord(r, KEY, None) for r in range(8)],
    )
    assert expected.roles[4].source == 2 and expected.roles[5].source == 3
    # Every holder of the replica stripes to the receivers too, spread over the pods.
    assert expected.roles[4].also_from and expected.roles[5].also_from
    assert expected.movers == tuple(range(8))
    for r, ((rank_plan, agreement), store) in sessions.items():
        assert rank_plan is not None and rank_plan.step == 20
        assert rank_plan.receive_from == expected.roles[r].source
        assert rank_plan.also_from == expected.roles[r].also_from
        assert tuple(rank_plan.send_to) == expected.roles[r].send_to
        assert agreement.movers == expected.movers
        assert agreement.reason == expected.reason
        if r == exchange.LEADER:
            assert sum(store.read.values()) == 1 + 2 * nnodes + 8
        else:
            assert dict(store.read) == {keys.agreement_key(PREFIX): 1}, (r, store.read)


def test_a_malformed_record_makes_the_leader_tell_every_rank_why_it_cannot_agree(
    master: Any,
) -> None:
    _publish_agents(master, 2, 1, replaced=set())
    master.set(keys.agent_key(PREFIX, 1), encode({"ordinal": 1, "holdings": "not a list"}))
    sessions = _run_round(master.port, 2, 1)
    for (rank_plan, agreement), _ in sessions.values():
        assert rank_plan is None and not agreement.ok
        assert agreement.reason.startswith("no agreement:")
        assert f"{keys.agent_key(PREFIX, 1)}: malformed agent record" in agreement.reason


def test_a_follower_without_the_leaders_agreement_in_time_raises_naming_it(master: Any) -> None:
    with pytest.raises(ExchangeError, match="the leader's agreement: 1 of 1 entries missing"):
        exchange.follow(master, PREFIX, 3, 4, timeout=-exchange.FOLLOWER_MARGIN_S + 0.2)


def test_a_follower_holds_the_same_role_as_the_leader_for_every_rank() -> None:
    rng = random.Random(7)
    for _ in range(50):
        nnodes, per_pod = rng.randint(2, 6), rng.randint(1, 3)
        world = nnodes * per_pod
        lost = set(rng.sample(range(nnodes), rng.randint(0, nnodes - 1)))
        pods = [
            PodReport(o, () if o in lost else tuple(
                Holding(r, 20, KEY, 1) for r in range(o * per_pod, (o + 1) * per_pod)
            ), None, f"node-{o}")
            for o in range(nnodes)
        ]  # fmt: skip
        full = agree(nnodes=nnodes, world_size=world, pods=pods,
                     ranks=[WorkerRecord(r, KEY) for r in range(world)])  # fmt: skip
        record = AgreementRecord.from_json(exchange.to_record(full).to_json(), "test")
        for r in range(world):
            mine = exchange.from_record(record, r, world)
            assert mine.step == full.step and mine.reason == full.reason
            assert mine.movers == full.movers
            assert mine.roles[r] == full.roles[r]
            if full.roles[r].action is Action.LOCAL:
                assert mine.roles[r].source is None


@pytest.mark.parametrize(
    ("raw", "error"),
    [
        ({"step": 3, "moves": [[1, 1, "runtime", []]]}, "rank 1 cannot receive from itself"),
        ({"step": 3, "moves": [[1, 0, "runtime", [1]]]}, "rank 1 cannot receive from itself"),
        ({"step": 3, "moves": [[1, 0, "runtime", [2, 2]]]}, "rank 1 names a source twice"),
        ({"step": 3, "moves": [[1, 0, "runtime", [0]]]}, "rank 1 names a source twice"),
        ({"step": 3, "moves": [[1, 0, "runtime", [-2]]]}, "also_from must be an int >= 0"),
        ({"step": 3, "moves": [[1, 0, "runtime", 2]]}, "a move must be"),
        (
            {"step": 3, "moves": [[1, 0, "runtime", []], [1, 2, "runtime", []]]},
            "a rank receives twice",
        ),
        ({"step": 3, "moves": [[1, 0, "someone", []]]}, "'someone' is not a valid PlannedBy"),
        ({"step": None, "moves": [[1, 0, "runtime", []]]}, "moves without a step"),
        ({"step": 3, "moves": [[1, 0]]}, "a move must be"),
        ({"step": 3, "moves": [[1, 0, "runtime"]]}, "a move must be"),
        ({"moves": []}, "'step'"),
    ],
)
def test_a_malformed_agreement_record_is_refused_naming_what_was_wrong(
    raw: dict[str, Any], error: str
) -> None:
    with pytest.raises(ExchangeError, match="where: malformed agreement record") as caught:
        AgreementRecord.from_json(raw, "where")
    assert error in str(caught.value)


def test_a_move_outside_the_world_is_refused() -> None:
    record = AgreementRecord(3, "", (Move(5, 0, PlannedBy.RUNTIME),))
    with pytest.raises(ValueError, match="outside world size 4"):
        exchange.from_record(record, 0, 4)
    striped = AgreementRecord(3, "", (Move(1, 0, PlannedBy.RUNTIME, (2, 7)),))
    with pytest.raises(ValueError, match="outside world size 4"):
        exchange.from_record(striped, 0, 4)


def test_a_striped_move_makes_every_source_send_and_round_trips() -> None:
    record = AgreementRecord(
        3,
        "r",
        (Move(1, 0, PlannedBy.OPERATOR, (2, 3)), Move(4, 2, PlannedBy.RUNTIME, (0,))),
        "lineage",
    )
    raw = record.to_json()
    assert raw["moves"] == [[1, 0, "operator", [2, 3]], [4, 2, "runtime", [0]]]
    assert AgreementRecord.from_json(raw, "where") == record
    follower = exchange.from_record(record, 5, 6)
    assert follower.roles[1].source == 0 and follower.roles[1].sources == (0, 2, 3)
    assert follower.roles[0].send_to == (1, 4) and follower.roles[3].send_to == (1,)
    assert follower.roles[2].send_to == (1, 4) and follower.roles[5].action is Action.LOCAL
    assert follower.movers == (0, 1, 2, 3, 4)


def test_a_striped_move_that_breaks_the_agreement_rules_is_refused() -> None:
    receives_too = AgreementRecord(
        3, "", (Move(1, 0, PlannedBy.RUNTIME, (2,)), Move(2, 0, PlannedBy.RUNTIME))
    )
    with pytest.raises(ValueError, match="rank 2 both receives and sends"):
        exchange.from_record(receives_too, 0, 4)
    too_many = AgreementRecord(3, "", (Move(0, 1, PlannedBy.RUNTIME, (2, 3, 4, 5)),))
    with pytest.raises(ValueError, match="5 sources, more than 4"):
        exchange.from_record(too_many, 0, 8)


def test_to_record_carries_every_source_of_a_striped_receiver() -> None:
    held = {o: () if o == 2 else (Holding(o, 20, KEY, 100),) for o in range(4)}
    agreement = agree(
        nnodes=4,
        world_size=4,
        pods=[PodReport(o, held[o]) for o in range(4)],
        ranks=[WorkerRecord(r, KEY) for r in range(4)],
    )
    (move,) = exchange.to_record(agreement).moves
    assert (move.receiver, move.source) == (2, agreement.roles[2].source)
    assert sorted((move.source, *move.also_from)) == [0, 1, 3]
