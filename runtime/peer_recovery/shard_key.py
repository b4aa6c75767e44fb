"""Shard keys: what a snapshot holds, so that only a matching state is ever restored.

A shard key (docs/design.md, "Identity") records the world size, the rank's position in the
parallel layout without the replicate dimension, and a digest of the state's names, shapes
and dtypes. Two ranks hold the same shard exactly when their keys are equal, which is how a
restore, local or from a peer, decides whether bytes may be loaded at all.

This module is torch-free on purpose: keys travel in manifests that the rendezvous plugin
publishes from the agent, which never imports torch. The digest is computed from plain
``(path, dtype name, shape)`` triples and the paths of non-tensor leaves, sorted, so the
order in which a ``state_dict()`` lists its entries does not matter, while any renamed,
added, removed, reshaped or re-typed tensor changes the key.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["ShardKey", "state_digest"]

_DIGEST_VERSION = "peer-recovery.shard-digest/v1"


def state_digest(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]],
    other_leaves: Iterable[str] = (),
    layouts: Iterable[tuple[str, Mapping[str, Any]]] = (),
) -> str:
    """Digest of a state's tensor names, dtypes and shapes plus its other leaves' names,
    and the layout of every sharded tensor (a DTensor's mesh, placements, global shape and
    offset, keyed by its name).

    Values never enter the digest: two snapshots of the same model at different steps have
    the same digest; a different model (or a different shard of it) does not. A state
    without sharded tensors has the digest it had before layouts were part of it.
    """
    body: dict[str, Any] = {
        "v": _DIGEST_VERSION,
        "tensors": sorted([name, dtype, list(shape)] for name, dtype, shape in tensors),
        "leaves": sorted(other_leaves),
    }
    laid_out = sorted([name, dict(layout)] for name, layout in layouts)
    if laid_out:
        body["layouts"] = laid_out
    raw = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    return hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True)
class ShardKey:
    """Identity of the shard a rank holds: equal keys mean interchangeable snapshots.

    ``position`` is the rank's coordinate in every parallel dimension except the replicate
    (data-parallel) one, e.g. ``(("pp", 1), ("tp", 0))``; empty for pure data parallelism,
    where every rank holds the whole state.
    """

    world_size: int
    position: tuple[tuple[str, int], ...]
    digest: str

    def __post_init__(self) -> None:
        if not isinstance(self.world_size, int) or self.world_size < 1:
            raise ValueError(
                f"shard key: world_size must be a positive int, got {self.world_size!r}"
            )
        names = [name for name, _ in self.position]
        if len(set(names)) != len(names):
            raise ValueError(f"shard key: position names repeat: {names}")
        for name, index in self.position:
            if not isinstance(name, str) or not isinstance(index, int) or index < 0:
                raise ValueError(
                    f"shard key: position entries must be (str, int >= 0), got {(name, index)!r}"
                )

    @staticmethod
    def make_position(position: Mapping[str, int] | None) -> tuple[tuple[str, int], ...]:
        """Canonical (sorted) position tuple from a mapping such as ``{"tp": 1, "pp": 0}``."""
        return tuple(sorted((position or {}).items()))

    @staticmethod
    def merge_position(
        given: tuple[tuple[str, int], ...], derived: Mapping[str, int]
    ) -> tuple[tuple[str, int], ...]:
        """The position a script gave joined with the one derived from its device meshes;
        a dim named in both must have the same index in both."""
        merged = dict(given)
        for name, index in derived.items():
            if merged.setdefault(name, index) != index:
                raise ValueError(
                    f"shard key: position {name}={merged[name]} was given, but the state's "
                    f"device mesh puts this rank at {name}={index}; leave it out of `position`"
                )
        return tuple(sorted(merged.items()))

    def to_json(self) -> dict[str, Any]:
        return {
            "world_size": self.world_size,
            "position": [[name, index] for name, index in self.position],
            "digest": self.digest,
        }

    @classmethod
    def from_json(cls, raw: object) -> ShardKey:
        if not isinstance(raw, dict) or set(raw) != {"world_size", "position", "digest"}:
            raise ValueError(f"shard key: expected world_size, position, digest; got {raw!r}")
        position = raw["position"]
        if not isinstance(position, list) or not all(
            isinstance(p, list) and len(p) == 2 for p in position
        ):
            raise ValueError(
                f"shard key: position must be a list of [name, index], got {position!r}"
            )
        digest = raw["digest"]
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"shard key: digest must be a 64-character hex string, got {digest!r}")
        return cls(raw["world_size"], tuple((p[0], p[1]) for p in position), digest)

    def mismatch(self, other: ShardKey) -> str | None:
        """Why ``other`` is not the same shard as this one, or ``None`` when it is."""
        if self.world_size != other.world_size:
            return f"world size {other.world_size} != {self.world_size}"
        if self.position != other.position:
            return f"parallel position {dict(other.position)} != {dict(self.position)}"
        if self.digest != other.digest:
            return (
                f"state digest {other.digest[:12]} != {self.digest[:12]} "
                "(tensor names, shapes or dtypes differ)"
            )
        return None
