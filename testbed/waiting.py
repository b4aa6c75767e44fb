"""The one bounded wait of the test bed: poll until something is there, or say what was not."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_for"]

T = TypeVar("T")


def wait_for(
    what: str,
    probe: Callable[[], T | None],
    *,
    timeout: float = 30.0,
    why: Callable[[], object] | None = None,
    every: float = 0.2,
) -> T:
    """Poll ``probe`` until it returns something truthy; on timeout, raise ``TimeoutError``
    naming ``what`` and, when given, ``why()`` (the state that explains it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(every)
    detail = f"\n{why()}" if why is not None else ""
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")
