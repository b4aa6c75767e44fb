"""DTensor leaves in the snapshot tree and the shard key: layout, position, digest.

The pure parts run in this process; flattening real DTensors (``distribute_tensor`` on a
CPU DeviceMesh, as tensor parallelism lays them out) runs in 2 real gloo processes.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from peer_recovery.shard_key import ShardKey, state_digest
from tests._multiproc import run_ranks

TENSORS = [("w", "float32", (2, 4))]


def test_layouts_enter_the_digest_and_a_state_without_them_keeps_its_digest() -> None:
    plain = state_digest(TENSORS, ["lr"])
    assert state_digest(TENSORS, ["lr"], ()) == plain
    first = {"mesh": [2], "dims": ["tp"], "placements": [["shard", 0]], "shape": [4, 4],
             "offset": [0, 0]}  # fmt: skip
    second = {**first, "offset": [2, 0]}
    a = state_digest(TENSORS, ["lr"], [("w", first)])
    assert a not in (plain, state_digest(TENSORS, ["lr"], [("w", second)]))


def test_a_position_derived_from_the_mesh_joins_the_given_one_and_must_agree() -> None:
    given = ShardKey.make_position({"pp": 1})
    assert ShardKey.merge_position(given, {"tp": 0}) == (("pp", 1), ("tp", 0))
    assert ShardKey.merge_position(given, {"pp": 1}) == given
    with pytest.raises(ValueError, match=r"position pp=1 was given.*pp=0"):
        ShardKey.merge_position(given, {"pp": 0})


def _flatten_dtensors(rank: int, world: int) -> dict[str, Any]:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    from peer_recovery.snapshots.tree import flatten, unflatten

    mesh = init_device_mesh("cpu", (world,), mesh_dim_names=("tp",))
    full = torch.arange(12.0).reshape(6, 2)
    state = {
        "col": distribute_tensor(full, mesh, [Shard(0)]),
        "rep": distribute_tensor(torch.ones(3), mesh, [Replicate()]),
        "n": 1,
    }
    flat = flatten(state)
    rebuilt = unflatten(flat.tree, flat.leaves)
    stored_form = unflatten(flat.tree, flat.tensors)
    refused = ""
    try:
        unflatten(["dtensor", 0], flat.tensors)  # read from disk: no layout
    except ValueError as error:
        refused = str(error)
    return {
        "position": flat.position,
        "layouts": sorted(flat.layouts.values(), key=str),
        "local": flat.tensors[0].tolist(),
        "rebuilt_is_live": rebuilt["col"] is state["col"] and rebuilt["n"] == 1,
        "stored_is_plain": type(stored_form["col"]) is torch.Tensor,
        "refused": refused,
    }


@pytest.mark.multiproc
def test_dtensors_are_stored_as_local_shards_with_their_layout() -> None:
    outcomes = run_ranks(_flatten_dtensors, 2, timeout=300)
    for rank, outcome in enumerate(outcomes):
        assert outcome["position"] == {"tp": rank}  # the replicated one adds nothing
        col = {"mesh": [2], "dims": ["tp"], "placements": [["shard", 0]], "shape": [6, 2],
               "offset": [3 * rank, 0]}  # fmt: skip
        rep = {"mesh": [2], "dims": ["tp"], "placements": [["replicate"]], "shape": [3],
               "offset": [0]}  # fmt: skip
        assert outcome["layouts"] == sorted([col, rep], key=str)
        assert outcome["local"] == [[6.0 * rank + 2 * i, 6.0 * rank + 2 * i + 1] for i in range(3)]
        assert outcome["rebuilt_is_live"] and outcome["stored_is_plain"]
        assert "malformed dtensor node" in outcome["refused"], outcome["refused"]
