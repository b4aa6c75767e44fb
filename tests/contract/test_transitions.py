"""The phase transition table: every move allowed and every move refused, for each actor.

The expected table is written out here independently of ``phases.TRANSITIONS``, so a change to
the contract has to change both."""

from __future__ import annotations

import itertools

import pytest

from peer_recovery.contract import phases
from peer_recovery.contract.names import Actor, Phase, PlannedBy

# (current, proposed) -> who may make it; "planner" = the side spec.plannedBy names.
EXPECTED: dict[tuple[str, str], set[str]] = {
    ("Pending", "Pending"): {"planner"},
    ("Pending", "Planned"): {"planner"},
    ("Pending", "FellBack"): {"planner", "runtime"},
    ("Pending", "Failed"): {"operator"},
    ("Planned", "Streaming"): {"runtime"},
    ("Planned", "FellBack"): {"planner", "runtime"},
    ("Planned", "Failed"): {"operator", "runtime"},
    ("Streaming", "Streaming"): {"runtime"},
    ("Streaming", "Succeeded"): {"runtime"},
    ("Streaming", "Failed"): {"operator", "runtime"},
    ("Streaming", "FellBack"): {"runtime"},
}

ALL_MOVES = list(itertools.product(Phase, Phase, Actor, PlannedBy))


def _expected(current: Phase, proposed: Phase, actor: Actor, planned_by: PlannedBy) -> bool:
    owners = EXPECTED.get((current.value, proposed.value), set())
    return actor.value in owners or ("planner" in owners and actor.value == planned_by.value)


@pytest.mark.parametrize(
    ("current", "proposed", "actor", "planned_by"),
    ALL_MOVES,
    ids=[f"{c.value}->{p.value}-by-{a.value}-plannedby-{b.value}" for c, p, a, b in ALL_MOVES],
)
def test_every_move_is_allowed_or_refused_as_the_contract_says(
    current: Phase, proposed: Phase, actor: Actor, planned_by: PlannedBy
) -> None:
    decision = phases.check_transition(current, proposed, actor, planned_by=planned_by)
    assert decision.allowed is _expected(current, proposed, actor, planned_by), decision.reason
    assert decision.reason  # always a sentence for status.message, Events and logs
    if decision.allowed:
        rule = phases.require_transition(current, proposed, actor, planned_by=planned_by)
        assert (rule.current, rule.proposed) == (current, proposed)
    else:
        with pytest.raises(phases.TransitionError, match=r"->|terminal"):
            phases.require_transition(current, proposed, actor, planned_by=planned_by)


def test_table_is_exactly_the_expected_one() -> None:
    assert {(c.value, p.value) for c, p in phases.TRANSITIONS} == set(EXPECTED)
    for (current, proposed), rule in phases.TRANSITIONS.items():
        assert {o.value for o in rule.owners} == EXPECTED[(current.value, proposed.value)]
        assert rule.meaning


def test_phases_only_move_forward() -> None:
    order = list(Phase)
    for current, proposed in phases.TRANSITIONS:
        assert order.index(proposed) >= order.index(current), (current, proposed)
    # Nothing ever returns to Pending or Planned: a re-plan is a new object.
    into_plan = {m for m in phases.TRANSITIONS if m[1] in (Phase.PENDING, Phase.PLANNED)}
    assert into_plan == {(Phase.PENDING, Phase.PENDING), (Phase.PENDING, Phase.PLANNED)}


@pytest.mark.parametrize("terminal", [p for p in Phase if p.terminal])
def test_terminal_phases_never_move_even_to_themselves(terminal: Phase) -> None:
    for proposed, actor, planned_by in itertools.product(Phase, Actor, PlannedBy):
        decision = phases.check_transition(terminal, proposed, actor, planned_by=planned_by)
        assert not decision.allowed
        assert "terminal" in decision.reason


def test_unset_phase_is_pending() -> None:
    for unset in (None, ""):
        assert phases.parse_phase(unset) is Phase.PENDING
        assert phases.check_transition(unset, "Planned", "operator", planned_by="operator").allowed
    assert phases.phase_of({"spec": {}}) is Phase.PENDING
    assert phases.phase_of({"status": {"phase": "Streaming"}}) is Phase.STREAMING


def test_strings_and_enums_are_equivalent() -> None:
    by_enum = phases.check_transition(
        Phase.PLANNED, Phase.STREAMING, Actor.RUNTIME, planned_by=PlannedBy.OPERATOR
    )
    by_text = phases.check_transition("Planned", "Streaming", "runtime", planned_by="operator")
    assert by_enum == by_text
    assert by_enum.allowed


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("Bogus", "Planned", "operator", "operator"), "'Bogus'"),
        (("Pending", "Done", "operator", "operator"), "'Done'"),
        (("Pending", "Planned", "kubelet", "operator"), "'kubelet'"),
        (("Pending", "Planned", "operator", "Operator"), "'Operator'"),
    ],
)
def test_unknown_names_raise_errors_that_name_them(args: tuple[str, ...], named: str) -> None:
    current, proposed, actor, planned_by = args
    with pytest.raises(ValueError, match=named) as caught:
        phases.check_transition(current, proposed, actor, planned_by=planned_by)
    assert "expected one of" in str(caught.value)


def test_phase_of_rejects_unknown_phase_and_non_object_status() -> None:
    with pytest.raises(ValueError, match="'Lost'"):
        phases.phase_of({"status": {"phase": "Lost"}})
    with pytest.raises(ValueError, match="must be an object"):
        phases.phase_of({"status": "Pending"})


def test_refusal_reasons_say_why() -> None:
    wrong_owner = phases.check_transition("Planned", "Streaming", "operator", planned_by="operator")
    assert "belongs to the runtime, not the operator" in wrong_owner.reason
    not_planner = phases.check_transition("Pending", "Planned", "operator", planned_by="runtime")
    assert "spec.plannedBy=runtime" in not_planner.reason
    backwards = phases.check_transition("Streaming", "Planned", "runtime", planned_by="runtime")
    assert "not a PeerRecovery move" in backwards.reason
    assert "Succeeded" in backwards.reason  # lists what is allowed instead
    done = phases.check_transition("Failed", "Planned", "operator", planned_by="operator")
    assert "attempt + 1" in done.reason


def test_replan_only_after_failed() -> None:
    assert phases.check_replan("Failed").allowed
    for phase in (Phase.SUCCEEDED, Phase.FELL_BACK):
        decision = phases.check_replan(phase)
        assert not decision.allowed and "nothing left" in decision.reason
    for phase in (None, Phase.PENDING, Phase.PLANNED, Phase.STREAMING):
        decision = phases.check_replan(phase)
        assert not decision.allowed and "Failed before" in decision.reason


def test_operator_can_always_close_a_live_attempt_before_replanning() -> None:
    """The re-plan path exists from every live phase: operator -> Failed, then attempt + 1."""
    for phase in (Phase.PENDING, Phase.PLANNED, Phase.STREAMING):
        for planned_by in PlannedBy:
            assert phases.check_transition(
                phase, Phase.FAILED, Actor.OPERATOR, planned_by=planned_by
            ).allowed
        assert phases.check_replan(Phase.FAILED).allowed
