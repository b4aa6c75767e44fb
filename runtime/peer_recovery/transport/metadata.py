"""The wire format of a transfer's metadata: pure encoding and decoding, no I/O, no pickle.

A transfer starts with a fixed-size header (:mod:`header`), followed by the metadata: UTF-8
JSON in which every value carries an explicit type tag. Decoding never runs code and never
allocates more than the metadata itself: every announced size is checked against
:class:`Limits` before anyone allocates a tensor. The document is::

    {"v": 2, "bucket": <bytes>, "chunk": <bytes>, "small": <bytes>,
     "dtypes": [<dtype name>, ...],
     "tensors": [<dtype index>, <ndim>, <dim>, ..., <dtype index>, <ndim>, ...],  # wire order
     "tree": <node>}

Nodes are JSON arrays whose first element is a tag:

- containers: ``["d", keys, values]`` dict, ``["o", keys, values]`` OrderedDict,
  ``["l", items]`` list, ``["t", items]`` tuple, ``["z", ints]`` torch.Size;
  dict keys are scalar nodes;
- scalars: ``["n"]`` None, ``["b", bool]``, ``["i", int]``, ``["f", float.hex()]``,
  ``["s", str]``, ``["y", base64]`` bytes, ``["dt", name]`` torch.dtype,
  ``["dev", str]`` torch.device;
- tensors (payload travels separately, in wire order): ``["T", index, kind]`` with kind 0
  plain tensor, 1 ``nn.Parameter``, 2 ``nn.Parameter`` that requires grad;
  ``["D", index, spec]`` DTensor and ``["S", [index, ...], spec]`` ShardedTensor, whose specs
  are validated by :mod:`peer_recovery.transport.dist_tensors`.

Invariant: ``decode_metadata(encode_metadata(x))`` rebuilds every container and scalar
exactly (floats bit-exactly through ``float.hex``, including inf, nan and -0.0).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch

from peer_recovery.transport.errors import IntegrityError, MetadataError
from peer_recovery.transport.header import FORMAT_VERSION, Header, Limits, metadata_crc

__all__ = [
    "Metadata",
    "TensorLeaf",
    "TensorSpec",
    "decode_metadata",
    "dtype_from_name",
    "dtype_name",
    "dtype_ok",
    "encode_metadata",
    "encode_scalar",
    "keystr",
]

# Every torch dtype by its canonical name; a dtype *leaf* may be any of them.
_ALL_DTYPES: dict[str, torch.dtype] = {
    str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, torch.dtype)
}
# Dtypes whose tensors may be moved as bytes: whole bytes per element, not quantized.
_DATA_DTYPES: frozenset[str] = frozenset(
    name
    for name in _ALL_DTYPES
    if not name.startswith(("q", "bits"))
    and name not in {f"{s}int{n}" for s in ("", "u") for n in range(1, 8)}
)


class TensorSpec(NamedTuple):
    """One contiguous tensor payload on the wire (a NamedTuple: cheap for 10^5 tensors)."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int


class TensorLeaf:
    """Placeholder for a tensor-like leaf in a decoded tree.

    ``kind`` is "T" (plain tensor or parameter), "D" (DTensor) or "S" (ShardedTensor);
    ``indices`` are its payloads' positions in wire order; ``extra`` is the parameter kind
    (for "T") or the unvalidated spec for "D"/"S"; ``path`` is its key path and ``target``
    what the receiver's ``targets`` mapping holds at that path (None without one).
    A slotted class, not a dataclass: a frozen dataclass costs 5x more to build, and
    decoding builds one per tensor.
    """

    __slots__ = ("extra", "indices", "kind", "path", "target")

    def __init__(
        self,
        kind: str,
        indices: tuple[int, ...],
        extra: Any,
        path: tuple[Any, ...] = (),
        target: Any = None,
    ) -> None:
        self.kind, self.indices, self.extra = kind, indices, extra
        self.path, self.target = path, target

    def _key(self) -> tuple[Any, ...]:
        return (self.kind, self.indices, self.extra, self.path)

    def __eq__(self, other: object) -> bool:
        return type(other) is TensorLeaf and self._key() == other._key()

    def __repr__(self) -> str:
        return f"TensorLeaf{self._key()!r}"


@dataclass(frozen=True)
class Metadata:
    """A decoded metadata document; ``leaves`` are its tensor leaves in tree order."""

    tensors: list[TensorSpec]
    tree: Any
    bucket_bytes: int
    chunk_bytes: int
    small_bytes: int
    leaves: list[TensorLeaf] = field(default_factory=list)


def keystr(path: tuple[Any, ...]) -> str:
    """Render a key path the way error messages show it: ``['state'][0]['exp_avg']``."""
    return "".join(f"[{k!r}]" for k in path) or "<root>"


def dtype_from_name(name: object, *, data: bool = False) -> torch.dtype:
    """Look a dtype up by name in the allowlist (never ``getattr`` on wire strings)."""
    if not isinstance(name, str) or name not in _ALL_DTYPES:
        raise MetadataError(f"unknown dtype {name!r}", stage="metadata")
    if data and name not in _DATA_DTYPES:
        raise MetadataError(f"dtype {name!r} cannot be transferred as bytes", stage="metadata")
    return _ALL_DTYPES[name]


def dtype_ok(dtype: torch.dtype) -> bool:
    """Whether tensors of ``dtype`` may be moved as bytes."""
    return dtype_name(dtype) in _DATA_DTYPES


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- encoding (sender side)


def encode_scalar(value: object, path: tuple[Any, ...]) -> list[Any]:
    """Encode a non-tensor, non-container leaf; anything unsafe is a MetadataError."""
    t = type(value)
    if value is None:
        return ["n"]
    if t is bool:
        return ["b", value]
    if t is int:
        return ["i", value]
    if t is float:
        return ["f", float.hex(value)]  # type: ignore[arg-type]
    if t is str:
        return ["s", value]
    if t is bytes:
        return ["y", base64.b64encode(value).decode("ascii")]  # type: ignore[arg-type]
    if t is torch.dtype:
        return ["dt", dtype_name(value)]  # type: ignore[arg-type]
    if t is torch.device:
        return ["dev", str(value)]
    raise MetadataError(
        f"leaf of type {t.__module__}.{t.__qualname__} cannot be encoded safely "
        "(allowed: None, bool, int, float, str, bytes, torch.dtype, torch.device, tensors, "
        "and dict/OrderedDict/list/tuple/torch.Size of these)",
        stage="encode",
        key_path=keystr(path),
    )


def encode_metadata(
    tree: Any, tensors: list[TensorSpec], *, bucket: int, chunk: int, small: int
) -> bytes:
    """Serialize a described tree (see :mod:`describe`) and its tensor table to bytes."""
    codes: dict[torch.dtype, int] = {}
    flat: list[int] = []
    for spec in tensors:
        flat.append(codes.setdefault(spec.dtype, len(codes)))
        flat.append(len(spec.shape))
        flat.extend(spec.shape)
    doc = {
        "v": FORMAT_VERSION,
        "bucket": bucket,
        "chunk": chunk,
        "small": small,
        "dtypes": [dtype_name(d) for d in codes],
        "tensors": flat,
        "tree": tree,
    }
    return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode("utf-8")


# ---------------------------------------------------------------- decoding (receiver side)


def _fail(message: str) -> MetadataError:
    return MetadataError(message, stage="metadata")


def _int(value: object, what: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise _fail(f"{what} must be an integer in [{lo}, {hi}], got {value!r:.80}")
    return value


def _decode_scalar(node: list[Any]) -> object:
    tag = node[0]
    if tag == "n" and len(node) == 1:
        return None
    if len(node) != 2:
        raise _fail(f"scalar node {tag!r} has {len(node)} fields")
    value = node[1]
    if tag == "b" and type(value) is bool:
        return value
    if tag == "i" and type(value) is int:
        return value
    if tag == "f" and type(value) is str and len(value) < 64:
        try:
            return float.fromhex(value)
        except (ValueError, OverflowError):
            raise _fail(f"bad float literal {value!r}") from None
    if tag == "s" and type(value) is str:
        return value
    if tag == "y" and type(value) is str:
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise _fail("bad base64 in a bytes leaf") from None
    if tag == "dt":
        return dtype_from_name(value)
    if tag == "dev" and type(value) is str and len(value) < 64:
        try:
            return torch.device(value)
        except (RuntimeError, ValueError):
            raise _fail(f"bad device string {value!r}") from None
    raise _fail(f"bad node with tag {tag!r:.40}")


class _Decoder:
    """One pass over the tree: validates every node and, when the receiver gave ``targets``
    (key path -> in-place target), attaches each tensor leaf's target as it goes."""

    def __init__(self, limits: Limits, n_tensors: int, targets: Mapping[Any, Any]) -> None:
        self.limits = limits
        self.n_tensors = n_tensors
        self.used = [False] * n_tensors
        self.targets = targets
        self.leaves: list[TensorLeaf] = []

    def index(self, value: object) -> int:
        i = _int(value, "tensor index", 0, self.n_tensors - 1)
        if self.used[i]:
            raise _fail(f"tensor index {i} is used twice")
        self.used[i] = True
        return i

    def leaf(self, kind: str, indices: tuple[int, ...], extra: Any, path: tuple[Any, ...]) -> Any:
        leaf = TensorLeaf(kind, indices, extra, path, self.targets.get(path))
        self.leaves.append(leaf)
        return leaf

    def node(self, node: object, path: tuple[Any, ...]) -> Any:
        if len(path) > self.limits.max_depth:
            raise _fail(f"nesting deeper than {self.limits.max_depth}")
        if type(node) is not list or not node or type(node[0]) is not str:
            raise _fail(f"malformed node {node!r:.80}")
        tag = node[0]
        if tag == "T":  # the common case first, with the index check inlined
            if len(node) != 3 or node[2] not in (0, 1, 2):
                raise _fail("malformed tensor node")
            i = node[1]
            if type(i) is int and 0 <= i < self.n_tensors and not self.used[i]:
                self.used[i] = True
            else:
                self.index(i)  # raises, saying why
            leaf = TensorLeaf("T", (i,), node[2], path, self.targets.get(path))
            self.leaves.append(leaf)
            return leaf
        if tag in ("d", "o"):
            if len(node) != 3 or type(node[1]) is not list or type(node[2]) is not list:
                raise _fail("malformed dict node")
            if len(node[1]) != len(node[2]):
                raise _fail("dict node has different numbers of keys and values")
            keys = [
                k[1]
                if type(k) is list and len(k) == 2 and k[0] == "s" and type(k[1]) is str
                # the common case (a str key) without a call
                else self.key(k)
                for k in node[1]
            ]
            values = [self.node(v, (*path, k)) for k, v in zip(keys, node[2], strict=True)]
            out = (dict if tag == "d" else OrderedDict)(zip(keys, values, strict=True))
            if len(out) != len(keys):
                raise _fail("dict node has duplicate keys")
            return out
        if tag in ("l", "t", "z"):
            if len(node) != 2 or type(node[1]) is not list:
                raise _fail(f"malformed {tag!r} node")
            items = [self.node(v, (*path, i)) for i, v in enumerate(node[1])]
            if tag == "l":
                return items
            if tag == "t":
                return tuple(items)
            if not all(type(i) is int and i >= 0 for i in items):
                raise _fail("torch.Size node holds something other than non-negative ints")
            return torch.Size(items)
        if tag == "D":
            if len(node) != 3 or type(node[2]) is not dict:
                raise _fail("malformed DTensor node")
            return self.leaf("D", (self.index(node[1]),), node[2], path)
        if tag == "S":
            if len(node) != 3 or type(node[1]) is not list or type(node[2]) is not dict:
                raise _fail("malformed ShardedTensor node")
            return self.leaf("S", tuple(self.index(i) for i in node[1]), node[2], path)
        return _decode_scalar(node)

    def key(self, node: object) -> object:
        if type(node) is not list or not node or node[0] not in ("n", "b", "i", "f", "s", "y"):
            raise _fail(f"dict key node {node!r:.80} is not a scalar")
        return _decode_scalar(node)


def _tensor_specs(dtype_names: object, raw: object, limits: Limits) -> list[TensorSpec]:
    """Parse the flat tensor table; every dim and the running total are bounded."""
    if type(dtype_names) is not list or len(dtype_names) > len(_ALL_DTYPES):
        raise _fail("'dtypes' is not a short list")
    dtypes = [dtype_from_name(n, data=True) for n in dtype_names]
    itemsizes = [d.itemsize for d in dtypes]
    if type(raw) is not list or not all(type(x) is int for x in raw):
        raise _fail("'tensors' is not a list of integers")
    if raw and (min(raw) < 0 or max(raw) > limits.max_total_bytes):
        raise _fail("'tensors' holds an integer out of range")
    specs: list[TensorSpec] = []
    append, prod = specs.append, math.prod  # a hot loop: one pass per announced tensor
    cap_tensors, cap_total, max_ndim = limits.max_tensors, limits.max_total_bytes, limits.max_ndim
    total = count = i = 0
    n = len(raw)
    while i < n:
        if count >= cap_tensors:
            raise _fail(f"more than {cap_tensors} tensors announced")
        if i + 1 >= n or raw[i] >= len(dtypes) or raw[i + 1] > max_ndim:
            raise _fail(f"tensor entry {count} is malformed")
        code, ndim = raw[i], raw[i + 1]
        end = i + 2 + ndim
        if end > n:
            raise _fail(f"tensor entry {count} is truncated")
        shape = (raw[i + 2],) if ndim == 1 else tuple(raw[i + 2 : end])
        nbytes = (shape[0] if ndim == 1 else prod(shape)) * itemsizes[code]
        total += nbytes
        if total > cap_total:
            raise _fail(f"announced tensors total more than the cap of {cap_total} bytes")
        append(TensorSpec(dtypes[code], shape, nbytes))
        count += 1
        i = end
    return specs


def decode_metadata(
    raw: bytes,
    header: Header,
    limits: Limits,
    targets: Mapping[Any, Any] | None = None,
) -> Metadata:
    """Validate and decode metadata bytes; any problem is a MetadataError or IntegrityError.

    With ``targets`` (key path -> the receiver's in-place target), each TensorLeaf carries
    the target found at its key path (matched here, in the same pass as validation).
    """
    if len(raw) != header.metadata_bytes:
        raise _fail(f"metadata is {len(raw)} bytes, header announced {header.metadata_bytes}")
    if metadata_crc(raw) != header.metadata_crc:
        raise IntegrityError("metadata checksum mismatch", stage="metadata")
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _fail(f"metadata is not valid JSON: {exc}") from None
    if type(doc) is not dict or doc.get("v") != FORMAT_VERSION:
        raise _fail("metadata document has the wrong shape or version")
    bucket = _int(doc.get("bucket"), "bucket size", 16, limits.max_bucket_bytes)
    chunk = _int(doc.get("chunk"), "chunk size", 16, limits.max_bucket_bytes)
    small = _int(doc.get("small"), "small-tensor threshold", 0, bucket)
    if bucket % 16 or chunk % 16:
        raise _fail("bucket and chunk sizes must be multiples of 16")
    specs = _tensor_specs(doc.get("dtypes"), doc.get("tensors"), limits)
    decoder = _Decoder(limits, len(specs), targets or {})
    try:
        tree = decoder.node(doc.get("tree"), ())
    except RecursionError:
        raise _fail("metadata nesting too deep") from None
    if not all(decoder.used):
        raise _fail("some announced tensors are not referenced by the tree")
    return Metadata(specs, tree, bucket, chunk, small, decoder.leaves)
