"""Keep the garbage collector's full passes off the operator's long-lived objects.

CPython's full (generation-2) collection walks every tracked object while it holds the GIL,
so it stalls the event loop and every thread. The operator's tracked objects are nearly
all long-lived: what its imports built (the Kubernetes client, kopf, aiohttp, pydantic:
some 100,000 objects) and its records of pods and PeerRecoveries. With a 1,024-pod job and
10,000 finished PeerRecoveries a full pass walked about 250,000 objects and took 120-230 ms
on the 2-core test machine; one landing during a round delayed that replacement's record by
as much (``benchmarks/operator_latency.py``, docs/operator.md).

A frozen object (``gc.freeze``) is never walked again and is still freed when its last
reference goes; only a reference cycle running through it would outlive it. So the process
collects and freezes once at start-up, and after every full pass it freezes what the pass
found alive. A full pass then walks only what was promoted since the last one, and CPython
starts one when that exceeds a quarter of what the last pass walked, so passes stay small
(a few milliseconds) however large the state grows. The operator's own records hold no
cycles; the gauge ``peer_recovery_gc_frozen_objects`` shows the frozen part following the
state's size.
"""

from __future__ import annotations

import gc
from typing import Any

__all__ = ["freeze_after_full_passes", "settle", "stop_freezing"]


def settle() -> int:
    """Collect what is not frozen, freeze what survived; return how many objects are frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _freeze_survivors(phase: str, info: dict[str, Any]) -> None:
    # Runs inside the collector: it must not allocate much, take locks or raise. At the end
    # of a full pass the younger generations are empty, so this moves only the survivors.
    if phase == "stop" and info["generation"] == 2:
        gc.freeze()


def freeze_after_full_passes() -> int:
    """Settle now and freeze the survivors of every later full pass (idempotent); returns
    how many objects are frozen."""
    if _freeze_survivors not in gc.callbacks:
        gc.callbacks.append(_freeze_survivors)
    return settle()


def stop_freezing() -> None:
    """Stop freezing after full passes (what is frozen stays frozen)."""
    while _freeze_survivors in gc.callbacks:
        gc.callbacks.remove(_freeze_survivors)
