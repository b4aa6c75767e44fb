"""One time budget for a restore, split into the transfer phase and the vote phase.

A restore waits in two ways: for bytes to move between peers (the transfer), and for the
slowest rank to show up (forming the vote group, the round's agreement, and after the
transfer, every rank's ballot). Separate timeouts for the two do not add up: ranks with
nothing to receive reach the vote at once and would stop waiting while a legitimate
transfer is still running. So there is one budget, ``PEER_RECOVERY_RESTORE_TIMEOUT_S``
(default 420 s), and both timeouts derive from it:

- ``transfer_s`` (5/7 of it, 300 s by default) bounds a peer transfer;
- ``vote_s`` (the rest, 120 s by default) bounds each wait for other ranks;
- a rank waits for the job's decision until ``transfer_s + vote_s`` after it began its part
  (:meth:`RestoreBudget.decision_deadline`), so no rank gives up on the vote before a
  transfer that started with it could have finished.

Pure: no I/O; ``PeerRecovery`` resolves the value (argument, environment, default).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Final

__all__ = [
    "DEFAULT_RESTORE_TIMEOUT_S",
    "ENV_RESTORE_TIMEOUT",
    "TRANSFER_SHARE",
    "RestoreBudget",
]

#: Seconds a whole restore may take: transfer phase plus vote phase.
ENV_RESTORE_TIMEOUT: Final = "PEER_RECOVERY_RESTORE_TIMEOUT_S"
DEFAULT_RESTORE_TIMEOUT_S: Final = 420.0
#: The transfer phase's share of the budget; the vote phase gets the rest.
TRANSFER_SHARE: Final = 5.0 / 7.0


@dataclass(frozen=True)
class RestoreBudget:
    """The restore's time budget, in seconds, and the timeouts derived from it."""

    total_s: float

    def __post_init__(self) -> None:
        if not (isinstance(self.total_s, int | float) and math.isfinite(self.total_s)):
            raise ValueError(
                f"the restore timeout must be a number of seconds, got {self.total_s!r}"
            )
        if self.total_s <= 0:
            raise ValueError(f"the restore timeout must be > 0 seconds, got {self.total_s}")

    @classmethod
    def from_vote_timeout(cls, vote_s: float) -> RestoreBudget:
        """The budget whose vote phase is ``vote_s`` (the older ``vote_timeout_s`` setting)."""
        if not (isinstance(vote_s, int | float) and math.isfinite(vote_s) and vote_s > 0):
            raise ValueError(f"the vote timeout must be > 0 seconds, got {vote_s!r}")
        return cls(vote_s / (1.0 - TRANSFER_SHARE))

    @property
    def transfer_s(self) -> float:
        """The longest a peer transfer may take (the transport's timeout)."""
        return self.total_s * TRANSFER_SHARE

    @property
    def vote_s(self) -> float:
        """The longest each wait for another rank may take (group, agreement, ballots)."""
        return self.total_s - self.transfer_s

    def decision_deadline(self, started: float) -> float:
        """When a rank that began its part at ``started`` stops waiting for the others'
        ballots: after the transfer could have finished, plus the vote phase."""
        return started + self.transfer_s + self.vote_s
