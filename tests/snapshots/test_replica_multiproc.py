"""Slot replication between real processes over gloo, each rank with its own store directory
(standing for its pod's ``/dev/shm``): bytes land checked, the manifest is committed last,
holders striped and re-planned when one dies or sends damaged bytes, and an interrupted
transfer leaves no snapshot behind.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from tests._multiproc import run_ranks

pytestmark = pytest.mark.multiproc

CHUNK = 64 << 10  # small chunks, so a few hundred KiB of state is many chunks


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    return {f"t{i}": torch.rand(3000 + 17 * i, generator=g) for i in range(64)}


def _holder_store(root: str, rank: int) -> Any:
    """A store holding the test state at step 5 (chunks of ``CHUNK`` bytes)."""
    from peer_recovery.shard_key import ShardKey
    from peer_recovery.snapshots import store as store_mod
    from peer_recovery.snapshots.live import flat_digest
    from peer_recovery.snapshots.tree import flatten

    store_mod.CHUNK_BYTES = CHUNK
    store = store_mod.SnapshotStore(Path(root) / f"rank-{rank}", rank=rank)
    flat = flatten(_state())
    private = flatten({"batches": 3, "seed": torch.tensor([rank])})
    key = ShardKey(1, (), flat_digest(flat))
    return store, store.commit(store.write_data(5, key, flat, private))


class _DiesAfterFirstChunk:
    """The process group, except that the process exits once its first chunk is sent."""

    def __init__(self, pg: Any) -> None:
        self.pg, self.sent = pg, 0

    def send(self, tensors: list[Any], dst: int, tag: int) -> Any:
        from peer_recovery.snapshots.replica import DATA_TAG

        if tag >= DATA_TAG:
            self.sent += 1
            if self.sent == 2:
                os._exit(0)
        return self.pg.send(tensors, dst, tag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pg, name)


def _body(rank: int, world: int, root: str, faults: dict[int, str], refuse: bool) -> Any:
    import torch.distributed as dist

    from peer_recovery.snapshots import replica
    from peer_recovery.snapshots.store import SnapshotStore

    pg = dist.group.WORLD
    receiver = world - 1
    if rank != receiver:
        store, manifest = _holder_store(root, rank)
        fault = faults.get(rank)
        if fault == "damaged":
            data = store.mapped(manifest.slot)[: manifest.data_bytes]
            data[5::CHUNK] += 1  # after its commit: one byte changed in every chunk
        wire = _DiesAfterFirstChunk(pg) if fault == "dies" else pg
        try:
            return {"sent": replica.serve_slot(wire, receiver, store, manifest)}
        except replica.ReplicaError as error:
            return {"error": str(error)}
    store = SnapshotStore(Path(root) / f"rank-{rank}", rank=rank)
    sources = list(range(world - 1))
    try:
        got = replica.receive_slot(pg, sources, store, lambda m: "not this one" if refuse else None)
    except replica.ReplicaError as error:
        return {"error": str(error), "manifests": store.scan()[0]}
    views = store.tensors(got.manifest, got.manifest.replicated)
    expected = list(_state().values())
    return {
        "manifest": got.manifest,
        "equal": all(torch.equal(v, e) for v, e in zip(views, expected, strict=True)),
        "verify": store.verify(got.manifest),
        "scan": store.scan()[0],
        "by_source": got.bytes_by_source,
        "lost": got.lost,
    }


def test_one_holder_replicates_its_slot_and_the_receiver_holds_a_snapshot(tmp_path: Path) -> None:
    holder, receiver = run_ranks(_body, 2, str(tmp_path), {}, False)
    manifest = receiver["manifest"]
    assert receiver["equal"] and receiver["verify"] is None
    assert receiver["scan"] == [manifest]  # committed: a snapshot like any other
    assert (manifest.rank, manifest.step, manifest.private) == (1, 5, None)
    assert receiver["by_source"] == {0: manifest.data_bytes}
    assert holder["sent"] == manifest.data_bytes


def test_two_holders_each_send_part_of_the_slot(tmp_path: Path) -> None:
    *holders, receiver = run_ranks(_body, 3, str(tmp_path), {}, False)
    assert receiver["equal"] and receiver["verify"] is None
    assert set(receiver["by_source"]) == {0, 1}, receiver["lost"]
    assert sum(h["sent"] for h in holders) == receiver["manifest"].data_bytes


def test_a_holder_dying_mid_stream_has_its_chunks_fetched_from_the_other(tmp_path: Path) -> None:
    results = run_ranks(_body, 3, str(tmp_path), {0: "dies"}, False, may_die=[0])
    receiver = results[2]
    assert receiver["equal"] and receiver["verify"] is None
    assert 0 in receiver["lost"]
    assert receiver["by_source"][1] > 0


def test_a_holder_sending_damaged_bytes_is_dropped_for_the_other(tmp_path: Path) -> None:
    *_, receiver = run_ranks(_body, 3, str(tmp_path), {0: "damaged"}, False)
    assert receiver["equal"] and receiver["verify"] is None
    assert "failed its checksum" in receiver["lost"][0]


def test_the_only_holder_dying_mid_stream_leaves_no_snapshot(tmp_path: Path) -> None:
    results = run_ranks(_body, 2, str(tmp_path), {0: "dies"}, False, may_die=[0])
    receiver = results[1]
    assert "0 source(s) left" in receiver["error"]
    assert receiver["manifests"] == []  # no manifest: the partial slot is not a snapshot


def test_a_refused_snapshot_moves_no_bytes(tmp_path: Path) -> None:
    holder, receiver = run_ranks(_body, 2, str(tmp_path), {}, True)
    assert "refused: not this one" in receiver["error"]
    assert receiver["manifests"] == []
    assert holder == {"sent": 0}
