"""``peer_recovery.transport.torch_compat``, the transport's private torch APIs, against the
torch installed: ``make test`` runs this on the newest supported release, ``make
test-compat`` on the oldest, so each end of the runtime extra's range is checked. Each
wrapper is compared with what torch's public (collective) API builds."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
import tomllib
import torch
import torch.distributed as dist
from packaging.requirements import Requirement
from packaging.version import Version
from torch.distributed._shard.sharded_tensor import init_from_local_shards
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard, distribute_tensor

from peer_recovery.transport import torch_compat as compat
from tests._multiproc import run_ranks

REPO = Path(__file__).resolve().parents[2]
RUNNING = Version(torch.__version__.split("+")[0])


def torch_range() -> Requirement:
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    (spec,) = [r for r in extras["optional-dependencies"]["runtime"] if r.startswith("torch")]
    return Requirement(spec)


def makefile_pins() -> dict[str, str]:
    text = (REPO / "Makefile").read_text()
    return dict(re.findall(r"^(TORCH_NEWEST|TORCH_OLDEST) := (\S+)$", text, re.MULTILINE))


def test_the_runs_cover_both_ends_of_the_supported_range() -> None:
    """The oldest pin is the range's lower bound, the newest is inside it, and this run uses
    the release its make target pins (PEER_RECOVERY_EXPECT_TORCH, set by the Makefile)."""
    spec, pins = torch_range().specifier, makefile_pins()
    oldest, newest = Version(pins["TORCH_OLDEST"]), Version(pins["TORCH_NEWEST"])
    assert f">={oldest}" in {str(s) for s in spec}
    assert oldest < newest and spec.contains(oldest) and spec.contains(newest)
    assert RUNNING in spec, f"torch {RUNNING} is outside the supported range {spec}"
    expected = os.environ.get("PEER_RECOVERY_EXPECT_TORCH")
    if expected:
        assert Version(expected) == RUNNING, f"this run should use torch {expected}"


def _wrappers(rank: int, world: int) -> dict[str, Any]:
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    full = torch.arange(48.0).reshape(8, 6)
    public = distribute_tensor(full, mesh, [Replicate(), Shard(0)])
    found: dict[str, Any] = {}

    # The local tensor is the DTensor's own storage.
    found["local"] = compat.local_tensor(public).data_ptr() == public.to_local().data_ptr()

    # Groups are found by their ranks; a set of ranks with no group finds none.
    coord = compat.mesh_coordinate(mesh)
    assert coord is not None
    found["world"] = compat.group_with_ranks(list(range(world))) is not None
    found["none"] = compat.group_with_ranks([3, 0]) is None
    groups = []
    for dim in range(2):  # this rank's row and column of the mesh
        index: list[Any] = list(coord)
        index[dim] = slice(None)
        group = compat.group_with_ranks(mesh.mesh[tuple(index)].tolist())
        found[f"group {dim}"] = group is not None
        groups.append(group)

    # A mesh over those groups matches init_device_mesh's, and its groups work.
    rebuilt = compat.mesh_from_groups(groups, "cpu", mesh.mesh, ("dp", "tp"))
    found["coordinate"] = compat.mesh_coordinate(rebuilt) == coord
    found["mesh"] = rebuilt.mesh.tolist() == mesh.mesh.tolist()

    # A DTensor rebuilt from its local tensor and spec equals the public one, in full.
    again = compat.dtensor_from_spec(
        public.to_local().clone(), rebuilt, public.placements, public.shape, public.stride(),
        requires_grad=False,
    )  # fmt: skip
    found["dtensor"] = torch.equal(again.full_tensor(), full)

    # A ShardedTensor from known global metadata equals the one the all-gather builds.
    meta = compat.ShardMetadata([2 * rank, 0], [2, 6], f"rank:{rank}/cpu")
    gathered = init_from_local_shards([compat.StShard(full[2 * rank : 2 * rank + 2], meta)],
                                      [8, 6])  # fmt: skip
    rebuilt_st = compat.sharded_from_metadata(
        [compat.StShard(full[2 * rank : 2 * rank + 2].clone(), meta)], gathered.metadata()
    )
    found["sharded"] = (
        type(rebuilt_st) is compat.ShardedTensor
        and rebuilt_st.metadata() == gathered.metadata()
        and torch.equal(rebuilt_st.local_shards()[0].tensor, full[2 * rank : 2 * rank + 2])
    )
    dist.barrier()
    return found


@pytest.mark.multiproc
def test_each_wrapper_against_the_public_api() -> None:
    results = run_ranks(_wrappers, 4, timeout=180)
    for rank, found in enumerate(results):
        failed = sorted(name for name, ok in found.items() if ok is not True)
        assert not failed, f"rank {rank} on torch {RUNNING}: {failed}"
