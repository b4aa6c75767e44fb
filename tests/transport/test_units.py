"""Pure parts of the transport, without processes: planning, metadata codec, views."""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from peer_recovery.transport import Limits, MetadataError
from peer_recovery.transport._views import byte_view
from peer_recovery.transport.describe import describe_state, index_targets, map_leaves
from peer_recovery.transport.header import Header, metadata_crc, pack_header, unpack_header
from peer_recovery.transport.messages import Bucket, Chunk, bucket_runs, plan_messages
from peer_recovery.transport.metadata import (
    TensorLeaf,
    TensorSpec,
    decode_metadata,
    encode_metadata,
)
from tests.transport._cases import DTYPES, assert_same, random_tensor, tensor_bytes


@settings(max_examples=200, deadline=None)
@given(
    items=st.lists(st.tuples(st.integers(0, 1250), st.sampled_from([1, 2, 4, 8, 16])), max_size=60),
    bucket=st.integers(1, 200).map(lambda n: n * 16),
    chunk=st.integers(1, 200).map(lambda n: n * 16),
    small_frac=st.floats(0, 1),
)
def test_plan_covers_every_byte_exactly_once(
    items: list[tuple[int, int]], bucket: int, chunk: int, small_frac: float
) -> None:
    sizes = [count * align for count, align in items]  # payload sizes are whole elements
    aligns = [align for _, align in items]
    small = int(bucket * small_frac)
    plan = plan_messages(sizes, bucket=bucket, chunk=chunk, small=small, aligns=aligns)
    covered: dict[int, list[tuple[int, int]]] = {i: [] for i in range(len(sizes))}
    for m in plan:
        if isinstance(m, Bucket):
            assert 0 < m.nbytes <= bucket
            assert m.payload_bytes == sum(n for _, _, n in m.entries)
            end = 0
            for idx, off, n in m.entries:
                assert n == sizes[idx] <= small  # small ones only
                assert off % aligns[idx] == 0 and end <= off < end + aligns[idx]  # least pad
                covered[idx].append((0, n))
                end = off + n
            assert end == m.nbytes
            runs = bucket_runs(m, aligns)  # runs of one key are dense and cover the bucket
            assert [i for r in runs for i in r.indices] == [i for i, _, _ in m.entries]
            for r in runs:
                assert r.end - r.start == sum(sizes[i] for i in r.indices)
                assert {aligns[i] for i in r.indices} == {r.key}
        else:
            assert isinstance(m, Chunk) and 0 < m.nbytes <= chunk and sizes[m.index] > small
            covered[m.index].append((m.start, m.end))
    for idx, size in enumerate(sizes):
        spans = covered[idx]
        assert sum(e - s for s, e in spans) == size
        assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))  # in order, no gaps


def test_plan_aligns_each_payload_to_its_item_size() -> None:
    # 3 bytes of uint8, then float64: 5 bytes of padding; then another uint8 follows densely.
    plan = plan_messages([3, 16, 1], bucket=64, chunk=64, small=32, aligns=[1, 8, 1])
    assert plan == [Bucket(25, ((0, 0, 3), (1, 8, 16), (2, 24, 1)))]
    assert plan[0].payload_bytes == 20
    assert [tuple(r) for r in bucket_runs(plan[0], ["u8", "f64", "u8"])] == [
        (0, 3, "u8", [0]),
        (8, 24, "f64", [1]),
        (24, 25, "u8", [2]),
    ]
    with pytest.raises(ValueError, match="alignments"):
        plan_messages([3, 16], bucket=64, chunk=64, small=32, aligns=[1])


def test_plan_rejects_bad_sizes() -> None:
    with pytest.raises(ValueError, match="bad plan sizes"):
        plan_messages([1], bucket=16, chunk=16, small=32)


scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**100), 2**100),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.sampled_from([torch.float32, torch.bfloat16, torch.float8_e5m2, torch.qint8]),
)
keys = st.one_of(st.text(max_size=8), st.integers(-5, 5), st.booleans(), st.none())
trees = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(inner, max_size=4).map(tuple),
        st.dictionaries(keys, inner, max_size=4),
        st.dictionaries(keys, inner, max_size=4).map(OrderedDict),
    ),
    max_leaves=30,
)


def _round_trip(state: Any) -> Any:
    described = describe_state(state)
    specs = [TensorSpec(p.dtype, p.shape, p.numel() * p.element_size()) for p in described.payloads]
    raw = encode_metadata(described.tree, specs, bucket=4096, chunk=4096, small=512)
    header = unpack_header(pack_header(Header(3, True, len(raw), metadata_crc(raw))), Limits())
    assert header.step == 3 and header.integrity
    meta = decode_metadata(raw, header, Limits())
    assert [(s.dtype, tuple(s.shape)) for s in meta.tensors] == [
        (s.dtype, tuple(s.shape)) for s in specs
    ]
    return map_leaves(meta.tree, lambda path, leaf: described.payloads[leaf.indices[0]])


@settings(max_examples=300, deadline=None)
@given(trees)
def test_containers_and_scalars_round_trip_exactly(state: Any) -> None:
    assert_same(_round_trip(state), state)


def test_tensor_leaves_keep_their_place_and_kind() -> None:
    state = {"a": [torch.ones(2), {"p": torch.nn.Parameter(torch.zeros(3))}], "s": torch.Size([2])}
    described = describe_state(state)
    assert described.tree[2][0] == ["l", [["T", 0, 0], ["d", [["s", "p"]], [["T", 1, 2]]]]]
    assert described.name(1) == "['a'][1]['p']"
    got = _round_trip(state)
    assert got["a"][1]["p"] is state["a"][1]["p"] and type(got["s"]) is torch.Size


def test_index_targets_finds_leaves_by_key_path() -> None:
    w = torch.ones(1)
    found = index_targets({"m": {"w": w}, "l": [None, (1, w)]})
    assert found[("m", "w")] is w and found[("l", 1, 1)] is w and found[("l", 0)] is None


def test_decoding_attaches_the_receivers_target_at_each_key_path() -> None:
    w, b = torch.zeros(3), torch.zeros(2)
    state = {"m": {"w": w, "b": b}, "l": [(1, w)], "fresh": b}
    described = describe_state(state)
    raw = encode_metadata(described.tree, described.specs, bucket=64, chunk=64, small=16)
    header = Header(None, False, len(raw), metadata_crc(raw))
    targets = {("m", "w"): "W", ("l", 0, 1): "L"}  # any object: the decoder only looks up
    meta = decode_metadata(raw, header, Limits(), targets)
    found = {leaf.path: (leaf.indices, leaf.target) for leaf in meta.leaves}
    assert found == {
        ("m", "w"): ((0,), "W"),
        ("m", "b"): ((1,), None),
        ("l", 0, 1): ((2,), "L"),
        ("fresh",): ((3,), None),
    }
    assert meta.tree["l"][0][1] is meta.leaves[2]  # the leaves are the tree's own nodes


@pytest.mark.parametrize("depth", [3, 4])
def test_sender_and_receiver_agree_on_the_depth_limit(depth: int) -> None:
    state: Any = torch.zeros(1)
    for _ in range(depth):
        state = {"k": state}
    if depth > 3:
        with pytest.raises(MetadataError, match="deeper than 3"):
            describe_state(state, max_depth=3)
        return
    described = describe_state(state, max_depth=3)
    raw = encode_metadata(described.tree, described.specs, bucket=64, chunk=64, small=16)
    header = Header(None, False, len(raw), metadata_crc(raw))
    assert len(decode_metadata(raw, header, Limits(max_depth=3)).leaves) == 1
    with pytest.raises(MetadataError, match="deeper than 2"):
        decode_metadata(raw, header, Limits(max_depth=2))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_byte_views_share_storage_for_every_dtype(dtype: torch.dtype) -> None:
    base = random_tensor((4, 6), dtype, 7)
    view = base[1:3]
    raw = byte_view(view)
    assert raw.numel() == view.numel() * dtype.itemsize
    assert raw.data_ptr() == view.data_ptr()
    assert bytes(raw.numpy()) == tensor_bytes(view)
    with pytest.raises(ValueError, match="contiguous"):
        byte_view(base.t())


def test_float_edge_values_are_bit_exact() -> None:
    values = [math.inf, -math.inf, math.nan, -0.0, 5e-324, 1.7976931348623157e308]
    got = _round_trip(values)
    assert [v.hex() for v in got] == [v.hex() for v in values]


def test_decoder_caps_the_tensor_count_and_total() -> None:
    specs = [TensorSpec(torch.float32, (4,), 16)] * 3
    raw = encode_metadata(
        ["l", [["T", i, 0] for i in range(3)]], specs, bucket=64, chunk=64, small=16
    )
    header = Header(None, False, len(raw), metadata_crc(raw))
    with pytest.raises(MetadataError, match="more than 2 tensors"):
        decode_metadata(raw, header, Limits(max_tensors=2))
    with pytest.raises(MetadataError, match="cap of 40 bytes"):
        decode_metadata(raw, header, Limits(max_total_bytes=40))
    assert len(decode_metadata(raw, header, Limits()).tensors) == 3
    leaf = decode_metadata(raw, header, Limits()).tree[0]
    assert leaf == TensorLeaf("T", (0,), 0, (0,))
