"""Small tensors travel in buckets: fresh ones arrive as views of their bucket, in-place ones
are copied out of it in batches. Real processes over gloo."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist

from peer_recovery.transport import PGTransport
from tests._multiproc import run_ranks
from tests.transport._cases import DTYPES, assert_same, random_tensor, tensor_bytes

pytestmark = pytest.mark.multiproc

TIMEOUT = timedelta(seconds=60)
CPU = torch.device("cpu")
SIZES = {"bucket_bytes": 256, "chunk_bytes": 1024, "small_bytes": 128}  # many buckets


def _state() -> dict[str, Any]:
    """Small tensors of every dtype in mixed order (so buckets need padding), odd shapes,
    a strided source, a parameter, and one large tensor that is chunked, not bucketed."""
    state: dict[str, Any] = {}
    for i, dtype in enumerate(DTYPES):
        state[f"u8_{i}"] = random_tensor((3,), torch.uint8, 500 + i)  # misaligns what follows
        state[f"{i}"] = random_tensor((2, 3), dtype, i)
        state[f"{i}_scalar"] = random_tensor((), dtype, 100 + i)
    state["strided"] = torch.arange(60, dtype=torch.float32).reshape(6, 10)[:, ::3]
    g = torch.Generator().manual_seed(7)
    state["param"] = torch.nn.Parameter(torch.randn(5, 2, generator=g))
    for i in range(10):  # 640 bytes: buckets with only these in them
        state[f"run_{i}"] = torch.randn(16, generator=g)
    state["large"] = torch.randn(1000, generator=g)
    return state


def _fresh_views(rank: int, world: int) -> str:
    pg = dist.group.WORLD
    state = _state()
    transport = PGTransport(pg, TIMEOUT, CPU, **SIZES)
    if rank == 0:
        transport.send_checkpoint([1], state)
        return "sent"
    got = transport.recv_checkpoint(0)
    assert_same(got, state)
    small = {k: v for k, v in got.items() if k != "large"}
    # Each small tensor is a view of a bucket buffer no larger than a bucket; together the
    # buffers hold exactly the payload plus alignment padding (under 16 bytes per tensor).
    storages = {v.untyped_storage().data_ptr(): v.untyped_storage() for v in small.values()}
    assert len(storages) < len(small)
    assert all(s.nbytes() <= SIZES["bucket_bytes"] for s in storages.values())
    payload = sum(v.numel() * v.element_size() for v in small.values())
    assert payload <= sum(s.nbytes() for s in storages.values()) < payload + 16 * len(small)
    assert got["large"].untyped_storage().nbytes() == 1000 * 4  # chunked: its own tensor
    assert all(v.is_contiguous() for v in got.values())
    # Each view covers only its own bytes: writing one leaves its neighbours untouched.
    before = {k: tensor_bytes(v) for k, v in small.items()}
    f64 = str(DTYPES.index(torch.float64))
    with torch.no_grad():
        got[f64].fill_(0)
        got["param"].zero_()
        got["u8_4"].fill_(255)
    for key, raw in before.items():
        if key not in (f64, "param", "u8_4"):
            assert tensor_bytes(got[key]) == raw, key
    assert tensor_bytes(got[f64]) == bytes(6 * 8)
    assert tensor_bytes(got["u8_4"]) == b"\xff" * 3
    return "received"


def test_fresh_small_tensors_are_exact_independent_views_of_their_bucket() -> None:
    assert run_ranks(_fresh_views, 2, timeout=120) == ["sent", "received"]


def _mixed(rank: int, world: int) -> str:
    """Some small tensors in place, their neighbours fresh: mixed buckets are unpacked."""
    pg = dist.group.WORLD
    state = _state()
    if rank == 0:
        PGTransport(pg, TIMEOUT, CPU, **SIZES).send_checkpoint([1], state, step=3)
        return "sent"
    targets = {  # two leaves in three; 2-D ones laid out transposed (not contiguous)
        k: torch.zeros(v.shape[::-1], dtype=v.dtype).t() if v.dim() == 2 else torch.zeros_like(v)
        for i, (k, v) in enumerate(state.items())
        if i % 3 != 2 and k not in ("strided", "param") and not k.startswith("run_")
    }
    ptrs = {k: v.data_ptr() for k, v in targets.items()}
    got = PGTransport(pg, TIMEOUT, CPU, lambda: targets, **SIZES).recv_checkpoint(0, step=3)
    assert_same({k: v.contiguous() for k, v in got.items()}, state)
    for key, ptr in ptrs.items():
        assert got[key] is targets[key] and got[key].data_ptr() == ptr, key
    assert any(not v.is_contiguous() for v in targets.values())  # strided targets filled
    runs = {got[f"run_{i}"].untyped_storage().data_ptr() for i in range(10)}
    assert len(runs) < 10  # whole buckets of fresh tensors still arrive as views
    return "received"


def test_mixed_buckets_fill_in_place_targets_and_fresh_tensors() -> None:
    assert run_ranks(_mixed, 2, timeout=120) == ["sent", "received"]
