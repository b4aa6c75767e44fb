"""Leader election on a ``coordination.k8s.io/v1`` Lease, so only one replica acts.

Every replica watches and keeps its caches warm; only the holder of the Lease runs rounds,
sweeps and retention. The timing rule is pure (:func:`next_step`) and tested directly;
:class:`LeaderElector` does the reads and writes through :class:`LeaseApi`.

Invariants:

- Every write carries the ``resourceVersion`` just read (or is a create), so two replicas
  racing for the Lease cannot both win: the loser gets a Conflict (or AlreadyExists).
- Expiry is judged on the reader's own monotonic clock, from the moment it last saw the
  record change, never from the holder's ``renewTime`` (clocks of two nodes may disagree).
- A leader that has not renewed for ``renew_deadline`` stops acting, and another replica
  takes over only ``duration`` after it last saw a renewal; ``duration > renew_deadline``
  leaves the old leader time to stop first. Rounds that were already in flight are safe
  anyway: record names are deterministic and status writes carry a resourceVersion.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, Protocol

from peer_recovery.contract.errors import ApiError

__all__ = ["LeaderElector", "LeaseApi", "LeaseTiming", "Observed", "Step", "next_step"]

logger = logging.getLogger(__name__)


class LeaseApi(Protocol):
    """The three Lease calls the elector makes; every method is synchronous."""

    def get_lease(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    def create_lease(self, namespace: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """The created Lease, or None when one of that name already exists."""
        ...

    def replace_lease(self, namespace: str, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        """Replace the version named in ``body``; raises Conflict when it changed since."""
        ...


@dataclasses.dataclass(frozen=True)
class LeaseTiming:
    """Seconds, as client-go's leader election names them (its defaults for controllers)."""

    #: How long a claim lasts without renewal before another replica may take over.
    duration: float = 15.0
    #: A leader that could not renew for this long stops acting.
    renew_deadline: float = 10.0
    #: How often every replica reads (and the leader renews) the Lease.
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if not 0 < self.retry_period < self.renew_deadline < self.duration:
            raise ValueError(
                "lease timing needs 0 < --lease-retry-period < --lease-renew-deadline < "
                f"--lease-duration, got {self.retry_period!r}, {self.renew_deadline!r}, "
                f"{self.duration!r}"
            )


@dataclasses.dataclass(frozen=True)
class Observed:
    """What the elector needs of a Lease as read."""

    holder: str
    renew_time: str  # opaque: only whether it changed matters
    transitions: int
    resource_version: str

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> Observed:
        spec = body.get("spec") or {}
        return cls(
            holder=str(spec.get("holderIdentity") or ""),
            renew_time=str(spec.get("renewTime") or ""),
            transitions=int(spec.get("leaseTransitions") or 0),
            resource_version=str((body.get("metadata") or {}).get("resourceVersion") or ""),
        )


class Step(enum.Enum):
    CREATE = "create"  # no Lease yet
    RENEW = "renew"  # we hold it
    TAKE_OVER = "take-over"  # released, or its holder stopped renewing
    FOLLOW = "follow"  # someone else holds it


def next_step(
    observed: Observed | None, me: str, *, changed_at: float, now: float, duration: float
) -> Step:
    """What to do about the Lease as read; ``changed_at`` is when this replica last saw it
    change (its own monotonic clock), ``now`` the same clock now."""
    if observed is None:
        return Step.CREATE
    if observed.holder == me:
        return Step.RENEW
    if not observed.holder or now - changed_at > duration:
        return Step.TAKE_OVER
    return Step.FOLLOW


def _micro_time(at: datetime) -> str:
    return at.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaderElector:
    """Acquires, renews and releases one Lease; :meth:`tick` is one read-and-maybe-write."""

    def __init__(
        self,
        api: LeaseApi,
        namespace: str,
        name: str,
        identity: str,
        timing: LeaseTiming | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], datetime] = lambda: datetime.now(timezone.utc),
    ) -> None:
        if not identity:
            raise ValueError("leader election needs a non-empty identity")
        self.namespace, self.name, self.identity = namespace, name, identity
        self.timing = timing or LeaseTiming()
        self._api = api
        self._clock, self._wall = clock, wall
        self._seen: Observed | None = None
        self._changed_at = clock()
        #: Monotonic time (taken before the request) of our last successful write, or None.
        self._renewed_at: float | None = None

    def leading(self) -> bool:
        """Whether to act now: we hold the Lease and renewed it within ``renew_deadline``."""
        renewed = self._renewed_at
        return renewed is not None and self._clock() - renewed < self.timing.renew_deadline

    def tick(self) -> bool:
        """Read the Lease, create, renew or take it over when due; return :meth:`leading`."""
        started = self._clock()
        try:
            body = self._api.get_lease(self.namespace, self.name)
        except ApiError as error:
            logger.warning("reading Lease %s/%s failed: %s", self.namespace, self.name, error)
            return self.leading()
        observed = Observed.of(body) if body is not None else None
        if observed != self._seen:
            self._seen, self._changed_at = observed, started
        step = next_step(
            observed,
            self.identity,
            changed_at=self._changed_at,
            now=started,
            duration=self.timing.duration,
        )
        if step is Step.FOLLOW:
            self._renewed_at = None
            return False
        try:
            written = self._write(step, body)
        except ApiError as error:  # a Conflict: another replica wrote first
            logger.info("Lease %s/%s not %s: %s", self.namespace, self.name, step.value, error)
            written = None
        if written is None:
            if step is not Step.RENEW:
                self._renewed_at = None
            return self.leading()
        if self._renewed_at is None:
            logger.info("%s now leads (Lease %s/%s)", self.identity, self.namespace, self.name)
        self._seen, self._changed_at = Observed.of(written), started
        self._renewed_at = started
        return self.leading()

    def _write(self, step: Step, body: dict[str, Any] | None) -> dict[str, Any] | None:
        now = _micro_time(self._wall())
        duration = max(1, math.ceil(self.timing.duration))
        if step is Step.CREATE or body is None:
            return self._api.create_lease(
                self.namespace,
                {
                    "apiVersion": "coordination.k8s.io/v1",
                    "kind": "Lease",
                    "metadata": {"name": self.name, "namespace": self.namespace},
                    "spec": {
                        "holderIdentity": self.identity,
                        "leaseDurationSeconds": duration,
                        "acquireTime": now,
                        "renewTime": now,
                        "leaseTransitions": 0,
                    },
                },
            )
        spec = dict(body.get("spec") or {})
        spec.update(renewTime=now, leaseDurationSeconds=duration)
        if step is Step.TAKE_OVER:
            spec.update(
                holderIdentity=self.identity,
                acquireTime=now,
                leaseTransitions=int(spec.get("leaseTransitions") or 0) + 1,
            )
        return self._api.replace_lease(self.namespace, self.name, {**body, "spec": spec})

    def release(self) -> None:
        """Give the Lease up on a clean stop, so a standby takes over at once, not after
        ``duration``. Best effort: a failure only means the standby waits the expiry out."""
        if self._renewed_at is None:
            return
        self._renewed_at = None
        try:
            body = self._api.get_lease(self.namespace, self.name)
            if body is None or Observed.of(body).holder != self.identity:
                return
            spec = {
                **(body.get("spec") or {}),
                "holderIdentity": "",
                "leaseDurationSeconds": 1,
                "renewTime": _micro_time(self._wall()),
            }
            self._api.replace_lease(self.namespace, self.name, {**body, "spec": spec})
            logger.info("%s released Lease %s/%s", self.identity, self.namespace, self.name)
        except ApiError as error:
            logger.warning("releasing Lease %s/%s failed: %s", self.namespace, self.name, error)
