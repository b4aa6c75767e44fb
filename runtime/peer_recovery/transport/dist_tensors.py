"""Describing and rebuilding DTensor and ShardedTensor leaves, without pickle or collectives.

Sender side: a DTensor becomes its local tensor plus a JSON-able spec (device type, mesh
ranks, dim names, placements from an allowlist, global shape and stride); a ShardedTensor
becomes its local shards plus their shard metadata and the global metadata.

Receiver side (fresh leaves; in-place leaves are simply the receiver's own objects):

- a DTensor is rebuilt on a DeviceMesh made with ``DeviceMesh.from_group`` from the
  receiver's *existing* process groups whose ranks equal the mesh's rows through the
  receiver's coordinate; no process group is created and no collective runs. A receiver
  outside the sender's mesh, or without matching groups, gets a MetadataError naming the
  leaf (receive in place into a DTensor instead).
  The private torch APIs this takes are in :mod:`peer_recovery.transport.torch_compat`.
- a ShardedTensor takes over the sender's role: in the global metadata the sender's rank and
  the receiver's rank are swapped, and local shards are placed on the receiver.
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from peer_recovery.transport.errors import MetadataError
from peer_recovery.transport.metadata import dtype_from_name, dtype_name
from peer_recovery.transport.torch_compat import (
    ShardedTensor,
    ShardedTensorMetadata,
    ShardMetadata,
    StShard,
    TensorProperties,
    dtensor_from_spec,
    group_with_ranks,
    local_tensor,
    mesh_from_groups,
    sharded_from_metadata,
)

__all__ = ["describe_dtensor", "describe_sharded", "rebuild_dtensor", "rebuild_sharded"]

_REDUCE_OPS = frozenset({"sum", "avg", "max", "min", "product"})
_DEVICE_TYPE = re.compile(r"^[a-z]{1,16}$")
_PLACEMENT = re.compile(r"^rank:(\d{1,9})/([a-z]{1,16}(?::\d{1,4})?)$")
_MEMORY_FORMATS = {
    "contiguous_format": torch.contiguous_format,
    "channels_last": torch.channels_last,
    "preserve_format": torch.preserve_format,
}


def _encode_placement(p: object, where: str) -> list[Any]:
    if type(p) is Shard:
        return ["shard", p.dim]
    if type(p) is Replicate:
        return ["replicate"]
    if type(p) is Partial and p.reduce_op in _REDUCE_OPS:
        return ["partial", p.reduce_op]
    raise MetadataError(f"DTensor placement {p!r} is not in the allowlist", key_path=where)


def _decode_placement(raw: object, where: str, ndim: int) -> Any:
    if type(raw) is list and raw == ["replicate"]:
        return Replicate()
    if type(raw) is list and len(raw) == 2:
        kind, arg = raw
        if kind == "shard" and type(arg) is int and 0 <= arg < max(ndim, 1):
            return Shard(arg)
        if kind == "partial" and arg in _REDUCE_OPS:
            return Partial(arg)
    raise MetadataError(f"DTensor placement {raw!r:.60} is not in the allowlist", key_path=where)


def describe_dtensor(value: DTensor, where: str) -> tuple[torch.Tensor, dict[str, Any]]:
    """Return the local tensor and the JSON-able description of a DTensor."""
    mesh = value.device_mesh
    spec = {
        "device_type": mesh.device_type,
        "mesh": mesh.mesh.tolist(),
        "dim_names": list(mesh.mesh_dim_names) if mesh.mesh_dim_names else None,
        "placements": [_encode_placement(p, where) for p in value.placements],
        "shape": list(value.shape),
        "stride": list(value.stride()),
        "requires_grad": value.requires_grad,
    }
    return local_tensor(value), spec


def _ints(raw: object, what: str, where: str) -> list[int]:
    if type(raw) is not list or len(raw) > 64 or not all(type(i) is int and i >= 0 for i in raw):
        raise MetadataError(f"{what} must be a short list of non-negative ints", key_path=where)
    return raw


def rebuild_dtensor(local: torch.Tensor, spec: dict[str, Any], where: str) -> DTensor:
    """Wrap a received local tensor as a DTensor on the receiver's existing groups."""
    device_type = spec.get("device_type")
    if type(device_type) is not str or not _DEVICE_TYPE.match(device_type):
        raise MetadataError(f"bad DTensor device type {device_type!r:.40}", key_path=where)
    try:
        mesh = torch.tensor(spec.get("mesh"), dtype=torch.int64)
    except (TypeError, ValueError, RuntimeError):
        raise MetadataError(
            "DTensor mesh is not a rectangular array of ranks", key_path=where
        ) from None
    if mesh.numel() == 0 or mesh.numel() > 1 << 20 or mesh.ndim > 8:
        raise MetadataError("DTensor mesh has a bad size", key_path=where)
    names = spec.get("dim_names")
    if names is not None and (
        type(names) is not list
        or len(names) != mesh.ndim
        or not all(type(n) is str and len(n) < 256 for n in names)
    ):
        raise MetadataError("DTensor mesh dim names are malformed", key_path=where)
    shape = _ints(spec.get("shape"), "DTensor shape", where)
    stride = _ints(spec.get("stride"), "DTensor stride", where)
    raw_placements = spec.get("placements")
    if type(raw_placements) is not list or len(raw_placements) != mesh.ndim:
        raise MetadataError("DTensor placements do not match the mesh", key_path=where)
    placements = tuple(_decode_placement(p, where, len(shape)) for p in raw_placements)
    rank = dist.get_rank()
    coord = (mesh == rank).nonzero()
    if coord.shape[0] != 1:
        raise MetadataError(
            f"receiver rank {rank} is not in the sender's mesh {mesh.tolist()}; "
            "receive in place into an existing DTensor instead",
            key_path=where,
        )
    groups = []
    for dim in range(mesh.ndim):
        index = list(coord[0])
        index[dim] = slice(None)
        ranks = mesh[tuple(index)].tolist()
        group = group_with_ranks(ranks)
        if group is None:
            raise MetadataError(
                f"no existing process group with ranks {ranks} for mesh dim {dim}; "
                "create the mesh first or receive in place",
                key_path=where,
            )
        groups.append(group)
    device_mesh = mesh_from_groups(groups, device_type, mesh, tuple(names) if names else None)
    return dtensor_from_spec(
        local, device_mesh, placements, shape, stride,
        requires_grad=spec.get("requires_grad") is True,
    )  # fmt: skip


def _shard_meta(m: ShardMetadata) -> list[Any]:
    return [list(m.shard_offsets), list(m.shard_sizes), str(m.placement) if m.placement else None]


def describe_sharded(value: ShardedTensor, where: str) -> tuple[list[torch.Tensor], dict[str, Any]]:
    """Return the local shard tensors and the JSON-able description of a ShardedTensor."""
    md = value.metadata()
    props = md.tensor_properties
    fmt = next((k for k, v in _MEMORY_FORMATS.items() if v == props.memory_format), None)
    if props.layout != torch.strided or fmt is None:
        raise MetadataError("ShardedTensor layout or memory format is unsupported", key_path=where)
    shards = value.local_shards()
    spec = {
        "rank": dist.get_rank(),
        "local": [_shard_meta(s.metadata) for s in shards],
        "global": [_shard_meta(m) for m in md.shards_metadata],
        "size": list(md.size),
        "dtype": dtype_name(props.dtype),
        "requires_grad": props.requires_grad,
        "memory_format": fmt,
    }
    return [s.tensor for s in shards], spec


def _decode_shard_meta(raw: object, where: str, swap: dict[int, int]) -> ShardMetadata:
    if type(raw) is not list or len(raw) != 3:
        raise MetadataError("malformed ShardedTensor shard metadata", key_path=where)
    offsets = _ints(raw[0], "shard offsets", where)
    sizes = _ints(raw[1], "shard sizes", where)
    placement = raw[2]
    if placement is not None:
        match = _PLACEMENT.match(placement) if type(placement) is str else None
        if match is None:
            raise MetadataError(f"bad shard placement {placement!r:.60}", key_path=where)
        rank = int(match.group(1))
        placement = f"rank:{swap.get(rank, rank)}/{match.group(2)}"
    return ShardMetadata(shard_offsets=offsets, shard_sizes=sizes, placement=placement)


def rebuild_sharded(locals_: list[torch.Tensor], spec: dict[str, Any], where: str) -> ShardedTensor:
    """Rebuild a ShardedTensor on the receiver, which takes over the sender's shards."""
    sender = spec.get("rank")
    if type(sender) is not int or sender < 0:
        raise MetadataError("ShardedTensor spec lacks the sender rank", key_path=where)
    me = dist.get_rank()
    swap = {sender: me, me: sender}
    local_raw, global_raw = spec.get("local"), spec.get("global")
    if type(local_raw) is not list or len(local_raw) != len(locals_):
        raise MetadataError("ShardedTensor local shards do not match payloads", key_path=where)
    if type(global_raw) is not list or not global_raw or len(global_raw) > 1 << 16:
        raise MetadataError("ShardedTensor global metadata is malformed", key_path=where)
    fmt = _MEMORY_FORMATS.get(spec.get("memory_format"))  # type: ignore[arg-type]
    if fmt is None:
        raise MetadataError("ShardedTensor memory format is not allowed", key_path=where)
    props = TensorProperties(
        dtype=dtype_from_name(spec.get("dtype"), data=True),
        layout=torch.strided,
        requires_grad=spec.get("requires_grad") is True,
        memory_format=fmt,
        pin_memory=bool(locals_) and locals_[0].is_pinned(),
    )
    shards = []
    for tensor, raw in zip(locals_, local_raw, strict=True):
        m = _decode_shard_meta(raw, where, {})
        m = ShardMetadata(m.shard_offsets, m.shard_sizes, f"rank:{me}/{tensor.device}")
        shards.append(StShard(tensor.requires_grad_(props.requires_grad), m))
    md = ShardedTensorMetadata(
        shards_metadata=[_decode_shard_meta(r, where, swap) for r in global_raw],
        size=torch.Size(_ints(spec.get("size"), "ShardedTensor size", where)),
        tensor_properties=props,
    )
    try:
        return sharded_from_metadata(shards, md)
    except (ValueError, RuntimeError, AssertionError) as exc:
        raise MetadataError(
            f"ShardedTensor metadata is inconsistent: {exc}", key_path=where
        ) from None
