"""This pod's snapshot holdings, read in the agent from the snapshot store's manifests.

The agent reads only manifests (``slot-<n>.json`` anywhere under the pod's snapshot
directory, ``$PEER_RECOVERY_SNAPSHOT_DIR``), never slot data: the checksums are verified by
the worker that restores the slot. A damaged or unreadable manifest is skipped with a log
line, so it is never published. Torch-free.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path

from peer_recovery.protocol.records import Holding, canonical_key
from peer_recovery.snapshots.manifest import Manifest, ManifestError
from peer_recovery.snapshots.settings import DEFAULT_ROOT, ENV_DIR

__all__ = ["holdings_in", "manifest_reader"]

log = logging.getLogger(__name__)


def holdings_in(root: Path) -> list[Holding]:
    """Every readable snapshot under ``root``."""
    found: list[Holding] = []
    for path in sorted(root.rglob("slot-*.json")) if root.is_dir() else []:
        try:
            manifest = Manifest.decode(path.read_bytes())
            data = path.with_suffix(".data")
            if data.stat().st_size < manifest.data_bytes:
                raise ManifestError(f"data file {data.name} is shorter than the manifest says")
        except (ManifestError, OSError) as error:
            log.warning("peer-recovery: not publishing %s: %s", path, error)
            continue
        found.append(
            Holding(
                rank=manifest.rank,
                step=manifest.step,
                shard_key=canonical_key(manifest.shard_key.to_json()),
                nbytes=manifest.replicated.nbytes,
                job=manifest.job,
                lineage=manifest.lineage,
                checksum=manifest.content,
            )
        )
    return found


def manifest_reader(env: Mapping[str, str]) -> Callable[[], list[Holding]]:
    root = Path(env.get(ENV_DIR) or DEFAULT_ROOT)
    return lambda: holdings_in(root)
