"""This pod's snapshot holdings, read by the agent from the snapshot store's manifests."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["manifest_reader"]


def manifest_reader(env: Mapping[str, str]) -> Callable[[], list[dict[str, Any]]]:
    def read() -> list[dict[str, Any]]:
        return []

    return read
