"""Flattening a state into tensors plus a JSON skeleton, and back; no pickle anywhere.

A ``state_dict()`` is a tree of dicts, lists and tuples whose leaves are tensors and small
Python values (step counters, learning rates, scheduler fields). ``flatten`` splits it into
the list of tensors (their bytes go into the slot file) and a JSON-able skeleton in which
every node carries a type tag, so that ``unflatten`` rebuilds the same container types and
scalar types without executing anything read from disk. Anything outside the supported
types is refused with the path where it was found.

Node encodings (each a JSON list whose first item is the tag):
``["tensor", i]``, ``["ndarray", i]`` (a numpy array, stored as tensor ``i``),
``["dtensor", i, layout]`` (a DTensor, stored as its local shard, tensor ``i``), ``["none"]``,
``["bool", b]``, ``["int", n]``, ``["float", float.hex]``, ``["str", s]``, ``["bytes", b64]``,
``["list", [...]]``, ``["tuple", [...]]``, ``["dict", [[key, node], ...]]`` and
``["odict", [[key, node], ...], metadata]`` for an ``OrderedDict`` (``metadata`` is the
``_metadata`` attribute ``nn.Module.load_state_dict`` reads, or ``None``). Keys are scalar
nodes. Paths name a leaf as the tuple of its keys, with keys tagged so ``0`` and ``"0"``
stay distinct.

A DTensor (FSDP2, tensor parallelism) is stored as its local shard; its ``layout`` records
where that shard sits: the mesh's shape and dim names, the placements, the global shape and
the shard's offset in it. The layout enters the shard key's digest, and the rank's
coordinate in every mesh dim the state is sharded on (not replicated) becomes the key's
position (``Flat.position``), so two ranks holding different shards of the same shapes
never share a key. Rebuilding a state around live DTensors takes the live leaves
(``Flat.leaves``): ``unflatten`` returns whatever tensor-like it is given for a node.
"""

from __future__ import annotations

import base64
import functools
import json
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Flat", "FlattenError", "flatten", "path_name", "unflatten"]

try:  # torch builds without distributed have no DTensor
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
except ImportError:  # pragma: no cover
    DTensor = None  # type: ignore[assignment,misc]

Path = tuple[Any, ...]
_MAX_DEPTH = 64


class FlattenError(ValueError):
    """A state holds something that cannot be stored safely; the message names where."""


@dataclass
class Flat:
    """A flattened state: its skeleton, its tensors, and every leaf's path.

    ``tensors`` are plain (a DTensor's local shard); ``leaves`` are the tensor-likes as
    found (the DTensor itself); ``layouts`` maps a DTensor's tensor index to its layout;
    ``position`` is the rank's coordinate in every mesh dim some DTensor is sharded on.
    """

    tree: list[Any]
    tensors: list[torch.Tensor]
    tensor_paths: list[Path]
    other_paths: list[Path]
    leaves: list[torch.Tensor] = field(default_factory=list)
    layouts: dict[int, dict[str, Any]] = field(default_factory=dict)
    position: dict[str, int] = field(default_factory=dict)

    @functools.cached_property
    def tensor_names(self) -> list[str]:
        """``path_name`` of every tensor path, computed once (digests and checks reuse it)."""
        return [path_name(p) for p in self.tensor_paths]


def path_name(path: Path) -> str:
    """Human- and digest-friendly name of a path, e.g. ``model/"fc.weight"`` -> JSON text.

    Paths of plain strings and ints (nearly all) are joined directly: the same text as
    ``json.dumps(list(path), separators=(",", ":"))``, which the others go through, without
    building an encoder per path (a state has tens of thousands of them)."""
    parts = []
    for element in path:
        kind = type(element)
        if kind is str:
            parts.append(_quote(element))
        elif kind is int:
            parts.append(str(element))
        else:
            return json.dumps(list(path), separators=(",", ":"))
    return "[" + ",".join(parts) + "]"


_quote = json.encoder.encode_basestring_ascii  # what json.dumps uses for a str (ensure_ascii)


def _scalar(value: object, path: Path) -> list[Any]:
    if value is None:
        return ["none"]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", int(value)]
    if isinstance(value, float):
        return ["float", float(value).hex()]
    if isinstance(value, str):
        return ["str", value]
    if isinstance(value, bytes):
        return ["bytes", base64.b64encode(value).decode("ascii")]
    raise FlattenError(
        f"cannot snapshot {path_name(path)}: unsupported type {type(value).__qualname__} "
        "(supported: tensors, numpy arrays, dict/list/tuple, None, bool, int, float, str, bytes)"
    )


def _path_element(key: object, key_node: list[Any]) -> Any:
    """A plain str/int key names itself; other keys are named by their tagged node."""
    return key if type(key) in (str, int) else key_node


def _decode_scalar(node: list[Any]) -> object:
    tag = node[0]
    if tag == "none":
        return None
    if tag in ("bool", "int", "str"):
        expected = {"bool": bool, "int": int, "str": str}[tag]
        value = node[1]
        if not isinstance(value, expected) or (tag == "int" and isinstance(value, bool)):
            raise ValueError(f"snapshot skeleton: {tag} node holds {value!r}")
        return value
    if tag == "float":
        return float.fromhex(node[1])
    if tag == "bytes":
        return base64.b64decode(node[1], validate=True)
    raise ValueError(f"snapshot skeleton: unknown scalar tag {tag!r}")


def _placement(p: object) -> list[Any]:
    """A placement as JSON: shard, replicate, partial; any other kind by its repr."""
    if type(p) is Shard:
        return ["shard", p.dim]
    if type(p) is Replicate:
        return ["replicate"]
    if type(p) is Partial:
        return ["partial", str(p.reduce_op)]
    return [type(p).__name__, repr(p)]


def _dtensor_layout(value: Any, path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """A DTensor's layout (see the module docstring) and this rank's coordinate in every
    mesh dim it is sharded on."""
    mesh = value.device_mesh
    coordinate = mesh.get_coordinate()
    if coordinate is None:
        raise FlattenError(f"cannot snapshot {path_name(path)}: this rank is not in its mesh")
    names = list(mesh.mesh_dim_names or [f"mesh_dim{i}" for i in range(mesh.ndim)])
    _, offset = compute_local_shape_and_global_offset(value.shape, mesh, value.placements)
    layout = {
        "mesh": list(mesh.shape),
        "dims": names,
        "placements": [_placement(p) for p in value.placements],
        "shape": list(value.shape),
        "offset": [int(o) for o in offset],
    }
    sharded = {
        names[i]: int(coordinate[i])
        for i, p in enumerate(value.placements)
        if type(p) is not Replicate
    }
    return layout, sharded


def flatten(state: object) -> Flat:
    """Split ``state`` into tensors and a tagged skeleton (see the module docstring)."""
    flat = Flat(tree=[], tensors=[], tensor_paths=[], other_paths=[])

    def add_dtensor(value: Any, path: Path) -> list[Any]:
        layout, sharded = _dtensor_layout(value, path)
        for name, index in sharded.items():
            if flat.position.setdefault(name, index) != index:
                raise FlattenError(
                    f"cannot snapshot {path_name(path)}: its mesh dim {name!r} puts this rank "
                    f"at {index}, another DTensor's at {flat.position[name]}; give the meshes "
                    "distinct mesh_dim_names"
                )
        index = add_tensor(value.to_local(), path, value)
        flat.layouts[index] = layout
        return ["dtensor", index, layout]

    def add_tensor(tensor: torch.Tensor, path: Path, leaf: torch.Tensor | None = None) -> int:
        if tensor.layout != torch.strided or tensor.is_quantized or tensor.is_nested:
            raise FlattenError(
                f"cannot snapshot {path_name(path)}: only dense strided tensors are supported, "
                f"got layout {tensor.layout}"
            )
        if type(tensor) not in (torch.Tensor, torch.nn.Parameter):
            raise FlattenError(
                f"cannot snapshot {path_name(path)}: tensor subclass {type(tensor).__qualname__} "
                "(supported: plain tensors, parameters and DTensors)"
            )
        # A tensor outside autograd is already what detach() would return (minus a new
        # Python object per tensor, which adds up over tens of thousands of them).
        plain = type(tensor) is torch.Tensor and not tensor.requires_grad
        flat.tensors.append(tensor if plain else tensor.detach())
        flat.leaves.append(tensor if leaf is None else leaf)
        flat.tensor_paths.append(path)
        return len(flat.tensors) - 1

    def walk(value: object, path: Path, depth: int) -> list[Any]:
        if depth > _MAX_DEPTH:
            raise FlattenError(
                f"cannot snapshot {path_name(path)}: nested deeper than {_MAX_DEPTH}"
            )
        if DTensor is not None and isinstance(value, DTensor):
            return add_dtensor(value, path)
        if isinstance(value, torch.Tensor):
            return ["tensor", add_tensor(value, path)]
        if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
            return ["ndarray", add_tensor(torch.from_numpy(value), path)]  # type: ignore[arg-type]
        if isinstance(value, dict):
            items = []
            for key, child in value.items():
                key_node = _scalar(key, path)
                child_path = (*path, _path_element(key, key_node))
                items.append([key_node, walk(child, child_path, depth + 1)])
            if isinstance(value, OrderedDict):
                meta = getattr(value, "_metadata", None)
                meta_node = None if meta is None else walk(meta, (*path, "#meta"), depth + 1)
                return ["odict", items, meta_node]
            return ["dict", items]
        if isinstance(value, (list, tuple)):
            tag = "tuple" if isinstance(value, tuple) else "list"
            return [tag, [walk(child, (*path, i), depth + 1) for i, child in enumerate(value)]]
        node = _scalar(value, path)
        flat.other_paths.append(path)
        return node

    flat.tree = walk(state, (), 0)
    return flat


def unflatten(tree: object, tensors: Sequence[torch.Tensor]) -> Any:
    """Rebuild the state from a skeleton (untrusted: read from disk) and its tensors.

    A ``dtensor`` node becomes ``tensors[i]`` as given: the stored local shard, or the live
    DTensor when the caller passes ``Flat.leaves``.
    """

    def build(node: object, depth: int) -> Any:
        if depth > _MAX_DEPTH or not isinstance(node, list) or not node:
            raise ValueError(f"snapshot skeleton: malformed node {node!r:.80}")
        tag = node[0]
        if tag in ("tensor", "ndarray", "dtensor"):
            index = node[1]
            if tag == "dtensor" and (len(node) != 3 or not isinstance(node[2], dict)):
                raise ValueError(f"snapshot skeleton: malformed dtensor node {node!r:.80}")
            if not isinstance(index, int) or not 0 <= index < len(tensors):
                raise ValueError(f"snapshot skeleton: tensor index {index!r} out of range")
            return tensors[index].numpy() if tag == "ndarray" else tensors[index]
        if tag in ("list", "tuple"):
            children = [build(child, depth + 1) for child in node[1]]
            return tuple(children) if tag == "tuple" else children
        if tag in ("dict", "odict"):
            out: dict[Any, Any] = OrderedDict() if tag == "odict" else {}
            for key_node, child in node[1]:
                out[_decode_scalar(key_node)] = build(child, depth + 1)
            if tag == "odict" and node[2] is not None:
                out._metadata = build(node[2], depth + 1)  # type: ignore[attr-defined]
            return out
        return _decode_scalar(node)

    return build(tree, 0)
