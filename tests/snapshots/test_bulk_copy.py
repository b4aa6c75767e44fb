"""Grouped copies out of a slot: the same bytes land as with one copy per tensor, for mixed
dtypes, gaps and shapes; on a GPU, through pinned staging (skipped without CUDA)."""

from __future__ import annotations

import pytest
import torch

from peer_recovery.snapshots.bulk_copy import copy_grouped, copy_to_device, slot_views
from peer_recovery.snapshots.store import plan_sections
from peer_recovery.snapshots.tree import flatten


def _state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return {
        "w": torch.randn(33, 7, generator=g),
        "b16": torch.randn(5, generator=g).bfloat16(),
        "step": torch.tensor(12, dtype=torch.int64),
        "bytes": torch.randint(0, 255, (13,), dtype=torch.uint8, generator=g),
        "h": torch.randn(2, 3, 4, generator=g).half(),
        "empty": torch.empty(0, 3),
        "w2": torch.randn(100, generator=g, dtype=torch.float64),
    }


def _slot() -> tuple[torch.Tensor, list, list[torch.Tensor]]:
    flat = flatten(_state())
    section, _, size = plan_sections(flat, None)
    buf = torch.zeros(size + 64, dtype=torch.uint8)
    for entry, tensor in zip(section.tensors, flat.tensors, strict=True):
        raw = buf[entry.offset : entry.offset + entry.nbytes]
        raw.view(tensor.dtype).view(tensor.shape).copy_(tensor)
    return buf, list(section.tensors), flat.tensors


def test_slot_views_are_the_stored_tensors_in_entry_order() -> None:
    buf, entries, tensors = _slot()
    views = slot_views(buf, entries)
    assert [v.dtype for v in views] == [t.dtype for t in tensors]
    for view, tensor in zip(views, tensors, strict=True):
        assert view.shape == tensor.shape and torch.equal(view, tensor)
    views[0][0, 0] = 42.0  # views, not copies
    assert slot_views(buf, entries)[0][0, 0] == 42.0


def test_grouped_copy_fills_every_target() -> None:
    buf, entries, tensors = _slot()
    targets = [torch.full_like(t, 0) for t in tensors]
    copy_grouped(slot_views(buf, entries), targets)
    assert all(torch.equal(a, b) for a, b in zip(targets, tensors, strict=True))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_device_copy_through_pinned_staging_matches_the_slot() -> None:
    buf, entries, tensors = _slot()
    targets = [torch.zeros_like(t, device="cuda") for t in tensors]
    pointers = [t.data_ptr() for t in targets]
    copy_to_device(buf, entries, targets, stage_bytes=256)  # many staged batches
    assert [t.data_ptr() for t in targets] == pointers  # in place
    assert all(torch.equal(a.cpu(), b) for a, b in zip(targets, tensors, strict=True))
