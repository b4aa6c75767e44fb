"""The fixed-size first message of a transfer, and the caps a receiver applies: pure, no I/O.

The header is 64 bytes on the wire: magic, format version, flags (a step is present,
integrity checks are on), the step, and the length and CRC32 of the metadata document that
follows (see :mod:`metadata`). A receiver checks all of it, and the announced length
against :class:`Limits`, before it allocates anything for the metadata.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

from peer_recovery.transport.errors import MetadataError

__all__ = [
    "FORMAT_VERSION",
    "HEADER_BYTES",
    "Header",
    "Limits",
    "metadata_crc",
    "pack_header",
    "unpack_header",
]

FORMAT_VERSION = 2  # 2: bucket entries aligned to their dtype (plan.py)
_MAGIC = b"PRXFER\x00\x01"
_HEADER = struct.Struct("<8sIIqQI")
HEADER_BYTES = 64  # fixed on the wire; the struct is zero-padded to this size
_FLAG_STEP = 1
_FLAG_INTEGRITY = 2


@dataclass(frozen=True)
class Limits:
    """Caps a receiver applies to what a peer announces, before allocating anything."""

    max_metadata_bytes: int = 256 << 20
    max_tensors: int = 10_000_000
    max_depth: int = 64
    max_ndim: int = 64
    max_total_bytes: int = 1 << 40
    max_bucket_bytes: int = 1 << 30


@dataclass(frozen=True)
class Header:
    """The fixed-size first message of a transfer."""

    step: int | None
    integrity: bool
    metadata_bytes: int
    metadata_crc: int


def metadata_crc(raw: bytes) -> int:
    return zlib.crc32(raw)


def pack_header(header: Header) -> bytes:
    flags = (_FLAG_STEP if header.step is not None else 0) | (
        _FLAG_INTEGRITY if header.integrity else 0
    )
    raw = _HEADER.pack(
        _MAGIC,
        FORMAT_VERSION,
        flags,
        header.step if header.step is not None else 0,
        header.metadata_bytes,
        header.metadata_crc,
    )
    return raw.ljust(HEADER_BYTES, b"\x00")


def unpack_header(raw: bytes, limits: Limits) -> Header:
    """Parse and bound-check a header; a bad magic or version is a MetadataError."""
    if len(raw) != HEADER_BYTES:
        raise MetadataError(f"header is {len(raw)} bytes, expected {HEADER_BYTES}", stage="header")
    magic, version, flags, step, meta_len, meta_crc = _HEADER.unpack_from(raw)
    if magic != _MAGIC:
        raise MetadataError(f"bad magic {magic!r}: not a peer-recovery transfer", stage="header")
    if version != FORMAT_VERSION:
        raise MetadataError(
            f"format version {version}, this receiver speaks {FORMAT_VERSION}", stage="header"
        )
    if flags & ~(_FLAG_STEP | _FLAG_INTEGRITY):
        raise MetadataError(f"unknown header flags {flags:#x}", stage="header")
    if meta_len > limits.max_metadata_bytes:
        raise MetadataError(
            f"announced metadata of {meta_len} bytes exceeds the cap of "
            f"{limits.max_metadata_bytes}",
            stage="header",
        )
    return Header(
        step=step if flags & _FLAG_STEP else None,
        integrity=bool(flags & _FLAG_INTEGRITY),
        metadata_bytes=meta_len,
        metadata_crc=meta_crc,
    )
