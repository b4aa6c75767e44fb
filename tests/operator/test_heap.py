"""The operator's garbage-collector settling (peer_recovery_operator.heap), in this process.

Every test thaws what it froze, so the rest of the suite's process is left as it was.
"""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator

import pytest

from peer_recovery_operator.heap import (
    _freeze_survivors,
    freeze_after_full_passes,
    settle,
    stop_freezing,
)


class Node:
    """A tracked object that can take part in a reference cycle."""

    def __init__(self) -> None:
        self.other: Node | None = None


@pytest.fixture(autouse=True)
def thawed() -> Iterator[None]:
    yield
    stop_freezing()
    gc.unfreeze()


def test_settle_freezes_live_objects_so_a_full_pass_no_longer_walks_them() -> None:
    kept = [Node() for _ in range(5_000)]
    frozen = settle()
    assert frozen >= len(kept)
    assert gc.get_freeze_count() == frozen
    ids = {id(node) for node in kept}
    assert not ids & {id(obj) for obj in gc.get_objects()}  # out of every generation


def test_settle_frees_unreachable_cycles_before_freezing_so_none_is_kept_forever() -> None:
    gc.disable()  # no automatic pass may free it first
    try:
        a, b = Node(), Node()
        a.other, b.other = b, a
        gone = weakref.ref(a)
        del a, b  # unreachable, but only the collector can free a cycle
        assert gone() is not None
        settle()
        assert gone() is None
    finally:
        gc.enable()


def test_a_frozen_object_is_still_freed_when_its_last_reference_goes() -> None:
    node = Node()
    gone = weakref.ref(node)
    settle()
    before = gc.get_freeze_count()
    del node
    assert gone() is None
    assert gc.get_freeze_count() == before - 1


def test_after_a_full_pass_its_survivors_are_frozen_and_a_young_pass_freezes_nothing() -> None:
    freeze_after_full_passes()
    kept = [Node() for _ in range(5_000)]
    before = gc.get_freeze_count()
    gc.collect(0)
    assert gc.get_freeze_count() == before  # a young pass is cheap already
    gc.collect()  # a full pass, as CPython starts one on its own
    assert gc.get_freeze_count() >= before + len(kept)
    assert not {id(node) for node in kept} & {id(obj) for obj in gc.get_objects()}


def test_freezing_is_installed_once_and_stops_when_asked() -> None:
    freeze_after_full_passes()
    freeze_after_full_passes()
    assert sum(callback is _freeze_survivors for callback in gc.callbacks) == 1
    stop_freezing()
    assert _freeze_survivors not in gc.callbacks
    kept = [Node() for _ in range(1_000)]
    before = gc.get_freeze_count()
    gc.collect()
    assert gc.get_freeze_count() == before
    assert {id(node) for node in kept} <= {id(obj) for obj in gc.get_objects()}
