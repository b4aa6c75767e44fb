"""Hostile or corrupt metadata: refused with MetadataError, running no code, allocating nothing.

A raw sender process writes hand-made headers and metadata with plain ``pg.send`` and reads
the receiver's acknowledgement, so the channel stays in step across all cases of one spawn.
Pure decoding of the same documents is covered without processes too.
"""

from __future__ import annotations

import json
import pickle
import resource
from typing import Any

import pytest
import torch
import torch.distributed as dist

from peer_recovery.transport import IntegrityError, Limits, MetadataError, PGTransport
from peer_recovery.transport.header import (
    FORMAT_VERSION,
    Header,
    metadata_crc,
    pack_header,
    unpack_header,
)
from peer_recovery.transport.metadata import decode_metadata
from tests._multiproc import run_ranks

pytestmark = pytest.mark.multiproc


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (exec, ("import pathlib; pathlib.Path('/tmp/pwned-by-transport').touch()",))


def _doc(**over: Any) -> bytes:
    doc = {
        "v": FORMAT_VERSION,
        "bucket": 4096,
        "chunk": 4096,
        "small": 512,
        "dtypes": ["float32"],
        "tensors": [0, 1, 4],
        "tree": ["d", [["s", "w"]], [["T", 0, 0]]],
    }
    doc.update(over)
    return json.dumps(doc).encode()


def _deep(depth: int) -> bytes:
    """A document nested ``depth`` lists deep (written as text: json.dumps would recurse)."""
    tree = '["l",[' * depth + '["n"]' + "]]" * depth
    return _doc(tensors=[], tree="@").replace(b'"@"', tree.encode())


_DSPEC = {
    "device_type": "cpu",
    "mesh": [0, 1],
    "dim_names": None,
    "placements": [["eval", "__import__('os')"]],
    "shape": [4],
    "stride": [1],
}
# (name, header override, metadata bytes or None for "header only", expected error, match)
HOSTILE: list[tuple[str, dict[str, Any], bytes | None, type[Exception], str]] = [
    ("bad magic", {"magic": b"GARBAGE!"}, None, MetadataError, "bad magic"),
    ("huge metadata", {"metadata_bytes": 1 << 40}, None, MetadataError, "exceeds the cap"),
    ("pickle", {}, pickle.dumps(_Evil()), MetadataError, "not valid JSON"),
    ("bad crc", {"metadata_crc": 1}, _doc(), IntegrityError, "checksum"),
    ("object dtype", {}, _doc(dtypes=["object"]), MetadataError, "unknown dtype"),
    ("qint8 dtype", {}, _doc(dtypes=["qint8"]), MetadataError, "cannot be transferred"),
    ("1 TiB+", {}, _doc(tensors=[0, 2, 1 << 20, 1 << 19]), MetadataError, "cap"),
    ("negative dim", {}, _doc(tensors=[0, 1, -4]), MetadataError, "out of range"),
    ("truncated table", {}, _doc(tensors=[0, 3, 4]), MetadataError, "truncated"),
    ("index twice", {}, _doc(tree=["l", [["T", 0, 0], ["T", 0, 0]]]), MetadataError, "twice"),
    ("index unknown", {}, _doc(tree=["T", 5, 0]), MetadataError, "tensor index"),
    ("unused tensor", {}, _doc(tree=["n"]), MetadataError, "not referenced"),
    ("deep", {}, _deep(100), MetadataError, "nesting deeper than 64"),
    ("very deep", {}, _deep(200_000), MetadataError, "recursion|nesting"),
    ("unknown tag", {}, _doc(tree=["__import__", "os"]), MetadataError, "bad node"),
    ("bad key", {}, _doc(tree=["d", [["T", 0, 0]], [["n"]]]), MetadataError, "not a scalar"),
    ("bad bucket", {}, _doc(bucket=1 << 40), MetadataError, "bucket size"),
    ("bad placement", {}, _doc(tree=["D", 0, _DSPEC]), MetadataError, "not in the allowlist"),
]


def _header(meta: bytes, **over: Any) -> bytes:
    raw = bytearray(pack_header(Header(None, False, len(meta), metadata_crc(meta))))
    if "magic" in over:
        raw[:8] = over.pop("magic")
    fields = {"metadata_bytes": len(meta), "metadata_crc": metadata_crc(meta), **over}
    if set(over) - {"metadata_bytes", "metadata_crc"}:
        raise ValueError(over)
    head = pack_header(Header(None, False, fields["metadata_bytes"], fields["metadata_crc"]))
    return bytes(raw[:8]) + head[8:]


def _hostile(rank: int, world: int) -> list[str]:
    pg = dist.group.WORLD
    done = []
    for name, over, meta, exc_type, match in HOSTILE:
        if rank == 0:
            payload = meta if meta is not None else b""
            head = torch.frombuffer(bytearray(_header(payload, **over)), dtype=torch.uint8)
            pg.send([head], 1, 1).wait()
            if meta is not None:
                pg.send([torch.frombuffer(bytearray(meta), dtype=torch.uint8)], 1, 2).wait()
            ack = torch.zeros(3, dtype=torch.int64)
            pg.recv([ack], 1, 3).wait()
            assert ack[0].item() in (2, 3), (name, ack)  # refused: metadata or integrity
            continue
        with pytest.raises(exc_type, match=match) as info:
            PGTransport(pg, 30, "cpu").recv_checkpoint(0)
        assert info.value.peer == 0, name
        done.append(name)
    if rank == 1:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        assert peak_mb < 2048, f"receiver peaked at {peak_mb:.0f} MB"  # nothing large allocated
    return done


def test_hostile_metadata_over_the_wire_is_refused(tmp_path: Any) -> None:
    _, done = run_ranks(_hostile, 2, timeout=120)
    assert done == [case[0] for case in HOSTILE]
    import os

    assert not os.path.exists("/tmp/pwned-by-transport")


@pytest.mark.parametrize("case", HOSTILE[2:], ids=[c[0] for c in HOSTILE[2:]])
def test_hostile_metadata_decoding(case: tuple[Any, ...]) -> None:
    _, over, meta, exc_type, match = case
    header = unpack_header(_header(meta, **over), Limits())
    with pytest.raises(exc_type, match=match):
        decoded = decode_metadata(meta, header, Limits())
        # DTensor specs are checked when the leaf is rebuilt; a lone decoder accepts them.
        from peer_recovery.transport.dist_tensors import rebuild_dtensor

        rebuild_dtensor(torch.zeros(4), decoded.tree.extra, "['x']")


def test_header_caps_are_configurable() -> None:
    raw = _header(b"x" * 100)
    assert unpack_header(raw, Limits()).metadata_bytes == 100
    with pytest.raises(MetadataError, match="exceeds the cap of 99"):
        unpack_header(raw, Limits(max_metadata_bytes=99))
