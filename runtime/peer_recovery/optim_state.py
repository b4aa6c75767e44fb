"""Giving a fresh optimizer its state, so a snapshot can be loaded into it in place.

A freshly built optimizer has no per-parameter state until its first ``step()``; restoring
in place (and receiving from a peer in place) needs the state tensors to exist, with the
shapes and dtypes the optimizer itself would create. ``materialize`` creates them the way
the optimizer does, by one step with zero gradients and a learning rate of zero, and
returns an undo that puts the optimizer back to "never stepped" when the restore does not
go ahead.

Why parameters are left bitwise unchanged (tested for AdamW and SGD with momentum and
weight decay, including ``-0.0`` entries): with ``lr == 0.0`` every update these optimizers
apply is ``p + (-0.0) * x`` or ``p * (1 - 0.0 * wd)``, which are exact identities in IEEE
arithmetic. Gradients are set to zeros only for the step and set back to ``None``. The step
runs only when no parameter has a gradient, so a real pending gradient is never consumed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["materialize"]


def materialize(optimizer: torch.optim.Optimizer) -> Callable[[], None] | None:
    """Create ``optimizer``'s state if it has none; return an undo, or ``None`` if untouched."""
    if optimizer.state:
        return None
    params = [p for group in optimizer.param_groups for p in group["params"]]
    if any(p.grad is not None for p in params):
        raise RuntimeError(
            f"cannot create the state of {type(optimizer).__name__}: it has not stepped but "
            "its parameters hold gradients; restore before the first backward pass"
        )
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

    def undo() -> None:
        optimizer.state.clear()

    return undo
