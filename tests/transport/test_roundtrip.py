"""Round trips between two real processes over gloo, compared with PyTorch's own transport.

Each test spawns one pair of processes and runs all its cases on that process group.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.checkpoint._pg_transport import PGTransport as UpstreamTransport

from peer_recovery.transport import PGTransport
from tests._multiproc import run_ranks
from tests.transport._cases import (
    assert_same,
    dtype_state,
    leaf_state,
    optimizer_state,
    tensor_bytes,
    view_state,
)

pytestmark = pytest.mark.multiproc

TIMEOUT = timedelta(seconds=60)
CPU = torch.device("cpu")
# Tiny buckets and chunks so that a few KB exercise every path: several buckets, multi-chunk
# payloads, non-contiguous chunked payloads.
TINY = {"bucket_bytes": 4096, "chunk_bytes": 1024, "small_bytes": 512}
CASES = {
    "dtypes": dtype_state,
    "views": view_state,
    "leaves": leaf_state,
    "optimizer": optimizer_state,
}


def _same_as_upstream(rank: int, world: int) -> list[str]:
    pg = dist.group.WORLD
    done = []
    for name, build in CASES.items():
        state = build()
        upstream = UpstreamTransport(pg, TIMEOUT, CPU)
        for sizes in ({}, TINY):
            ours = PGTransport(pg, TIMEOUT, CPU, **sizes)
            if rank == 0:
                ours.send_checkpoint([1], state)
                continue
            got = ours.recv_checkpoint(0)
            assert_same(got, state, name)
            if name == "views":
                expected = sum(t.numel() * t.element_size() for t in state.values())
                storage = sum(t.untyped_storage().nbytes() for t in state.values())
                assert ours.stats.payload_bytes == expected
                assert ours.stats.bytes < expected + 4096 < storage
            done.append(f"{name}{'/tiny' if sizes else ''}")
        if rank == 0:
            upstream.send_checkpoint([1], state)
        else:
            theirs = upstream.recv_checkpoint(0)
            if name == "leaves":  # upstream's pytree turns a torch.Size leaf into a tuple
                assert type(theirs["size"]) is tuple and type(got["size"]) is torch.Size
                theirs["size"] = torch.Size(theirs["size"])
            assert_same(got, theirs, f"{name} vs upstream")
    return done


def test_same_result_as_upstream_for_every_case() -> None:
    _, done = run_ranks(_same_as_upstream, 2, timeout=180)
    assert done == [f"{n}{s}" for n in CASES for s in ("", "/tiny")]


def _targets() -> dict[str, Any]:
    return {
        "big": torch.zeros(64, 64),
        "noncontig": torch.zeros(48, 64).t(),
        "param": torch.nn.Parameter(torch.zeros(300)),
        "bf16": torch.zeros(3, dtype=torch.bfloat16),
        "scalar": torch.zeros((), dtype=torch.complex64),
        "nested": {"opt": [torch.zeros(5, dtype=torch.int64)]},
    }


def _sender_state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(1)
    state = {
        "big": torch.randn(64, 64, generator=g),
        "noncontig": torch.randn(64, 48, generator=g),  # contiguous on the sender
        "param": torch.nn.Parameter(torch.randn(300, generator=g)),
        "bf16": torch.randn(3, generator=g).bfloat16(),
        "scalar": torch.tensor(1.5 - 2j, dtype=torch.complex64),
        "nested": {"opt": [torch.arange(5)]},
        "only_on_sender": torch.ones(7),
    }
    return state


def _in_place(rank: int, world: int) -> list[str]:
    pg = dist.group.WORLD
    done = []
    for sizes in ({}, TINY):
        state = _sender_state()
        if rank == 0:
            PGTransport(pg, TIMEOUT, CPU, **sizes).send_checkpoint([1], state, step=7)
            continue
        targets = _targets()
        ptrs = {k: v.data_ptr() for k, v in targets.items() if isinstance(v, torch.Tensor)}
        nested = targets["nested"]["opt"][0]
        seen: list[tuple[int, int]] = []
        transport = PGTransport(
            pg,
            TIMEOUT,
            CPU,
            lambda t=targets: t,
            progress=lambda d, t, seen=seen: seen.append((d, t)),
            **sizes,
        )
        got = transport.recv_checkpoint(0, step=7)
        for key, ptr in ptrs.items():
            assert got[key] is targets[key], key
            assert got[key].data_ptr() == ptr, key
        assert got["nested"]["opt"][0] is nested
        assert got["noncontig"].stride() == (1, 64)  # the target keeps its own layout
        assert got["param"].requires_grad and isinstance(got["param"], torch.nn.Parameter)
        assert_same(
            {k: v.detach().contiguous() for k, v in got.items() if k != "nested"},
            {k: v.detach() for k, v in state.items() if k != "nested"},
        )
        assert tensor_bytes(nested) == tensor_bytes(state["nested"]["opt"][0])
        total = transport.stats.payload_bytes
        assert seen and seen[-1] == (total, total)
        assert [d for d, _ in seen] == sorted(d for d, _ in seen)
        done.append("tiny" if sizes else "default")
    return done


def test_in_place_receive_keeps_storage_and_gets_values() -> None:
    assert run_ranks(_in_place, 2, timeout=120)[1] == ["default", "tiny"]


def _parameters(rank: int, world: int) -> str:
    pg = dist.group.WORLD
    state = {
        "w": torch.nn.Parameter(torch.randn(4, 4)),
        "frozen": torch.nn.Parameter(torch.ones(3), requires_grad=False),
    }
    if rank == 0:
        with pytest.raises(AssertionError):  # upstream refuses parameters
            UpstreamTransport(pg, TIMEOUT, CPU).send_checkpoint([1], state)
        PGTransport(pg, TIMEOUT, CPU).send_checkpoint([1], state)
        return "sent"
    got = PGTransport(pg, TIMEOUT, CPU).recv_checkpoint(0)
    assert type(got["w"]) is torch.nn.Parameter and got["w"].requires_grad
    assert type(got["frozen"]) is torch.nn.Parameter and not got["frozen"].requires_grad
    assert tensor_bytes(got["frozen"]) == tensor_bytes(torch.ones(3))
    return "received"


def test_parameters_round_trip_where_upstream_raises() -> None:
    assert run_ranks(_parameters, 2, timeout=60) == ["sent", "received"]
