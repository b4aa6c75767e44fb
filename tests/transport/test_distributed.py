"""Several destinations, DTensor and ShardedTensor, between 4 and 8 real processes."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import Shard as StShard
from torch.distributed._shard.sharded_tensor import (
    ShardedTensor,
    ShardMetadata,
    init_from_local_shards,
)
from torch.distributed.checkpoint._pg_transport import PGTransport as UpstreamTransport
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

from peer_recovery.transport import MetadataError, PGTransport
from peer_recovery.transport.torch_compat import mesh_coordinate
from tests._multiproc import run_ranks
from tests.transport._cases import assert_same, optimizer_state, tensor_bytes

pytestmark = pytest.mark.multiproc

TIMEOUT = timedelta(seconds=60)
CPU = torch.device("cpu")


def _dtensors(rank: int, world: int) -> list[str]:
    """4 ranks on a 2x2 mesh; rank 0 sends its DTensors to rank 3 (fresh) and 1 (in place)."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    full = torch.randn(8, 6)
    state = {
        "sharded": distribute_tensor(full, mesh, [Replicate(), Shard(0)]),
        "col": distribute_tensor(full, mesh, [Shard(1), Shard(0)]),
        "partial": DTensor.from_local(
            torch.full((2, 3), float(rank)), mesh, [Partial(), Replicate()], run_check=False
        ),
        "opt": {"exp_avg": distribute_tensor(full * 2, mesh, [Replicate(), Replicate()])},
    }
    pg = dist.group.WORLD
    done = []
    if rank == 0:
        PGTransport(pg, TIMEOUT, CPU).send_checkpoint([1, 3], state, step=2)
        UpstreamTransport(pg, TIMEOUT, CPU).send_checkpoint([3], state)
    elif rank == 3:
        got = PGTransport(pg, TIMEOUT, CPU).recv_checkpoint(0, step=2)
        theirs = UpstreamTransport(pg, TIMEOUT, CPU).recv_checkpoint(0)
        for key in ("sharded", "col", "partial"):
            ours, up = got[key], theirs[key]
            assert type(ours) is DTensor
            assert ours.placements == up.placements == state[key].placements
            assert ours.shape == up.shape == state[key].shape
            assert ours.device_mesh.mesh.tolist() == up.device_mesh.mesh.tolist()
            assert ours.device_mesh.mesh_dim_names == ("dp", "tp")
            assert tensor_bytes(ours.to_local()) == tensor_bytes(up.to_local())
            # rebuilt on this rank's own groups: its coordinate is its own, not the sender's
            # (a list up to torch 2.9, a tuple from 2.15: compared as tuples)
            assert mesh_coordinate(ours.device_mesh) == mesh_coordinate(mesh) == (1, 1)
            assert ours.device_mesh.get_local_rank("tp") == 1
        assert tensor_bytes(got["opt"]["exp_avg"].to_local()) == tensor_bytes(full * 2)
        # the rebuilt DTensor is usable: a collective over its mesh works
        assert torch.equal(got["opt"]["exp_avg"].full_tensor(), full * 2)
        done.append("fresh")
    if rank == 1:
        targets = {
            k: DTensor.from_local(torch.zeros_like(v.to_local()), mesh, v.placements)
            if isinstance(v, DTensor)
            else v
            for k, v in state.items()
            if k != "opt"
        }
        ptrs = {k: v.to_local().data_ptr() for k, v in targets.items()}
        got = PGTransport(pg, TIMEOUT, CPU, lambda: targets).recv_checkpoint(0, step=2)
        for key, ptr in ptrs.items():
            assert got[key] is targets[key] and got[key].to_local().data_ptr() == ptr
        # rank 1 received rank 0's local shards (a peer holding the same shard would match)
        assert tensor_bytes(got["partial"].to_local()) == tensor_bytes(torch.zeros(2, 3))
        assert tensor_bytes(got["sharded"].to_local()) == tensor_bytes(full[:4])
        done.append("in place")
    dist.barrier()
    return done


def _sharded(rank: int, world: int) -> list[str]:
    """4 ranks hold row shards of an 8x4 tensor; rank 2 streams its shard to rank 0."""
    local = torch.full((2, 4), float(rank))
    meta = ShardMetadata([2 * rank, 0], [2, 4], f"rank:{rank}/cpu")
    st = init_from_local_shards([StShard(local, meta)], [8, 4])
    pg = dist.group.WORLD
    done = []
    if rank == 2:
        PGTransport(pg, TIMEOUT, CPU).send_checkpoint([0, 1], {"emb": st, "n": 1})
    elif rank == 0:
        got = PGTransport(pg, TIMEOUT, CPU).recv_checkpoint(2)["emb"]
        assert type(got) is ShardedTensor and got.size() == torch.Size([8, 4])
        (shard,) = got.local_shards()
        assert tensor_bytes(shard.tensor) == tensor_bytes(torch.full((2, 4), 2.0))
        # rank 0 took over rank 2's shard (rows 4-5); rank 2 is listed with rank 0's old rows
        assert shard.metadata.shard_offsets == [4, 0]
        assert str(shard.metadata.placement) == "rank:0/cpu"
        by_rank = {m.placement.rank(): m.shard_offsets for m in got.metadata().shards_metadata}
        assert by_rank == {0: [4, 0], 1: [2, 0], 2: [0, 0], 3: [6, 0]}
        done.append("fresh")
    elif rank == 1:
        ptr = local.data_ptr()
        got = PGTransport(pg, TIMEOUT, CPU, lambda: {"emb": st}).recv_checkpoint(2)["emb"]
        assert got is st and got.local_shards()[0].tensor.data_ptr() == ptr
        assert tensor_bytes(local) == tensor_bytes(torch.full((2, 4), 2.0))
        done.append("in place")
    dist.barrier()
    return done


def _both(rank: int, world: int) -> tuple[list[str], list[str]]:
    return _dtensors(rank, world), _sharded(rank, world)


def test_dtensor_and_sharded_tensor_fresh_and_in_place() -> None:
    """One 4-rank spawn for both (spawning is the slow part)."""
    dtensor, sharded = zip(*run_ranks(_both, 4, timeout=180), strict=True)
    assert list(dtensor) == [[], ["in place"], [], ["fresh"]]  # fresh results match upstream's
    assert list(sharded) == [["fresh"], ["in place"], [], []]


def _broadcast(rank: int, world: int) -> Any:
    """Rank 0 streams an optimizer state to 7 ranks at once; each compares exactly."""
    pg = dist.group.WORLD
    state = optimizer_state()
    if rank == 0:
        transport = PGTransport(pg, TIMEOUT, CPU, bucket_bytes=1024, small_bytes=256)
        transport.send_checkpoint(list(range(1, world)), state, step=9)
        return transport.stats.payload_bytes * (world - 1) < transport.stats.bytes
    got = PGTransport(pg, TIMEOUT, CPU).recv_checkpoint(0, step=9)
    assert_same(got, state)
    return True


def test_one_sender_to_seven_destinations() -> None:
    assert run_ranks(_broadcast, 8, timeout=240) == [True] * 8


def _outside_mesh(rank: int, world: int) -> str:
    """A fresh DTensor whose sender mesh lacks the receiver is refused naming the leaf."""
    sub = dist.new_group([0, 1])
    pg = dist.group.WORLD
    if rank in (0, 1):
        from torch.distributed.device_mesh import DeviceMesh

        mesh = DeviceMesh.from_group(sub, "cpu")
        d = DTensor.from_local(torch.ones(4), mesh, [Replicate()], run_check=False)
        if rank == 0:
            try:
                PGTransport(pg, TIMEOUT, CPU).send_checkpoint([2], {"layer": {"w": d}})
            except MetadataError as exc:
                return f"sender: {exc.peer}"
        return "idle"
    try:
        PGTransport(pg, TIMEOUT, CPU).recv_checkpoint(0)
    except MetadataError as exc:
        assert "not in the sender's mesh" in str(exc)
        return exc.key_path or ""
    return "no error"


def test_dtensor_outside_the_senders_mesh_is_refused() -> None:
    assert run_ranks(_outside_mesh, 3, timeout=120) == ["sender: 2", "idle", "['layer']['w']"]
