"""Snapshot manifests: what a slot file holds, where, and how to check it.

A manifest is the last thing written for a slot, atomically (temp file, fsync, rename), so
a slot without a readable manifest is simply not a snapshot. It records the snapshot's
identity (the job that took it, its lineage, the step and a checksum of its content; see
``identity``), the shard key, the layout (each tensor's path, dtype, shape, offset and size in the slot file), the
skeletons of the replicated and the rank-private state (non-tensor leaves in tagged JSON,
see ``tree``), and CRC-32 checksums of the data region in fixed-size chunks. The manifest
guards itself with a CRC-32 of its body, so a damaged manifest is refused, not misread.

Torch-free: the rendezvous plugin reads and publishes manifests from the torchrun agent.
Everything read from disk is validated here; errors name the field that was wrong.
"""

from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from typing import Any

from peer_recovery._gc import gc_paused
from peer_recovery.shard_key import ShardKey, state_digest

__all__ = ["FORMAT", "Manifest", "ManifestError", "Section", "TensorEntry"]

FORMAT = "peer-recovery.snapshot/v2"


class ManifestError(ValueError):
    """A manifest file could not be read as a valid manifest."""


def _need(cond: bool, what: str) -> None:
    if not cond:
        raise ManifestError(f"manifest: {what}")


def _int(value: object, what: str, lo: int = 0) -> int:
    _need(
        isinstance(value, int) and not isinstance(value, bool) and value >= lo,
        f"{what} must be an int >= {lo}, got {value!r}",
    )
    return value  # type: ignore[return-value]


def _entries(raw: list[Any]) -> tuple[TensorEntry, ...]:
    """The layout's entries; well-formed ones are taken in one cheap pass, anything else
    goes through ``TensorEntry.from_json``, whose error names what is wrong."""
    entries = []
    for item in raw:
        if type(item) is list and len(item) == 5:
            path, dtype, shape, offset, nbytes = item
            if (
                type(path) is str
                and type(dtype) is str
                and type(shape) is list
                and type(offset) is int
                and type(nbytes) is int
                and offset >= 0
                and nbytes >= 0
                and all(type(d) is int and d >= 0 for d in shape)
            ):
                entries.append(TensorEntry(path, dtype, tuple(shape), offset, nbytes))
                continue
        entries.append(TensorEntry.from_json(item))
    return tuple(entries)


def _body_text(raw: bytes) -> bytes | None:
    """The body's bytes as ``Manifest.encode`` wrote them (``{"body":...,"crc32":N}``), so
    its checksum is checked without encoding the body again; None for another layout."""
    head, tail = b'{"body":', b',"crc32":'
    end = raw.rfind(tail)
    if not raw.startswith(head) or end < 0 or not raw.endswith(b"}"):
        return None
    return raw[len(head) : end]


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lies in the slot file."""

    path: str
    dtype: str  # torch dtype name without the "torch." prefix
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    def to_json(self) -> list[Any]:
        return [self.path, self.dtype, list(self.shape), self.offset, self.nbytes]

    @classmethod
    def from_json(cls, raw: object) -> TensorEntry:
        _need(
            isinstance(raw, list) and len(raw) == 5,
            f"layout entry must have 5 fields, got {raw!r:.80}",
        )
        path, dtype, shape, offset, nbytes = raw  # type: ignore[misc]
        _need(isinstance(path, str) and isinstance(dtype, str), f"layout entry names: {raw!r:.80}")
        _need(isinstance(shape, list), f"shape of {path} must be a list")
        dims = tuple(_int(d, f"shape of {path}") for d in shape)
        return cls(
            path, dtype, dims, _int(offset, f"offset of {path}"), _int(nbytes, f"size of {path}")
        )


@dataclass(frozen=True)
class Section:
    """One part of the state: its skeleton and the layout of its tensors."""

    tree: list[Any]
    tensors: tuple[TensorEntry, ...]
    other_paths: tuple[str, ...]

    def digest(self) -> str:
        return state_digest(((t.path, t.dtype, t.shape) for t in self.tensors), self.other_paths)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    def to_json(self) -> dict[str, Any]:
        return {
            "tree": self.tree,
            "tensors": [t.to_json() for t in self.tensors],
            "other_paths": list(self.other_paths),
        }

    @classmethod
    def from_json(cls, raw: object, name: str) -> Section:
        _need(
            isinstance(raw, dict) and {"tree", "tensors", "other_paths"} <= set(raw),
            f"section {name} is malformed",
        )
        tensors = raw["tensors"]  # type: ignore[index]
        others = raw["other_paths"]  # type: ignore[index]
        _need(isinstance(tensors, list) and isinstance(others, list), f"section {name} lists")
        _need(
            all(isinstance(p, str) for p in others), f"section {name}: other_paths must be strings"
        )
        return cls(raw["tree"], _entries(tensors), tuple(others))  # type: ignore[index]


@dataclass(frozen=True)
class Manifest:
    """The committed description of one slot (see the module docstring)."""

    step: int
    slot: int
    rank: int
    shard_key: ShardKey
    replicated: Section
    private: Section | None
    data_bytes: int
    chunk_bytes: int
    checksums: tuple[int, ...]
    created_unix: float
    job: str = ""  # ``identity.job_identity`` of the job that took it
    lineage: str = ""  # ``identity``: the timeline it belongs to
    content: str = ""  # checksum of the replicated state (tensor bytes and skeleton)

    @property
    def checksum(self) -> str:
        """The content checksum: equal on every holder of the same state (for publishing)."""
        return self.content

    def summary(self) -> dict[str, Any]:
        """The cheap part to publish to peers: identity, shard key, bytes."""
        return {
            "step": self.step,
            "rank": self.rank,
            "job": self.job,
            "lineage": self.lineage,
            "checksum": self.content,
            "shard_key": self.shard_key.to_json(),
            "bytes": self.replicated.nbytes,
        }

    def body(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "step": self.step,
            "slot": self.slot,
            "rank": self.rank,
            "shard_key": self.shard_key.to_json(),
            "replicated": self.replicated.to_json(),
            "private": None if self.private is None else self.private.to_json(),
            "data_bytes": self.data_bytes,
            "chunk_bytes": self.chunk_bytes,
            "checksums": list(self.checksums),
            "created_unix": self.created_unix,
            "job": self.job,
            "lineage": self.lineage,
            "content": self.content,
        }

    def encode(self) -> bytes:
        """``{"body":<body, canonical JSON>,"crc32":<its CRC-32>}``: the body's bytes appear
        as they were checksummed, which lets ``decode`` check them without re-encoding."""
        with gc_paused():
            body = json.dumps(self.body(), separators=(",", ":"), sort_keys=True).encode()
        return b'{"body":' + body + b',"crc32":' + str(zlib.crc32(body)).encode() + b"}"

    @classmethod
    def decode(cls, raw: bytes) -> Manifest:
        with gc_paused():
            return cls._decode(raw)

    @classmethod
    def _decode(cls, raw: bytes) -> Manifest:
        try:
            outer = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ManifestError(f"manifest: not JSON ({error})") from None
        _need(
            isinstance(outer, dict) and set(outer) == {"body", "crc32"}, "expected body and crc32"
        )
        body = outer["body"]
        _need(isinstance(body, dict), "body must be an object")
        text = _body_text(raw)
        if text is None or zlib.crc32(text) != outer["crc32"]:  # written otherwise: canonical
            text = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
        _need(zlib.crc32(text) == outer["crc32"], "its own checksum does not match (damaged)")
        _need(body.get("format") == FORMAT, f"format {body.get('format')!r} is not {FORMAT!r}")
        try:
            key = ShardKey.from_json(body.get("shard_key"))
        except ValueError as error:
            raise ManifestError(f"manifest: {error}") from None
        checksums = body.get("checksums")
        _need(isinstance(checksums, list), "checksums must be a list")
        created = body.get("created_unix")
        _need(isinstance(created, (int, float)), "created_unix must be a number")
        private = body.get("private")
        identity = {name: body.get(name) for name in ("job", "lineage", "content")}
        for name, value in identity.items():
            _need(isinstance(value, str), f"{name} must be a string, got {value!r:.80}")
        manifest = cls(
            step=_int(body.get("step"), "step"),
            slot=_int(body.get("slot"), "slot"),
            rank=_int(body.get("rank"), "rank"),
            shard_key=key,
            replicated=Section.from_json(body.get("replicated"), "replicated"),
            private=None if private is None else Section.from_json(private, "private"),
            data_bytes=_int(body.get("data_bytes"), "data_bytes"),
            chunk_bytes=_int(body.get("chunk_bytes"), "chunk_bytes", lo=1),
            checksums=tuple(_int(c, "checksum") for c in checksums),
            created_unix=float(created),
            job=identity["job"],  # type: ignore[arg-type]
            lineage=identity["lineage"],  # type: ignore[arg-type]
            content=identity["content"],  # type: ignore[arg-type]
        )
        manifest.validate()
        return manifest

    def validate(self) -> None:
        """Layout sanity: entries inside the data region, not overlapping, chunks cover it."""
        entries = [*self.replicated.tensors, *(self.private.tensors if self.private else ())]
        end = 0
        for entry in sorted(entries, key=lambda e: e.offset):
            _need(entry.offset >= end, f"tensor {entry.path} overlaps the previous one")
            end = entry.offset + entry.nbytes
        _need(end <= self.data_bytes, f"layout ends at {end}, past data_bytes {self.data_bytes}")
        expected = -(-self.data_bytes // self.chunk_bytes)
        _need(
            len(self.checksums) == expected,
            f"{len(self.checksums)} checksums for {expected} chunks",
        )
        _need(self.slot in (0, 1), f"slot must be 0 or 1, got {self.slot}")
