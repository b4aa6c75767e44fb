"""Every transport error provoked for real between processes over gloo.

Cases that leave a process group broken run on a fresh subgroup each (``dist.new_group``);
the world group, used only for barriers, stays healthy.
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

import pytest
import torch
import torch.distributed as dist

from peer_recovery.transport import (
    IntegrityError,
    MetadataError,
    PGTransport,
    StepMismatchError,
    TransferError,
    TransferTimeout,
)
from tests._multiproc import run_ranks
from tests.transport._faults import FaultyPG

pytestmark = pytest.mark.multiproc

CPU = torch.device("cpu")
SHORT = 1.5  # seconds: the transport timeout of cases that must time out
MARGIN = 10.0  # generous bound on "timeout plus a small margin" on a loaded machine
TINY = {"bucket_bytes": 4096, "chunk_bytes": 1024, "small_bytes": 512}


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(3)
    return {
        "small": [torch.randn(16, generator=g) for _ in range(40)],  # several tiny buckets
        "large": torch.randn(64, 64, generator=g),  # 16 KB: chunked
    }


def _expect(exc_type: type[BaseException], fn: Any, **match: Any) -> BaseException:
    with pytest.raises(exc_type) as info:
        fn()
    for attr, want in match.items():
        assert want in str(getattr(info.value, attr)), (attr, str(info.value))
    return info.value


def _timeouts(rank: int, world: int) -> list[str]:
    done = []
    # 1. The sender never sends: the receiver times out waiting for the header.
    pg = dist.new_group()
    if rank == 1:
        t0 = time.monotonic()
        err = _expect(TransferTimeout, lambda: PGTransport(pg, SHORT, CPU).recv_checkpoint(0))
        assert err.peer == 0 and err.stage == "header"
        assert time.monotonic() - t0 < SHORT + MARGIN
        done.append("silent sender")
    dist.barrier()
    # 2. The receiver never receives: the sender times out (header or acknowledgement).
    pg = dist.new_group()
    if rank == 0:
        t0 = time.monotonic()
        _expect(TransferTimeout, lambda: PGTransport(pg, SHORT, CPU).send_checkpoint([1], _state()))
        assert time.monotonic() - t0 < 2 * SHORT + MARGIN
        done.append("silent receiver")
    dist.barrier()
    # 3. The sender stalls mid-stream (sleeps before data message 3).
    pg = dist.new_group()
    if rank == 0:
        slow = FaultyPG(pg, at=3, action="sleep", seconds=3 * SHORT)
        with pytest.raises(TransferError):  # the receiver is gone when it wakes up
            PGTransport(slow, SHORT, CPU, **TINY).send_checkpoint([1], _state())
    else:
        t0 = time.monotonic()
        err = _expect(
            TransferTimeout, lambda: PGTransport(pg, SHORT, CPU, **TINY).recv_checkpoint(0)
        )
        assert err.peer == 0 and "data message" in err.stage and err.key_path
        assert time.monotonic() - t0 < SHORT + MARGIN
        done.append("stalled sender")
    dist.barrier()
    return done


def test_stalled_or_silent_peers_time_out() -> None:
    results = run_ranks(_timeouts, 2, timeout=120)
    assert results == [["silent receiver"], ["silent sender", "stalled sender"]]


def _killed(rank: int, world: int) -> str | None:
    # Pair (0 -> 1): the sender dies at data message 2. Pair (2 -> 3): the receiver dies.
    timeout = 60.0
    state = _state()
    if rank == 0:
        PGTransport(
            FaultyPG(dist.group.WORLD, at=2, action="kill"), timeout, CPU, **TINY
        ).send_checkpoint([1], state)
    if rank == 3:
        PGTransport(
            FaultyPG(dist.group.WORLD, at=2, action="kill"), timeout, CPU, **TINY
        ).recv_checkpoint(2)
    t0 = time.monotonic()
    transport = PGTransport(dist.group.WORLD, timeout, CPU, **TINY)
    if rank == 1:
        call = lambda: transport.recv_checkpoint(0)  # noqa: E731
    else:
        call = lambda: transport.send_checkpoint([3], state)  # noqa: E731
    err = _expect(TransferError, call)
    assert not isinstance(err, TransferTimeout), err  # a dead peer is seen, not waited out
    assert time.monotonic() - t0 < timeout
    assert err.peer == (0 if rank == 1 else 3)
    return type(err).__name__


def test_peer_killed_mid_stream_is_a_transfer_error() -> None:
    results = run_ranks(_killed, 4, timeout=120, may_die=(0, 3))
    assert results == [None, "TransferError", "TransferError", None]


def _integrity_and_step(rank: int, world: int) -> list[str]:
    done = []
    # 1. A byte flipped in a chunk of 'large' (messages 0-15), then in the one bucket of
    # 'small' (message 16): a bucket is checked before it is unpacked into the targets.
    targets = {"small": [torch.zeros(16) for _ in range(40)], "large": torch.zeros(64, 64)}
    for at, where in ((3, "['large']"), (16, "['small'][0]..['small'][39]")):
        pg = dist.new_group()
        if rank == 0:
            flip = FaultyPG(pg, at=at, action="flip")
            with contextlib.suppress(TransferError):  # the receiver stops after the bad message
                PGTransport(flip, SHORT, CPU, integrity=True, **TINY).send_checkpoint([1], _state())
        else:
            t = PGTransport(pg, SHORT, CPU, lambda: targets, integrity=True, **TINY)
            err = _expect(IntegrityError, lambda t=t: t.recv_checkpoint(0), key_path=where)
            assert err.peer == 0 and "data message" in err.stage
            assert all(not x.any() for x in targets["small"])
            done.append(f"flip {where}")
        dist.barrier()
    # 2. Step mismatch: both sides raise, and the in-place target is untouched.
    target = torch.zeros(64, 64)
    ptr = target.data_ptr()
    for sender_step in (4, None):
        pg = dist.new_group()
        if rank == 0:
            err = _expect(
                StepMismatchError,
                lambda s=sender_step, pg=pg: PGTransport(pg, 30, CPU).send_checkpoint(
                    [1], {"w": torch.ones(64, 64)}, step=s
                ),
            )
            assert err.peer == 1 and "receiver wants 5" in str(err)
        else:
            t = PGTransport(pg, 30, CPU, lambda: {"w": target})
            err = _expect(StepMismatchError, lambda t=t: t.recv_checkpoint(0, step=5))
            assert f"sender is at step {sender_step}" in str(err)
            assert target.data_ptr() == ptr and not target.any()
            done.append(f"step {sender_step}")
        dist.barrier()
    # 3. An in-place target of another shape: both sides raise, naming the key.
    pg = dist.new_group()
    if rank == 0:
        _expect(
            MetadataError,
            lambda: PGTransport(pg, 30, CPU).send_checkpoint([1], {"opt": {0: torch.ones(3)}}),
        )
    else:
        t = PGTransport(pg, 30, CPU, lambda: {"opt": {0: torch.zeros(4)}})
        _expect(MetadataError, lambda: t.recv_checkpoint(0), key_path="['opt'][0]")
        done.append("shape")
    dist.barrier()
    return done


def test_flipped_byte_step_mismatch_and_bad_target() -> None:
    _, done = run_ranks(_integrity_and_step, 2, timeout=120)
    assert done[2:] == ["step 4", "step None", "shape"]
    assert done[:2] == ["flip ['large']", "flip ['small'][0]..['small'][39]"]


def test_unencodable_leaves_are_refused_at_the_sender_naming_the_key() -> None:
    from collections import namedtuple

    import numpy as np

    point = namedtuple("point", "x y")
    cases = {
        "['a']['b'][1]": {"a": {"b": [1, object()]}},
        "['np']": {"np": np.float32(1.0)},
        "['nt']": {"nt": point(1, 2)},
        "[(1, 2)]": {(1, 2): 3},
        "['sparse']": {"sparse": torch.eye(3).to_sparse()},
        "['q']": {"q": torch.quantize_per_tensor(torch.ones(2), 0.1, 0, torch.qint8)},
        "['fn']": {"fn": lambda: None},
    }
    transport = PGTransport(None, 1, CPU)  # refused before the process group is touched
    for key, state in cases.items():
        err = _expect(MetadataError, lambda s=state: transport.send_checkpoint([1], s))
        assert err.key_path == key, (key, str(err))
        assert err.stage in (None, "encode")
