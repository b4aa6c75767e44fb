"""The start-up sizing check: can this pod hold two snapshot copies?

Snapshots live in a memory-backed filesystem (``/dev/shm``), so two limits apply: the free
space of that filesystem, and the pod's memory limit (tmpfs pages are charged to the pod's
memory cgroup). Both are checked once, when the slots are preallocated, so a pod that is
too small fails at start-up with a clear message instead of with SIGBUS mid-training.

``decide`` is pure (numbers in, decision and human-readable line out); ``probe`` reads the
numbers from the system and is the only part that does I/O.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Sizing", "SizingError", "decide", "format_bytes", "probe"]

_UNLIMITED = 1 << 60  # cgroup v1 reports "no limit" as a huge number


class SizingError(RuntimeError):
    """The snapshot store cannot be preallocated; the message says what to change."""


@dataclass(frozen=True)
class Sizing:
    """The numbers a decision is based on (bytes)."""

    need: int  # both slots together
    already_allocated: int  # what this store's existing slot files hold already
    free: int  # free space of the filesystem, for an unprivileged writer
    memory_limit: int | None  # the pod's memory limit, None when unlimited or unknown
    memory_used: int | None  # the pod's current memory use, when known


def format_bytes(n: int | float) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def decide(sizing: Sizing, directory: str) -> tuple[bool, str]:
    """Whether two copies fit, and the sizing line to print either way."""
    extra = max(0, sizing.need - sizing.already_allocated)
    limit = sizing.memory_limit
    line = (
        f"snapshot store {directory}: need {format_bytes(sizing.need)} for two slots "
        f"({format_bytes(extra)} new), free {format_bytes(sizing.free)}, pod memory limit "
        f"{'none' if limit is None else format_bytes(limit)}"
    )
    if extra > sizing.free:
        return False, (
            f"{line}: NOT ENOUGH SPACE; the filesystem of {directory} lacks "
            f"{format_bytes(extra - sizing.free)}. Enlarge it (a memory emptyDir's sizeLimit "
            "for /dev/shm) or point PEER_RECOVERY_SNAPSHOT_DIR elsewhere."
        )
    if limit is not None and sizing.need > limit:
        return False, (
            f"{line}: the pod's memory limit cannot hold two snapshot copies; raise the "
            "container's memory limit by at least "
            f"{format_bytes(sizing.need - limit + (sizing.memory_used or 0))}."
        )
    if limit is not None and sizing.memory_used is not None and extra + sizing.memory_used > limit:
        return False, (
            f"{line}: with {format_bytes(sizing.memory_used)} already in use the slots would "
            f"exceed the pod's memory limit by {format_bytes(extra + sizing.memory_used - limit)}."
        )
    return True, f"{line}: ok"


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    if text == "max" or not text.isdigit():
        return None
    value = int(text)
    return None if value >= _UNLIMITED else value


def _cgroup_memory(cgroup_root: Path) -> tuple[int | None, int | None]:
    """(limit, usage) of this process's memory cgroup; v2 first, then v1."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        hierarchy, controllers, rel = [*line.split(":", 2), "", ""][:3]
        if hierarchy == "0" and controllers == "":
            base = cgroup_root / rel.lstrip("/")
            limit = _read_int(base / "memory.max")
            if limit is not None or (base / "memory.max").exists():
                return limit, _read_int(base / "memory.current")
    for line in lines:
        _, controllers, rel = [*line.split(":", 2), "", ""][:3]
        if "memory" in controllers.split(","):
            for base in (cgroup_root / "memory" / rel.lstrip("/"), cgroup_root / "memory"):
                if (base / "memory.limit_in_bytes").exists():
                    return _read_int(base / "memory.limit_in_bytes"), _read_int(
                        base / "memory.usage_in_bytes"
                    )
    return None, None


def probe(
    directory: Path, need: int, already_allocated: int, cgroup_root: Path = Path("/sys/fs/cgroup")
) -> Sizing:
    """Read the free space of ``directory``'s filesystem and the pod's memory limit."""
    stat = os.statvfs(directory)
    limit, used = _cgroup_memory(cgroup_root)
    return Sizing(need, already_allocated, stat.f_bavail * stat.f_frsize, limit, used)
