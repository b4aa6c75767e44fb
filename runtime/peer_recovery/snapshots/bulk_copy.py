"""Copying a slot's tensors into live ones without per-tensor Python on the hot path.

- ``slot_views``: the views of a section's tensors on the mapped slot, made per dtype with
  one ``split_with_sizes`` over a typed view of the slot (offsets are 64-byte aligned, so
  every offset is a whole number of elements), instead of three view calls per tensor.
- ``copy_grouped``: the copies, grouped by (dtype, device) into one
  ``torch._foreach_copy_`` per group.
- ``copy_to_device``: for live tensors on a GPU: the slot is pageable, mapped file memory,
  so each slot range goes through pinned host buffers (two, alternating: range k+1 is
  copied into one while range k crosses to the GPU from the other), lands in a staging
  buffer on the device and is scattered there by a device-side grouped copy.

Pure copying: which tensors go where (and that shapes and dtypes fit) is decided by the
caller (``LiveState.check``).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import torch

from peer_recovery.snapshots.manifest import TensorEntry

__all__ = ["STAGE_BYTES", "copy_grouped", "copy_to_device", "slot_views"]

STAGE_BYTES = 64 << 20  # one pinned staging buffer (two are used)


def _dtype(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dtype


def slot_views(buf: torch.Tensor, entries: Sequence[TensorEntry]) -> list[torch.Tensor]:
    """Views of ``entries`` (in their order) on ``buf`` (the mapped slot, ``uint8``)."""
    out: list[torch.Tensor | None] = [None] * len(entries)
    by_dtype: dict[str, list[int]] = defaultdict(list)
    for i, entry in enumerate(entries):
        by_dtype[entry.dtype].append(i)
    for name, indices in by_dtype.items():
        dtype = _dtype(name)
        size = torch.empty((), dtype=dtype).element_size()
        indices.sort(key=lambda i: entries[i].offset)
        if any(entries[i].offset % size for i in indices):
            for i in indices:  # not element-aligned (never written so): one view each
                e = entries[i]
                out[i] = buf[e.offset : e.offset + e.nbytes].view(dtype).view(e.shape)
            continue
        first = entries[indices[0]].offset
        last = entries[indices[-1]]
        typed = buf[first : last.offset + last.nbytes].view(dtype)
        sizes: list[int] = []
        at = first
        for i in indices:  # gap before each tensor, then the tensor
            e = entries[i]
            sizes.append((e.offset - at) // size)
            sizes.append(e.nbytes // size)
            at = e.offset + e.nbytes
        pieces = typed.split(sizes)
        for k, i in enumerate(indices):
            out[i] = pieces[2 * k + 1].view(entries[i].shape)
    return out  # type: ignore[return-value]


def copy_grouped(sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor]) -> None:
    """``targets[i].copy_(sources[i])`` for all i, one fused call per (dtype, devices)."""
    groups: dict[tuple[object, ...], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
    for source, target in zip(sources, targets, strict=True):
        key = (target.dtype, target.device, source.dtype, source.device)
        dst, src = groups.setdefault(key, ([], []))
        dst.append(target)
        src.append(source)
    with torch.no_grad():
        for dst, src in groups.values():
            torch._foreach_copy_(dst, src)


def copy_to_device(
    buf: torch.Tensor,
    entries: Sequence[TensorEntry],
    targets: Sequence[torch.Tensor],
    *,
    stage_bytes: int = STAGE_BYTES,
) -> None:
    """Copy ``entries`` of the slot into ``targets`` on one CUDA device, pipelined through
    two pinned buffers (see the module docstring). Entries larger than ``stage_bytes`` are
    staged on their own."""
    device = targets[0].device
    order = sorted(range(len(entries)), key=lambda i: entries[i].offset)
    batches: list[list[int]] = []
    for i in order:  # consecutive entries whose bytes fit in one staging buffer
        e = entries[i]
        if batches:
            start = entries[batches[-1][0]].offset
            if e.offset + e.nbytes - start <= stage_bytes:
                batches[-1].append(i)
                continue
        batches.append([i])
    width = max(
        entries[b[-1]].offset + entries[b[-1]].nbytes - entries[b[0]].offset for b in batches
    )
    pinned = [torch.empty(width, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
    staged = [torch.empty(width, dtype=torch.uint8, device=device) for _ in range(2)]
    done: list[torch.cuda.Event | None] = [None, None]
    stream = torch.cuda.current_stream(device)
    with torch.no_grad():
        for k, batch in enumerate(batches):
            side = k % 2
            if done[side] is not None:
                done[side].synchronize()  # the pinned buffer's last upload has finished
            start = entries[batch[0]].offset
            end = entries[batch[-1]].offset + entries[batch[-1]].nbytes
            host = pinned[side][: end - start]
            host.copy_(buf[start:end])  # pageable slot -> pinned, on this thread
            dev = staged[side][: end - start]
            dev.copy_(host, non_blocking=True)
            event = torch.cuda.Event()
            event.record(stream)
            done[side] = event
            shifted = [
                TensorEntry(e.path, e.dtype, e.shape, e.offset - start, e.nbytes)
                for e in (entries[i] for i in batch)
            ]
            copy_grouped(slot_views(dev, shifted), [targets[i] for i in batch])
    stream.synchronize()
