"""One restore decision for the whole job, written once in the job's store and read by all.

Each rank's own ``all_gather`` with its own timeout cannot give every rank the same answer:
a rank arriving near the deadline can complete the gather on some ranks after others gave
up, and the job then resumes on some ranks and loads the checkpoint on others. Here the
decision is a single key in the job's store (the default process group's store: under
torchrun the agent's TCPStore), written with ``compare_set`` so that only the first write
counts, and every rank acts on what the key holds:

1. each rank writes its ballot (JSON) under its own key and counts itself in;
2. the rank that counts in last reads every ballot and writes their verdict
   (:func:`peer_recovery.vote.decide`); a rank whose ballot is a no (the outcome cannot be
   anything but "fall back") waits for the others' ballots only for the vote phase, then
   writes "fall back" with every reason it has, so a missing rank costs one vote phase;
3. every other rank waits for the decision key until its own deadline; a rank whose
   deadline passed writes "fall back: ranks ... did not report";
4. every rank reads the key and acts on it. A rank arriving after the deadline therefore
   finds "fall back" already written and falls back too, whatever its own ballot says.

A rank that cannot learn the decision (the store is unreachable, or the key holds something
that is not a decision) raises :class:`DecisionUnknown`: it cannot know whether the others
resume, so the process must end rather than train. Nothing here is pickled.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Final

from peer_recovery.vote import Ballot, VoteOutcome, decide

__all__ = [
    "DecisionUnknown",
    "JobDecision",
    "ballot_from_json",
    "ballot_to_json",
    "default_store",
    "outcome_from_json",
    "outcome_to_json",
    "settle",
]

log = logging.getLogger("peer_recovery.decision")

PREFIX: Final = "peer-recovery/decision"
_UNDECIDED: Final = ""  # compare_set's "the key does not exist yet"
_MAX_REASON: Final = 4000


class DecisionUnknown(RuntimeError):
    """This rank could not learn the job's restore decision: it must not train on."""


def ballot_to_json(ballot: Ballot) -> str:
    return json.dumps({"ok": ballot.ok, "step": ballot.step, "reason": ballot.reason[:_MAX_REASON]})


def ballot_from_json(raw: bytes | str, where: str) -> Ballot:
    data = _object(raw, where)
    ok, step, reason = data.get("ok"), data.get("step"), data.get("reason", "")
    if (
        not isinstance(ok, bool)
        or not (step is None or _is_int(step))
        or not isinstance(reason, str)
    ):
        raise DecisionUnknown(f"{where}: not a ballot: {data!r}"[:300])
    return Ballot(ok, step, reason)


def outcome_to_json(outcome: VoteOutcome) -> str:
    failed = {str(rank): why[:_MAX_REASON] for rank, why in outcome.failed.items()}
    return json.dumps(
        {"ok": outcome.ok, "step": outcome.step, "failed": failed, "reason": outcome.reason}
    )


def outcome_from_json(raw: bytes | str, where: str) -> VoteOutcome:
    data = _object(raw, where)
    ok, step, failed, reason = (data.get(k) for k in ("ok", "step", "failed", "reason"))
    valid = (
        isinstance(ok, bool)
        and (step is None or _is_int(step))
        and (ok is False or step is not None)
        and isinstance(failed, dict)
        and all(k.isdigit() and isinstance(v, str) for k, v in failed.items())
        and isinstance(reason, str)
    )
    if not valid:
        raise DecisionUnknown(f"{where}: not a decision: {data!r}"[:300])
    assert isinstance(failed, dict) and isinstance(reason, str) and isinstance(ok, bool)
    return VoteOutcome(ok, step, {int(k): v for k, v in failed.items()}, reason)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _object(raw: bytes | str, where: str) -> dict[str, Any]:
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as error:
        raise DecisionUnknown(f"{where}: not JSON: {error}") from None
    if not isinstance(data, dict):
        raise DecisionUnknown(f"{where}: expected a JSON object, got {type(data).__name__}")
    return data


def default_store() -> Any:
    """The default process group's store: the job's store (under torchrun the agent's
    TCPStore, under a per-attempt prefix)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("torch.distributed is not initialised: no job store")
    return dist.distributed_c10d._get_default_store()


def settle(
    ballots: Mapping[int, Ballot], world_size: int, *, deadline_passed: bool, budget_s: float
) -> VoteOutcome | None:
    """Pure: the decision the ballots seen so far make, or ``None`` while it is open.

    Any no decides "fall back" at once; all ballots in decide by :func:`vote.decide`; past
    the deadline the missing ranks decide "fall back".
    """
    failed = {rank: b.reason or "failed" for rank, b in ballots.items() if not b.ok}
    if failed:
        detail = "; ".join(f"rank {rank}: {why}" for rank, why in sorted(failed.items()))
        reason = f"{len(failed)} of {world_size} ranks failed: {detail}"
        return VoteOutcome(False, None, failed, reason)
    if len(ballots) == world_size:
        return decide([ballots[rank] for rank in range(world_size)])
    if deadline_passed:
        missing = sorted(set(range(world_size)) - set(ballots))
        reason = (
            f"ranks {missing} did not report within the restore budget ({budget_s:.0f} s): "
            "missing or too slow"
        )
        return VoteOutcome(False, None, {}, reason)
    return None


class JobDecision:
    """This rank's side of one job-wide decision in ``store`` (see the module docstring).

    ``attempt`` names the decision (every rank passes the same one for the same restore);
    ``clock`` is ``time.monotonic``, replaceable for tests of the pure flow.
    """

    def __init__(
        self,
        store: Any,
        rank: int,
        world_size: int,
        attempt: str,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        self.store, self.rank, self.world_size, self.clock = store, rank, world_size, clock
        self._prefix = f"{PREFIX}/{attempt}"

    def key(self, name: str) -> str:
        return f"{self._prefix}/{name}"

    def decide(
        self, ballot: Ballot, deadline: float, budget_s: float, no_wait_s: float = 0.0
    ) -> VoteOutcome:
        """Post ``ballot``; return the job's decision (the same on every rank).

        ``no_wait_s``: how long a rank voting no waits for the other ballots, so that the
        verdict names every rank's reason. Raises :class:`DecisionUnknown` when the store
        cannot be used or holds garbage.
        """
        try:
            return self._decide(ballot, deadline, budget_s, no_wait_s)
        except DecisionUnknown:
            raise
        except Exception as error:  # the store is gone (connection refused/reset, timeout)
            raise DecisionUnknown(
                f"rank {self.rank}: could not learn the job's restore decision from the "
                f"store: {type(error).__name__}: {error}".splitlines()[0]
            ) from error

    def _decide(
        self, ballot: Ballot, deadline: float, budget_s: float, no_wait_s: float
    ) -> VoteOutcome:
        store, decision_key = self.store, self.key("outcome")
        store.set(self.key(f"ballot/{self.rank}"), ballot_to_json(ballot))
        arrived = int(store.add(self.key("arrived"), 1))
        if arrived >= self.world_size:  # the last to count in: every ballot is there
            return self._write(self._settle_from_store(deadline_passed=False, budget_s=budget_s))
        if not ballot.ok:  # "fall back" whatever comes: wait a little for the others' reasons
            wait = min(deadline - self.clock(), no_wait_s)
            ballots = [self.key(f"ballot/{rank}") for rank in range(self.world_size)]
            if wait > 0 and self._wait(ballots, wait) and store.check([decision_key]):
                return self._read()
            return self._write(self._settle_from_store(deadline_passed=True, budget_s=budget_s))
        remaining = deadline - self.clock()
        if remaining > 0 and self._wait([decision_key], remaining):
            return self._read()
        late = self._settle_from_store(deadline_passed=True, budget_s=budget_s)
        return self._write(late)

    def _wait(self, keys: list[str], seconds: float) -> bool:
        """Wait for all of ``keys``; False when the wait timed out (the store may also be
        gone: the write that follows then raises)."""
        try:
            self.store.wait(keys, timedelta(seconds=seconds))
        except Exception as error:
            log.info(
                "peer-recovery: rank %d: waited %.1fs in vain: %s",
                self.rank,
                seconds,
                str(error).splitlines()[0] if str(error) else type(error).__name__,
            )
            return False
        return True

    def _settle_from_store(self, *, deadline_passed: bool, budget_s: float) -> VoteOutcome:
        keys = [self.key(f"ballot/{rank}") for rank in range(self.world_size)]
        present = {rank: key for rank, key in enumerate(keys) if self.store.check([key])}
        ballots = {
            rank: ballot_from_json(self.store.get(key), key) for rank, key in present.items()
        }
        outcome = settle(
            ballots, self.world_size, deadline_passed=deadline_passed, budget_s=budget_s
        )
        if outcome is None:  # not all in, deadline not passed: cannot happen when called
            outcome = settle(ballots, self.world_size, deadline_passed=True, budget_s=budget_s)
        assert outcome is not None
        return outcome

    def _write(self, outcome: VoteOutcome | None) -> VoteOutcome:
        """Write ``outcome`` unless a decision is already there; return the one that is."""
        assert outcome is not None
        key = self.key("outcome")
        current = self.store.compare_set(key, _UNDECIDED, outcome_to_json(outcome))
        decided = outcome_from_json(current, key)
        if decided != outcome:
            log.info(
                "peer-recovery: rank %d: the job had decided already: %s", self.rank, decided.reason
            )
        return decided

    def _read(self) -> VoteOutcome:
        key = self.key("outcome")
        return outcome_from_json(self.store.get(key), key)
