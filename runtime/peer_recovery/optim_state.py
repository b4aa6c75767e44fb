"""Giving a fresh optimizer its state, so a snapshot can be loaded into it in place.

A freshly built optimizer has no per-parameter state until its first ``step()``; restoring
in place (and receiving from a peer in place) needs the state tensors to exist, with the
shapes and dtypes the optimizer itself would create. ``materialize`` creates them and
returns an undo that puts the optimizer back to "never stepped" when the restore does not
go ahead.

How the state is created, fastest first:

1. **Dry run on the meta device** (``torch.optim``'s own classes). A copy of the optimizer
   over ``meta`` stand-ins of its parameters (no memory, no arithmetic) takes one step with
   zero gradients; what it creates is the layout (names, dtypes, shapes, and whether a
   tensor lives with its parameter or on the CPU). The live optimizer's state is then
   allocated with that layout: uninitialised (``zero=False``, for a restore that overwrites
   every byte or undoes) or zero-filled. No optimizer arithmetic runs, and the parameters
   are never touched. User subclasses are not dry-run: one may keep its parameters outside
   ``param_groups``, where a copy would not see them and would give a wrong layout silently.
2. **One real step** otherwise (and when the dry run raises: fused and capturable kernels
   have no meta implementation): zero gradients and a learning rate of zero. Parameters
   stay bitwise unchanged (tested for AdamW and SGD with momentum and weight decay,
   including ``-0.0`` entries): with ``lr == 0.0`` every update these optimizers apply is
   ``p + (-0.0) * x`` or ``p * (1 - 0.0 * wd)``, exact identities in IEEE arithmetic.
   Gradients are set to zeros only for the step and set back to ``None``.

Either way the optimizer must not hold gradients yet, so a real pending gradient is never
consumed; and the state must be overwritten (restored) or undone before training steps.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["materialize", "meta_layout"]

_Layout = list[dict[str, Any] | None]  # per parameter, in param_groups order


def materialize(
    optimizer: torch.optim.Optimizer, *, zero: bool = True
) -> Callable[[], None] | None:
    """Create ``optimizer``'s state if it has none; return an undo, or ``None`` if untouched.

    ``zero=False`` leaves the created tensors uninitialised (when a dry run gives the
    layout): only for a caller that overwrites all of them or calls the undo.
    """
    if optimizer.state:
        return None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(p.grad is not None for p in params):
        raise RuntimeError(
            f"cannot create the state of {type(optimizer).__name__}: it has not stepped but "
            "its parameters hold gradients; restore before the first backward pass"
        )
    layout = meta_layout(optimizer)
    if layout is None:
        _step_with_zero_lr(optimizer, params)
    else:
        for param, entry in zip(params, layout, strict=True):
            if entry is not None:
                optimizer.state[param] = {
                    key: _allocate(value, param, zero) for key, value in entry.items()
                }

    def undo() -> None:
        optimizer.state.clear()

    return undo


def meta_layout(optimizer: torch.optim.Optimizer) -> _Layout | None:
    """The state one step would give each parameter, as meta tensors; ``None`` if unknown.

    Known for ``torch.optim``'s own classes whose step runs on the meta device; ``None``
    for anything else (see the module docstring), and the caller takes a real step.
    """
    cls = type(optimizer)
    if getattr(torch.optim, cls.__name__, None) is not cls:
        return None
    if any(
        type(p) not in (torch.Tensor, torch.nn.Parameter)
        for group in optimizer.param_groups
        for p in group["params"]
    ):
        return None  # a DTensor's meta stand-in would give plain tensors of the global shape
    # One stand-in per group and (shape, stride, dtype, requires_grad): the built-in
    # optimizers create each parameter's state from that alone, and a GPT-sized model has
    # ~10 distinct kinds among ~150 parameters (meta ops cost Python time, not memory).
    kinds: list[tuple[int, tuple[Any, ...]]] = []
    groups: list[dict[str, Any]] = []
    stand_ins: dict[tuple[int, tuple[Any, ...]], torch.Tensor] = {}
    for index, group in enumerate(optimizer.param_groups):
        settings = {k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
        members = []
        for p in group["params"]:
            kind = (index, (tuple(p.shape), p.stride(), p.dtype, p.requires_grad))
            kinds.append(kind)
            if kind not in stand_ins:
                stand_in = torch.empty_like(p, device="meta").requires_grad_(p.requires_grad)
                if stand_in.requires_grad:
                    stand_in.grad = torch.zeros_like(stand_in)
                stand_ins[kind] = stand_in
                members.append(stand_in)
        groups.append({**settings, "params": members})
    clone = cls.__new__(cls)
    try:
        # Optimizer.__setstate__ is torch's own rebuild path (unpickling): fresh hooks, patched
        # step, per-class defaults filled in.
        clone.__setstate__(
            {
                "defaults": copy.deepcopy(optimizer.defaults),
                "state": defaultdict(dict),
                "param_groups": groups,
            }
        )
        with torch.no_grad():
            clone.step()
    except Exception:  # no meta kernel, or a step that needs more (closure, sparse grads)
        return None
    return [clone.state.get(stand_ins[kind]) for kind in kinds]


def _allocate(value: Any, param: torch.Tensor, zero: bool) -> Any:
    """A live state value shaped like the dry run's ``value``: meta tensors go to ``param``."""
    if not isinstance(value, torch.Tensor):
        return copy.deepcopy(value)
    device = param.device if value.device.type == "meta" else value.device
    tensor = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device=device)
    return tensor.zero_() if zero else tensor


def _step_with_zero_lr(optimizer: torch.optim.Optimizer, params: list[torch.Tensor]) -> None:
    saved_lr = [group.get("lr") for group in optimizer.param_groups]
    try:
        for group in optimizer.param_groups:
            if "lr" in group:
                group["lr"] = (
                    torch.zeros_like(group["lr"]) if isinstance(group["lr"], torch.Tensor) else 0.0
                )
        for p in params:
            if p.requires_grad:
                p.grad = torch.zeros_like(p)
        with torch.no_grad():
            optimizer.step()
    finally:
        for group, lr in zip(optimizer.param_groups, saved_lr, strict=True):
            if lr is not None:
                group["lr"] = lr
        for p in params:
            p.grad = None
