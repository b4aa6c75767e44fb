"""The CRC-32 of slot chunks: ISA-L's when installed (several times faster), else zlib's.

Both compute the same CRC-32 (zlib's polynomial), so a manifest written with one is checked
with the other. Both release the GIL on large buffers, so chunks can be checked in threads
while the next ones are copied or received.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable

__all__ = ["crc32", "implementation"]

try:  # an optional dependency of the ``runtime`` extra
    from isal import isal_zlib as _fast
except ImportError:  # pragma: no cover - depends on the environment
    _fast = None

crc32: Callable[[bytes | memoryview], int] = zlib.crc32 if _fast is None else _fast.crc32
implementation: str = "zlib" if _fast is None else "isal"
