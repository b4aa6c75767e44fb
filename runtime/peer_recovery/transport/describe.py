"""Describing a state dict for the wire, and walking decoded trees: no process-group I/O.

``describe_state`` is the sender's "prepare" step: it turns a state dict into a JSON-able tree
(see :mod:`metadata` for the node format), the list of payload tensors in wire order, and
each payload's key path for error messages. Anything that cannot be described safely is a
MetadataError naming its key path, raised before a single byte is sent.

``index_targets`` flattens the receiver's own state dict into ``{key path: leaf}`` so that
received leaves at the same key path can be written in place; ``map_leaves`` walks a decoded
tree and replaces its tensor placeholders.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from peer_recovery.transport.dist_tensors import describe_dtensor, describe_sharded
from peer_recovery.transport.errors import MetadataError
from peer_recovery.transport.metadata import (
    TensorLeaf,
    TensorSpec,
    dtype_from_name,
    dtype_name,
    dtype_ok,
    encode_scalar,
    keystr,
)
from peer_recovery.transport.torch_compat import ShardedTensor

__all__ = ["Described", "describe_state", "index_targets", "map_leaves"]

_KEY_TYPES = (type(None), bool, int, float, str, bytes)
Path = tuple[Any, ...]


@dataclass
class Described:
    """A state dict prepared for sending."""

    tree: Any = None
    payloads: list[torch.Tensor] = field(default_factory=list)
    specs: list[TensorSpec] = field(default_factory=list)  # one per payload
    paths: list[tuple[Path, str]] = field(default_factory=list)  # key path, shard suffix

    def name(self, index: int) -> str:
        """Key path of payload ``index``, rendered only when an error needs it."""
        path, suffix = self.paths[index]
        return keystr(path) + suffix


_PLAIN = (torch.Tensor, torch.nn.Parameter)
# Dtypes that can be moved as bytes (the quantized ones are not among them).
_DATA_DTYPES: frozenset[torch.dtype] = frozenset(
    d for d in vars(torch).values() if isinstance(d, torch.dtype) and dtype_ok(d)
)


def _spec(t: torch.Tensor, path: Path) -> TensorSpec:
    """The wire description of a payload; the common case costs five attribute reads
    (~0.5 us each from Python, so this is most of describing 10^4 small tensors)."""
    dtype = t.dtype
    if type(t) not in _PLAIN or t.layout is not torch.strided or t.is_meta:
        _check_tensor(t, path)  # raises with the specific reason
    if dtype not in _DATA_DTYPES:
        _check_tensor(t, path)
    return TensorSpec(dtype, t.shape, t.nbytes)


def _check_tensor(t: torch.Tensor, path: Path) -> torch.Tensor:
    if type(t) not in _PLAIN:
        raise MetadataError(
            f"tensor subclass {type(t).__qualname__} is not supported", key_path=keystr(path)
        )
    if t.layout != torch.strided or t.is_quantized or t.device.type == "meta":
        raise MetadataError(
            f"only dense tensors with data can be sent (layout {t.layout}, device {t.device})",
            key_path=keystr(path),
        )
    try:
        dtype_from_name(dtype_name(t.dtype), data=True)
    except MetadataError as exc:
        raise MetadataError(exc.detail, key_path=keystr(path)) from None
    return t


def describe_state(state: Any, max_depth: int = 64) -> Described:
    """Describe ``state`` for the wire (see the module docstring)."""
    out = Described()

    def add(t: torch.Tensor, path: Path, suffix: str = "") -> int:
        out.specs.append(_spec(t, path))
        out.payloads.append(t)
        out.paths.append((path, suffix))
        return len(out.payloads) - 1

    def walk(v: Any, path: Path) -> Any:
        if len(path) > max_depth:
            raise MetadataError(f"nesting deeper than {max_depth}", key_path=keystr(path))
        t = type(v)
        if t is dict or t is OrderedDict:
            keys, values = [], []
            for k, x in v.items():
                where = (*path, k)
                if type(k) is str:  # the common cases without a call: str key, plain tensor
                    keys.append(["s", k])
                elif type(k) in _KEY_TYPES:
                    keys.append(encode_scalar(k, where))
                else:
                    raise MetadataError(
                        f"dict key of type {type(k).__qualname__} cannot be encoded",
                        key_path=keystr(where),
                    )
                plain = type(x) is torch.Tensor and len(where) <= max_depth
                values.append(["T", add(x, where), 0] if plain else walk(x, where))
            return ["d" if t is dict else "o", keys, values]
        if t is list or t is tuple:
            return ["l" if t is list else "t", [walk(x, (*path, i)) for i, x in enumerate(v)]]
        if t is torch.Size:
            return ["z", [encode_scalar(int(x), (*path, i)) for i, x in enumerate(v)]]
        if isinstance(v, DTensor):
            local, spec = describe_dtensor(v, keystr(path))
            return ["D", add(local, path), spec]
        if isinstance(v, ShardedTensor):
            shards, spec = describe_sharded(v, keystr(path))
            return ["S", [add(s, path, f"<shard {j}>") for j, s in enumerate(shards)], spec]
        if isinstance(v, torch.Tensor):
            kind = 0 if t is torch.Tensor else (2 if v.requires_grad else 1)
            return ["T", add(v, path), kind]
        return encode_scalar(v, path)

    out.tree = walk(state, ())
    return out


def index_targets(state: Any) -> dict[Path, Any]:
    """Flatten the receiver's state dict into ``{key path: leaf}`` (containers walked)."""
    found: dict[Path, Any] = {}

    def walk(v: Any, path: Path) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(x, (*path, k))
        elif type(v) in (list, tuple):
            for i, x in enumerate(v):
                walk(x, (*path, i))
        else:
            found[path] = v

    walk(state, ())
    return found


def map_leaves(tree: Any, fn: Callable[[Path, TensorLeaf], Any], path: Path = ()) -> Any:
    """Rebuild a decoded tree with every TensorLeaf replaced by ``fn(path, leaf)``."""
    t = type(tree)
    if t is TensorLeaf:
        return fn(path, tree)
    if t is dict or t is OrderedDict:
        return t((k, map_leaves(v, fn, (*path, k))) for k, v in tree.items())
    if t is list:
        return [map_leaves(v, fn, (*path, i)) for i, v in enumerate(tree)]
    if t is tuple:
        return tuple(map_leaves(v, fn, (*path, i)) for i, v in enumerate(tree))
    return tree
