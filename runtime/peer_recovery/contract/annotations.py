"""Reading the PyTorchJob's peer-recovery annotations, with errors that name what was wrong.

Pure and torch-free. Two annotations (keys in :mod:`peer_recovery.contract.names`):

- ``peer-recovery: enabled``, or the prefixed ``peerrecovery.io/enabled: "true"``, opts the
  job in. Absent means off; any other value of either key is an error rather than a silent
  "off", so ``peer-recovery: "true"`` is reported (naming both accepted forms), not ignored.
- ``peerrecovery.io/pods-per-replica: "<k>"``: k consecutive pods hold one full replica of
  the state, so pods hold the same shards when their ordinals are equal modulo k. Absent
  means every pod holds a full replica (k = 1). k must be a positive decimal integer and,
  when the job's pod count is known, divide it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from peer_recovery.contract.names import (
    ANNOTATION_ENABLED,
    ANNOTATION_ENABLED_PREFIXED,
    ANNOTATION_ENABLED_PREFIXED_VALUE,
    ANNOTATION_ENABLED_VALUE,
    ANNOTATION_PODS_PER_REPLICA,
)

__all__ = [
    "ACCEPTED_OPT_INS",
    "AnnotationError",
    "JobSettings",
    "is_enabled",
    "parse_job_annotations",
]

_DECIMAL = re.compile(r"^[0-9]+$")

#: Every (key, value) that opts a job in.
ACCEPTED_OPT_INS: tuple[tuple[str, str], ...] = (
    (ANNOTATION_ENABLED, ANNOTATION_ENABLED_VALUE),
    (ANNOTATION_ENABLED_PREFIXED, ANNOTATION_ENABLED_PREFIXED_VALUE),
)
_ACCEPTED_TEXT = " or ".join(f'{key}: "{value}"' for key, value in ACCEPTED_OPT_INS)


class AnnotationError(ValueError):
    """A malformed peer-recovery annotation on a PyTorchJob; the message names key and value."""


@dataclass(frozen=True)
class JobSettings:
    """What a job's annotations ask of peer-recovery."""

    enabled: bool
    #: As written; None when the annotation is absent.
    pods_per_replica: int | None = None

    @property
    def replication(self) -> int:
        """The k of "same shards when ordinals are equal modulo k" (1 when absent)."""
        return self.pods_per_replica or 1


def is_enabled(annotations: Mapping[str, str] | None) -> bool:
    """True only for exactly one of :data:`ACCEPTED_OPT_INS` (never raises; for filters)."""
    annotations = annotations or {}
    return any(annotations.get(key) == value for key, value in ACCEPTED_OPT_INS)


def parse_job_annotations(
    annotations: Mapping[str, str] | None, *, pod_count: int | None = None
) -> JobSettings:
    """The job's settings; raises :class:`AnnotationError` for a malformed value.

    ``pod_count`` (the job's pods across all replica types), when given, is checked to be a
    multiple of pods-per-replica: otherwise some shard position would have no full replica.
    """
    annotations = annotations or {}
    if not isinstance(annotations, Mapping):
        raise AnnotationError(f"job annotations must be a mapping, got {annotations!r}")
    enabled = False
    for key, value in ACCEPTED_OPT_INS:
        raw = annotations.get(key)
        if raw is not None and raw != value:
            raise AnnotationError(
                f"annotation {key}={raw!r}: the job opts in with {_ACCEPTED_TEXT} "
                f"(remove the annotation to opt out)"
            )
        enabled = enabled or raw is not None
    k = _parse_pods_per_replica(annotations.get(ANNOTATION_PODS_PER_REPLICA))
    if k is not None and pod_count is not None:
        if not isinstance(pod_count, int) or isinstance(pod_count, bool) or pod_count < 1:
            raise ValueError(f"pod_count must be an int >= 1, got {pod_count!r}")
        if pod_count % k:
            raise AnnotationError(
                f"annotation {ANNOTATION_PODS_PER_REPLICA}={k} does not divide the job's "
                f"{pod_count} pods: every replica must have exactly {k} pods"
            )
    return JobSettings(enabled=enabled, pods_per_replica=k)


def _parse_pods_per_replica(raw: object) -> int | None:
    if raw is None:
        return None
    where = f"annotation {ANNOTATION_PODS_PER_REPLICA}={raw!r}"
    if not isinstance(raw, str):
        raise AnnotationError(f"{where}: annotation values are strings")
    text = raw.strip()
    if not _DECIMAL.match(text):
        raise AnnotationError(f'{where}: expected a positive whole number such as "2"')
    k = int(text)
    if k < 1:
        raise AnnotationError(f"{where}: must be at least 1")
    return k
