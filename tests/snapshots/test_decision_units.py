"""The pure parts of the job's one decision and of the restore budget, and the decision's
flow on a real in-memory store (``torch.distributed.HashStore``) shared by threads standing
for ranks."""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest
import torch.distributed as dist

from peer_recovery.budget import RestoreBudget
from peer_recovery.decision import (
    DecisionUnknown,
    JobDecision,
    ballot_from_json,
    ballot_to_json,
    outcome_from_json,
    outcome_to_json,
    settle,
)
from peer_recovery.vote import Ballot, VoteOutcome

OK2 = Ballot(True, 2)


def test_settle_waits_until_every_ballot_is_in_or_a_no_arrives() -> None:
    assert settle({0: OK2}, 3, deadline_passed=False, budget_s=10) is None
    done = settle({0: OK2, 1: OK2, 2: OK2}, 3, deadline_passed=False, budget_s=10)
    assert done == VoteOutcome(True, 2, {}, "all 3 ranks restored step 2")
    no = settle({1: Ballot(False, None, "bad checksum")}, 3, deadline_passed=False, budget_s=10)
    assert no is not None and not no.ok and no.failed == {1: "bad checksum"}
    assert no.reason == "1 of 3 ranks failed: rank 1: bad checksum"


def test_settle_past_the_deadline_names_the_missing_ranks() -> None:
    late = settle({0: OK2, 2: OK2}, 4, deadline_passed=True, budget_s=10)
    assert late is not None and not late.ok
    assert late.reason.startswith("ranks [1, 3] did not report within the restore budget (10 s)")


def test_ranks_on_different_steps_fall_back() -> None:
    split = settle({0: OK2, 1: Ballot(True, 3)}, 2, deadline_passed=False, budget_s=10)
    assert split is not None and not split.ok and "different steps" in split.reason


def test_ballots_and_outcomes_travel_as_json_and_garbage_is_refused() -> None:
    assert ballot_from_json(ballot_to_json(Ballot(False, None, "why")), "k") == Ballot(
        False, None, "why"
    )
    outcome = VoteOutcome(False, None, {3: "gone"}, "1 of 4 ranks failed: rank 3: gone")
    assert outcome_from_json(outcome_to_json(outcome), "k") == outcome
    for raw in (b"\x80\x04pickle", b"[1]", b'{"ok": true, "step": null}', b'{"ok": "yes"}'):
        with pytest.raises(DecisionUnknown, match="k: "):
            outcome_from_json(raw, "k")
    with pytest.raises(DecisionUnknown, match="not a ballot"):
        ballot_from_json(b'{"ok": true, "step": "2"}', "k")


def _ranks(
    store: Any, ballots: dict[int, Ballot], deadlines: dict[int, float], no_wait_s: float = 0.0
) -> dict[int, Any]:
    """Each rank decides in a thread of its own; return what each learned."""
    seen: dict[int, Any] = {}

    def rank(r: int) -> None:
        job = JobDecision(store, r, len(ballots), "test")
        seen[r] = job.decide(ballots[r], deadlines[r], 10, no_wait_s)

    threads = [threading.Thread(target=rank, args=(r,)) for r in ballots]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return seen


def test_every_rank_learns_the_same_yes() -> None:
    far = time.monotonic() + 60
    seen = _ranks(dist.HashStore(), {0: OK2, 1: OK2, 2: OK2}, dict.fromkeys(range(3), far))
    assert {r: (o.ok, o.step) for r, o in seen.items()} == dict.fromkeys(range(3), (True, 2))


def test_a_no_decides_for_everyone() -> None:
    far = time.monotonic() + 60
    ballots = {0: OK2, 1: Ballot(False, None, "slot damaged"), 2: OK2}
    seen = _ranks(dist.HashStore(), ballots, dict.fromkeys(range(3), far))
    assert {o.reason for o in seen.values()} == {"1 of 3 ranks failed: rank 1: slot damaged"}


def test_the_verdict_names_every_rank_that_voted_no_in_time() -> None:
    far = time.monotonic() + 60
    ballots = {0: Ballot(False, None, "no snapshot"), 1: OK2, 2: Ballot(False, None, "stale")}
    seen = _ranks(dist.HashStore(), ballots, dict.fromkeys(range(3), far), no_wait_s=30)
    reasons = {o.reason for o in seen.values()}
    assert reasons == {"2 of 3 ranks failed: rank 0: no snapshot; rank 2: stale"}


def test_a_rank_arriving_after_the_decision_follows_it_whatever_its_ballot() -> None:
    store = dist.HashStore()
    past = time.monotonic()
    early = JobDecision(store, 0, 2, "late").decide(OK2, past, 10)
    assert not early.ok and "ranks [1] did not report" in early.reason
    late = JobDecision(store, 1, 2, "late").decide(OK2, time.monotonic() + 60, 10)
    assert late == early  # it counted in last with a yes, and still falls back


def test_an_unusable_store_is_a_decision_unknown() -> None:
    class Gone:
        def set(self, key: str, value: str) -> None:
            raise RuntimeError("Connection reset by peer")

    with pytest.raises(DecisionUnknown, match="could not learn the job's restore decision"):
        JobDecision(Gone(), 0, 2, "gone").decide(OK2, time.monotonic() + 1, 10)
    store = dist.HashStore()
    store.set("peer-recovery/decision/bad/outcome", "not json")
    with pytest.raises(DecisionUnknown, match="not JSON"):
        JobDecision(store, 0, 1, "bad").decide(OK2, time.monotonic() + 1, 10)


def test_the_budget_splits_into_a_transfer_and_a_vote_phase() -> None:
    budget = RestoreBudget(420)
    assert (budget.transfer_s, budget.vote_s) == pytest.approx((300, 120))
    assert budget.decision_deadline(1000.0) == pytest.approx(1420.0)
    assert RestoreBudget.from_vote_timeout(3).total_s == pytest.approx(10.5)
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="restore timeout"):
            RestoreBudget(bad)


def test_the_budget_comes_from_the_argument_then_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    from peer_recovery.recovery import PeerRecovery

    def budget(**kwargs: Any) -> float:
        model = __import__("torch").nn.Linear(2, 2)
        return PeerRecovery({"m": model}, directory=tmp_path, **kwargs).budget.total_s

    monkeypatch.delenv("PEER_RECOVERY_RESTORE_TIMEOUT_S", raising=False)
    monkeypatch.delenv("PEER_RECOVERY_VOTE_TIMEOUT_S", raising=False)
    assert budget() == 420
    monkeypatch.setenv("PEER_RECOVERY_VOTE_TIMEOUT_S", "30")
    assert budget() == pytest.approx(105)  # the older setting still sets the vote phase
    monkeypatch.setenv("PEER_RECOVERY_RESTORE_TIMEOUT_S", "70")
    assert budget() == 70
    assert budget(restore_timeout_s=7) == 7
    monkeypatch.setenv("PEER_RECOVERY_RESTORE_TIMEOUT_S", "soon")
    with pytest.raises(ValueError, match="PEER_RECOVERY_RESTORE_TIMEOUT_S='soon'"):
        budget()
