"""The stripe plan: chunks handed out once, a lost source's chunks re-planned first."""

from __future__ import annotations

import pytest

from peer_recovery.snapshots.stripes import StripePlan


def test_chunks_follow_the_manifest_chunk_boundaries() -> None:
    plan = StripePlan(250, 100, [0])
    assert [(r.offset, r.length) for r in plan.ranges] == [(0, 100), (100, 100), (200, 50)]


def test_a_lost_source_gives_its_chunks_back_first_and_the_others_finish() -> None:
    plan = StripePlan(400, 100, [0, 1])
    a, b = plan.next_for(0), plan.next_for(1)
    assert a is not None and b is not None
    plan.landed(1, b.index)
    assert plan.lose(0, "died") == [a.index]
    assert plan.next_for(0) is None  # a lost source gets nothing more
    got = [plan.next_for(1) for _ in range(3)]
    assert [r.index for r in got if r] == [a.index, 2, 3]
    for r in got:
        assert r is not None
        plan.landed(1, r.index)
    assert plan.finished and not plan.failed
    assert plan.sent_by == {0: 0, 1: 400}
    assert "source 0: died" in plan.describe()


def test_the_plan_fails_only_when_no_source_is_left() -> None:
    plan = StripePlan(200, 100, [0, 1])
    plan.lose(0, "died")
    assert not plan.failed
    plan.lose(1, "timed out")
    assert plan.failed and not plan.finished


def test_a_chunk_landing_from_a_source_that_was_not_asked_is_refused() -> None:
    plan = StripePlan(200, 100, [0, 1])
    chunk = plan.next_for(0)
    assert chunk is not None
    with pytest.raises(ValueError, match="not outstanding at source 1"):
        plan.landed(1, chunk.index)


def test_bad_plans_are_refused_with_what_was_wrong() -> None:
    with pytest.raises(ValueError, match="chunk_bytes"):
        StripePlan(10, 0, [0])
    with pytest.raises(ValueError, match="at least one source"):
        StripePlan(10, 5, [])
