"""Byte views over tensor storage, and the checksum used for integrity checks.

Every dtype (bool, complex, fp8 and 0-dim tensors included) is moved as bytes through a
uint8 view that shares storage with the tensor, so receiving into the view writes into the
tensor itself. Views are made with ``Tensor.set_`` on the untyped storage, which works for
any element size and never copies.
"""

from __future__ import annotations

import zlib

import torch

__all__ = ["byte_view", "checksum"]


def byte_view(t: torch.Tensor) -> torch.Tensor:
    """A 1-D uint8 tensor over exactly the bytes of contiguous ``t`` (shares storage)."""
    if not t.is_contiguous():
        raise ValueError("byte_view needs a contiguous tensor")
    size = t.element_size()
    out = torch.empty(0, dtype=torch.uint8, device=t.device)
    return out.set_(t.untyped_storage(), t.storage_offset() * size, (t.numel() * size,))


def checksum(data: torch.Tensor) -> int:
    """CRC32 of a uint8 tensor's bytes (copied to the host first when on a device)."""
    if data.device.type != "cpu":
        data = data.cpu()
    if data.numel() == 0:
        return 0
    return zlib.crc32(memoryview(data.numpy()))
