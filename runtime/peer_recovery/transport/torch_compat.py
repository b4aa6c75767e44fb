"""Every private torch API the transport relies on, in one place.

torch offers no public way to do what the transport needs here: rebuild a DTensor from a
local tensor and a spec without a collective, rebuild a ShardedTensor from local shards and
known global metadata without one, reach a DTensor's local tensor without autograd, find an
existing process group by its ranks, and wrap existing groups in a DeviceMesh. These change
between torch releases, so they are named only here; ``tests/transport/test_torch_compat.py``
checks each against the torch installed, and runs under both ends of the supported range
(the ``runtime`` extra's ``torch>=...,<...``): the newest with ``make test``, the oldest
with ``make test-compat``.

Differences seen across the range so far: ``DeviceMesh.get_coordinate()`` returns a list up
to torch 2.9 and a tuple from 2.15 (:func:`mesh_coordinate` gives a tuple on both).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch.distributed._shard.sharded_tensor import Shard as StShard
from torch.distributed._shard.sharded_tensor import ShardedTensor, ShardMetadata
from torch.distributed._shard.sharded_tensor.metadata import (
    ShardedTensorMetadata,
    TensorProperties,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._dtensor_spec import DTensorSpec, TensorMeta
from torch.distributed.tensor.placement_types import Placement

__all__ = [
    "ShardMetadata",
    "ShardedTensor",
    "ShardedTensorMetadata",
    "StShard",
    "TensorProperties",
    "dtensor_from_spec",
    "group_with_ranks",
    "local_tensor",
    "mesh_coordinate",
    "mesh_from_groups",
    "sharded_from_metadata",
]


def local_tensor(value: DTensor) -> torch.Tensor:
    """The DTensor's own local tensor (not ``to_local()``'s autograd view): receiving in
    place must write into the storage the DTensor already holds."""
    return value._local_tensor


def dtensor_from_spec(
    local: torch.Tensor,
    mesh: DeviceMesh,
    placements: tuple[Placement, ...],
    shape: Sequence[int],
    stride: Sequence[int],
    *,
    requires_grad: bool,
) -> DTensor:
    """A DTensor around ``local`` with the given global shape and stride, and no collective
    (``DTensor.from_local`` with a shape runs none either, but cannot take the stride)."""
    meta = TensorMeta(torch.Size(shape), tuple(stride), local.dtype)
    return DTensor(local, DTensorSpec(mesh, placements, tensor_meta=meta),
                   requires_grad=requires_grad)  # fmt: skip


def group_with_ranks(ranks: list[int]) -> dist.ProcessGroup | None:
    """An existing process group whose ranks, in group-rank order, are exactly ``ranks``
    (torch lists its groups only in a private registry)."""
    for pg, mapping in dist.distributed_c10d._world.pg_group_ranks.items():
        if sorted(mapping, key=mapping.__getitem__) == ranks:
            return pg
    return None


def mesh_from_groups(
    groups: list[dist.ProcessGroup],
    device_type: str,
    mesh: torch.Tensor,
    dim_names: tuple[str, ...] | None,
) -> DeviceMesh:
    """A DeviceMesh over existing groups, one per mesh dimension (no group is created)."""
    return DeviceMesh.from_group(
        groups[0] if mesh.ndim == 1 else groups, device_type, mesh=mesh,
        mesh_dim_names=dim_names,
    )  # fmt: skip


def mesh_coordinate(mesh: DeviceMesh) -> tuple[int, ...] | None:
    """This rank's coordinate in ``mesh`` as a tuple, on every supported torch."""
    coordinate = mesh.get_coordinate()
    return None if coordinate is None else tuple(coordinate)


def sharded_from_metadata(shards: list[StShard], metadata: ShardedTensorMetadata) -> ShardedTensor:
    """A ShardedTensor from this rank's shards and the known global metadata, without the
    all-gather ``init_from_local_shards`` runs to learn it."""
    return ShardedTensor._init_from_local_shards_and_global_metadata(shards, metadata)
