"""FSDP2 (``fully_shard``) state registered as it is: DTensors in the model's and the
optimizer's state dicts, on a CPU HSDP mesh over gloo in 4 real processes.

Rank r sits at (replicate r // 2, shard r % 2): ranks 0 and 2 hold shard 0, ranks 1 and 3
shard 1, and the shards have the same shapes. The shard key's position comes from the mesh
and placements (no ``position`` argument), so a receiver told to take its state from a rank
of the other shard refuses it (the sender's key travels with the bytes) and is put back
bitwise; from the rank holding its shard it restores exactly that rank's snapshot.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests._multiproc import run_ranks

pytestmark = [pytest.mark.multiproc, pytest.mark.slow]


def _build(seed: int, out: int = 3) -> tuple[Any, Any, Any]:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(
        "cpu", (dist.get_world_size() // 2, 2), mesh_dim_names=("replicate", "shard")
    )
    torch.manual_seed(seed)
    # out=3: shard 1 of the last layer is shorter (uneven); out=4: shards of equal shapes.
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, out))
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1), mesh


def _train(model: Any, optim: Any, step: int) -> None:
    import torch.distributed as dist

    gen = torch.Generator().manual_seed(100 * step + dist.get_rank())
    model(torch.randn(4, 8, generator=gen)).pow(2).mean().backward()
    optim.step()
    optim.zero_grad()


def _hash(model: Any, optim: Any) -> str:
    from peer_recovery.demo.train import state_hash

    return state_hash(model, optim)


class DcpOptimizerState:
    """The optimizer as ``torch.distributed.checkpoint`` sees it: parameters by name."""

    def __init__(self, model: Any, optim: Any) -> None:
        self.model, self.optim = model, optim

    def state_dict(self) -> Any:
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(self.model, self.optim)

    def load_state_dict(self, state: Any) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        set_optimizer_state_dict(self.model, self.optim, state)


def _recovery(rank: int, world: int, root: str, model: Any, optim: Any, dcp: bool = False) -> Any:
    from peer_recovery.recovery import PeerRecovery

    optim_state = DcpOptimizerState(model, optim) if dcp else optim
    return PeerRecovery({"model": model, "optim": optim_state}, directory=root, rank=rank,
                        world_size=world, async_snapshot=False, vote_timeout_s=60)  # fmt: skip


def _local_restore(rank: int, world: int, root: str, dcp: bool) -> dict[str, Any]:
    model, optim, _ = _build(0)
    recovery = _recovery(rank, world, root, model, optim, dcp)
    for step in (1, 2):
        _train(model, optim, step)
    recovery.snapshot(2)
    at_snapshot = _hash(model, optim)
    key = recovery.manifests()[0].shard_key
    _train(model, optim, 3)
    trained_on = _hash(model, optim)
    same_objects = recovery.restore()
    back = _hash(model, optim)
    fresh_model, fresh_optim, _ = _build(7)  # a restarted process: other values, no state
    fresh = _recovery(rank, world, root, fresh_model, fresh_optim, dcp).restore()
    return {
        "position": key.position,
        "moved": trained_on != at_snapshot,
        "same_objects": None if same_objects is None else same_objects.step,
        "back": back == at_snapshot,
        "fresh": None if fresh is None else fresh.step,
        "fresh_equal": _hash(fresh_model, fresh_optim) == at_snapshot,
    }


@pytest.mark.parametrize("dcp", [False, True], ids=["optimizer", "get_optimizer_state_dict"])
def test_fsdp2_state_as_is_snapshots_and_restores_locally(tmp_path: Path, dcp: bool) -> None:
    outcomes = run_ranks(_local_restore, 4, str(tmp_path), dcp, timeout=400)
    for rank, outcome in enumerate(outcomes):
        assert outcome["position"] == (("shard", rank % 2),), rank
        assert outcome["moved"], rank
        assert outcome["same_objects"] == 2 and outcome["back"], (rank, outcome)
        assert outcome["fresh"] == 2 and outcome["fresh_equal"], (rank, outcome)


class _AdoptMetadata:
    """The transport with module ``_metadata`` adopted from the receiver's template, as
    the round's transport does (``peer_recovery.peer_restore``)."""

    def __init__(self, inner: Any, template: Any) -> None:
        self.inner, self.template = inner, template

    def send_checkpoint(self, *args: Any, **kwargs: Any) -> None:
        self.inner.send_checkpoint(*args, **kwargs)

    def recv_checkpoint(self, src: int, *, step: int | None = None) -> Any:
        from peer_recovery.peer_restore import _adopt_metadata

        received = self.inner.recv_checkpoint(src, step=step)
        _adopt_metadata(received, self.template())
        return received


def _peer_restore(rank: int, world: int, root: str, plans: list[dict[int, Any]]) -> dict[str, Any]:
    import torch.distributed as dist

    from peer_recovery.rank_plan import RankPlan
    from peer_recovery.transport import PGTransport

    model, optim, _ = _build(0, out=4)
    recovery = _recovery(rank, world, root, model, optim)
    for step in (1, 2):
        _train(model, optim, step)
    recovery.snapshot(2)
    at_snapshot = _hash(model, optim)
    fresh_model, fresh_optim, _ = _build(10 + rank, out=4)  # restarted: other values
    restorer = _recovery(rank, world, root, fresh_model, fresh_optim)
    outcomes = []
    for attempt in plans:
        plan = RankPlan(**attempt[rank])
        transport = None
        if plan.receive_from is not None or plan.send_to:
            inner = PGTransport(dist.group.WORLD, 60, torch.device("cpu"),
                                state_dict=restorer.template)  # fmt: skip
            transport = _AdoptMetadata(inner, restorer.template)
        before = _hash(fresh_model, fresh_optim)
        # A checkpoint at step 2: the refused attempt voids only snapshots newer than it
        # (restore() returning None voids what is newer than the checkpoint).
        result = restorer.restore(2, plan=plan, transport=transport)
        outcomes.append({
            "step": None if result is None else result.step,
            "unchanged": _hash(fresh_model, fresh_optim) == before,
            "why": restorer.last_failure,
            "hash": _hash(fresh_model, fresh_optim),
        })  # fmt: skip
    return {"at_snapshot": at_snapshot, "outcomes": outcomes}


def test_a_receiver_refuses_the_shard_of_another_rank_and_takes_its_own(tmp_path: Path) -> None:
    # Shards have equal shapes: before shard keys came from the mesh, the default position
    # made every rank a holder of every shard, and rank 3 loaded rank 0's shard.
    wrong = {0: {"step": 2, "send_to": (3,)}, 1: {"step": 2}, 2: {"step": 2},
             3: {"step": 2, "receive_from": 0}}  # fmt: skip
    right = {0: {"step": 2, "send_to": (2,)}, 1: {"step": 2}, 2: {"step": 2, "receive_from": 0},
             3: {"step": 2}}  # fmt: skip
    results = run_ranks(_peer_restore, 4, str(tmp_path), [wrong, right], timeout=400)
    snapshots = [r["at_snapshot"] for r in results]
    assert snapshots[0] == snapshots[2] != snapshots[1] == snapshots[3]  # two shards
    for rank, result in enumerate(results):
        refused, taken = result["outcomes"]
        assert refused["step"] is None and refused["unchanged"], (rank, refused)
        assert "1 of 4 ranks failed" in refused["why"], refused["why"]
        assert taken["step"] == 2, (rank, taken)
        assert taken["hash"] == snapshots[rank], rank  # rank 2: rank 0's snapshot
    refusal = results[3]["outcomes"][0]["why"]
    assert "another shard" in refusal and "parallel position" in refusal, refusal
