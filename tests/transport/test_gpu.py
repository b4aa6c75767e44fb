"""CUDA cases: GPU state over gloo (pinned staging) and in place into GPU memory.

Skipped where CUDA is absent; ``benchmarks/gpu_smoke.py`` covers the same ground (and NCCL
with two GPUs) as a standalone script for a lent GPU machine.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch
import torch.distributed as dist

from peer_recovery.transport import PGTransport
from tests._multiproc import run_ranks
from tests.transport._cases import tensor_bytes

pytestmark = [
    pytest.mark.multiproc,
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]

TINY = {"bucket_bytes": 4096, "chunk_bytes": 1024, "small_bytes": 512}


def _cuda_round_trip(rank: int, world: int) -> list[str]:
    device = torch.device("cuda", 0)
    pg = dist.group.WORLD
    g = torch.Generator().manual_seed(0)
    state = {
        "big": torch.randn(64, 64, generator=g).to(device),
        "nc": torch.randn(32, 48, generator=g).to(device).t(),
        "small": [torch.randn(5, generator=g).to(device) for _ in range(20)],
        "cpu": torch.arange(10),
    }
    done = []
    for sizes in ({}, TINY):
        if rank == 0:
            PGTransport(pg, timedelta(seconds=60), device, **sizes).send_checkpoint([1], state)
            PGTransport(pg, timedelta(seconds=60), device, **sizes).send_checkpoint([1], state)
            continue
        got = PGTransport(pg, timedelta(seconds=60), device, **sizes).recv_checkpoint(0)
        assert got["big"].device.type == "cuda" and got["cpu"].device.type == "cuda"
        assert tensor_bytes(got["nc"]) == tensor_bytes(state["nc"])
        targets = {
            k: (torch.zeros_like(v) if k != "small" else [torch.zeros_like(x) for x in v])
            for k, v in state.items()
        }
        ptr = targets["nc"].data_ptr()
        got = PGTransport(
            pg, timedelta(seconds=60), device, lambda t=targets: t, **sizes
        ).recv_checkpoint(0)
        assert got["nc"] is targets["nc"] and got["nc"].data_ptr() == ptr
        # a target on another device type is not written in place (as upstream): fresh on GPU
        assert got["cpu"] is not targets["cpu"] and got["cpu"].device.type == "cuda"
        for key in ("big", "nc", "cpu"):
            assert tensor_bytes(got[key]) == tensor_bytes(state[key]), key
        done.append("tiny" if sizes else "default")
    return done


def test_cuda_tensors_over_gloo_fresh_and_in_place() -> None:
    assert run_ranks(_cuda_round_trip, 2, timeout=180)[1] == ["default", "tiny"]
