"""Fresh optimizer state: the meta dry run gives what a real step gives, and a restore into a
never-stepped optimizer builds its state from the slot, bitwise, without running a step."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from peer_recovery.optim_state import _step_with_zero_lr, materialize, meta_layout
from peer_recovery.recovery import PeerRecovery
from peer_recovery.snapshots.live import flat_digest
from peer_recovery.snapshots.tree import flatten

Make = Callable[[list[dict[str, Any]]], torch.optim.Optimizer]

BUILT_INS: dict[str, Make] = {
    "AdamW": lambda g: torch.optim.AdamW(g, lr=1e-2, weight_decay=0.1),
    "AdamW-amsgrad": lambda g: torch.optim.AdamW(g, lr=1e-2, amsgrad=True),
    "AdamW-foreach": lambda g: torch.optim.AdamW(g, lr=1e-2, foreach=True),
    "AdamW-tensor-lr": lambda g: torch.optim.AdamW(g, lr=torch.tensor(1e-2)),
    "Adam": lambda g: torch.optim.Adam(g, lr=1e-2),
    "SGD-momentum": lambda g: torch.optim.SGD(g, lr=0.1, momentum=0.9, nesterov=True),
    "SGD-plain": lambda g: torch.optim.SGD(g, lr=0.1),
    "NAdam": lambda g: torch.optim.NAdam(g),
    "RAdam": lambda g: torch.optim.RAdam(g),
    "Adamax": lambda g: torch.optim.Adamax(g),
    "Adadelta": lambda g: torch.optim.Adadelta(g),
    "RMSprop": lambda g: torch.optim.RMSprop(g, momentum=0.9, centered=True),
    "Rprop": lambda g: torch.optim.Rprop(g),
}


def _model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(
        torch.nn.Linear(6, 8),
        torch.nn.Conv2d(8, 4, 1).to(memory_format=torch.channels_last),  # non-contiguous weight
        torch.nn.Linear(4, 2),
    )
    model[2].bias.requires_grad_(False)  # gets no state
    with torch.no_grad():
        model[0].weight[0, :2] = torch.tensor([-0.0, 0.0])
    return model


def _groups(model: torch.nn.Module) -> list[dict[str, Any]]:
    params = list(model.parameters())
    return [{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().flatten().view(torch.uint8)


@pytest.mark.parametrize("name", list(BUILT_INS))
def test_dry_run_state_has_the_layout_of_a_real_step(name: str) -> None:
    dry_model, real_model = _model(0), _model(0)
    dry, real = BUILT_INS[name](_groups(dry_model)), BUILT_INS[name](_groups(real_model))
    assert meta_layout(dry) is not None  # the fast path, not the fallback
    undo = materialize(dry, zero=True)
    _step_with_zero_lr(real, [p for g in real.param_groups for p in g["params"]])
    dry_flat, real_flat = flatten(dry.state_dict()), flatten(real.state_dict())
    assert flat_digest(dry_flat) == flat_digest(real_flat)  # paths, dtypes, shapes
    assert [(t.stride(), t.device) for t in dry_flat.tensors] == [
        (t.stride(), t.device) for t in real_flat.tensors
    ]
    assert all(not t.any() for t in flatten(dry.state_dict()["state"]).tensors)  # zero=True
    for p, q in zip(dry_model.parameters(), _model(0).parameters(), strict=True):
        assert torch.equal(_bits(p), _bits(q)) and p.grad is None  # untouched
    assert undo is not None
    undo()
    assert not dry.state


def test_user_subclass_and_closure_optimizers_are_not_dry_run() -> None:
    class Mine(torch.optim.AdamW):
        pass

    model = _model(0)
    assert meta_layout(Mine(_groups(model))) is None
    assert meta_layout(torch.optim.LBFGS(model.parameters())) is None  # step needs a closure
    mine = Mine(_groups(model))
    assert materialize(mine) is not None
    assert [float(s["step"]) for s in mine.state.values()] == [1.0] * 5  # a real step ran
    assert all(p.grad is None for p in model.parameters())


def _train(model: torch.nn.Module, optim: torch.optim.Optimizer, steps: int) -> None:
    for _ in range(steps):
        out = model[0](torch.randn(3, 6)).view(3, 8, 1, 1)
        out = model[1](out).view(3, 4)
        model[2](out).square().sum().backward()
        optim.step()
        optim.zero_grad()


class _Subclass(torch.optim.AdamW):
    """Not one of torch.optim's classes: takes the real-step fallback."""


RESTORED: dict[str, Make] = {
    "AdamW": BUILT_INS["AdamW"],
    "AdamW-amsgrad": BUILT_INS["AdamW-amsgrad"],
    "SGD-momentum": BUILT_INS["SGD-momentum"],
    "AdamW-subclass-fallback": lambda g: _Subclass(g, lr=1e-2, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(RESTORED))
def test_fresh_optimizer_state_is_built_from_the_slot_bitwise(tmp_path: Path, name: str) -> None:
    model = _model(0)
    optim = RESTORED[name](_groups(model))
    torch.manual_seed(1)
    _train(model, optim, 3)
    with PeerRecovery({"m": model, "o": optim}, directory=str(tmp_path)) as recovery:
        recovery.snapshot(3)
        recovery.wait()

        fresh_model = _model(7)
        fresh_optim = RESTORED[name](_groups(fresh_model))
        steps: list[int] = []
        fresh_optim.register_step_pre_hook(lambda *_: steps.append(1))
        result = PeerRecovery(
            {"m": fresh_model, "o": fresh_optim}, directory=str(tmp_path)
        ).restore()
        assert result is not None and result.step == 3
        if name != "AdamW-subclass-fallback":
            assert steps == []  # state allocated from the layout, no optimizer step ran
        original, restored = flatten(optim.state_dict()), flatten(fresh_optim.state_dict())
        assert original.tree == restored.tree  # step counters, settings: equal
        for a, b in zip(original.tensors, restored.tensors, strict=True):
            assert a.dtype == b.dtype and a.stride() == b.stride()
            assert torch.equal(_bits(a), _bits(b))
        for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
            assert torch.equal(_bits(a), _bits(b))
        # Training on from both gives the same bits: nothing hidden was left behind.
        torch.manual_seed(2)
        _train(model, optim, 2)
        torch.manual_seed(2)
        _train(fresh_model, fresh_optim, 2)
        for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
            assert torch.equal(_bits(a), _bits(b))


def test_failed_restore_leaves_a_fresh_optimizer_unstepped(tmp_path: Path) -> None:
    model = _model(0)
    optim = torch.optim.AdamW(_groups(model))
    assert PeerRecovery({"m": model, "o": optim}, directory=str(tmp_path)).restore() is None
    assert not optim.state  # the uninitialised state was undone
