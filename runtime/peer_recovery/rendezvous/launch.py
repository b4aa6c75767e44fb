"""The torchrun settings peer-recovery depends on, checked when the handler is created.

- ``--max-restarts`` >= 1: recovery happens in the restart round; with 0 restarts torchrun
  gives up at the first failure and there is nothing to recover into.
- an explicit ``--rdzv-id``: the run id scopes the keys this plugin publishes; torchrun's
  default (``none``) would let two jobs sharing an endpoint read each other's manifests.
- a fixed world size (``--nnodes=N`` or ``N:N``): ranks are pinned to pod ordinals, which
  only means something when the set of ordinals cannot change.

``launch_problems`` is pure; ``torchrun_max_restarts`` reads torchrun's own command line
(with torchrun's own parser, so ``PET_MAX_RESTARTS`` and both spellings count) when this
process is torchrun, and returns None elsewhere (a test harness creating the handler).
"""

from __future__ import annotations

import os
import sys

__all__ = ["LaunchConfigError", "check_launch", "launch_problems", "torchrun_max_restarts"]

#: torchrun's default ``--rdzv-id`` when none is given.
_DEFAULT_RUN_ID = "none"


class LaunchConfigError(ValueError):
    """torchrun was started with settings peer-recovery cannot work with."""


def launch_problems(
    *, run_id: str, min_nodes: int, max_nodes: int, max_restarts: int | None
) -> list[str]:
    """Return one human-readable line per unmet requirement (empty when all are met)."""
    problems: list[str] = []
    if max_restarts is not None and max_restarts < 1:
        problems.append(
            f"--max-restarts is {max_restarts}; peer-recovery needs at least 1, because "
            "recovery happens in the round torchrun restarts"
        )
    if not run_id or run_id == _DEFAULT_RUN_ID:
        problems.append(
            "--rdzv-id is not set; pass an explicit id shared by every pod of the job "
            "(e.g. the PyTorchJob's name), it scopes what the plugin publishes"
        )
    if min_nodes != max_nodes:
        problems.append(
            f"--nnodes is {min_nodes}:{max_nodes}; peer-recovery needs a fixed world size "
            f"(--nnodes={max_nodes}), since ranks are pinned to pod ordinals"
        )
    return problems


def check_launch(*, run_id: str, min_nodes: int, max_nodes: int, max_restarts: int | None) -> None:
    """Raise ``LaunchConfigError`` listing every unmet requirement at once."""
    problems = launch_problems(
        run_id=run_id, min_nodes=min_nodes, max_nodes=max_nodes, max_restarts=max_restarts
    )
    if problems:
        lines = "\n".join(f"  - {p}" for p in problems)
        raise LaunchConfigError(f"peer-recovery cannot run with these torchrun settings:\n{lines}")


def _is_torchrun() -> bool:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    if spec is not None and spec.name == "torch.distributed.run":
        return True
    return bool(sys.argv) and os.path.basename(sys.argv[0]) == "torchrun"


def torchrun_max_restarts() -> int | None:
    """``--max-restarts`` of the torchrun running this process, or None if it is not one."""
    if not _is_torchrun():
        return None
    from torch.distributed.run import get_args_parser  # already loaded by torchrun

    try:
        args, _ = get_args_parser().parse_known_args(sys.argv[1:])
    except SystemExit:
        return None
    return int(args.max_restarts)
