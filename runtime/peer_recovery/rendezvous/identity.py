"""Which pod ordinal this torchrun agent stands for (docs/design.md, "Identity").

The ordinal is the node rank the training-operator gives the pod: ``PET_NODE_RANK`` or
``RANK`` when the job has a Master, else the pod's replica index, which a job without a
Master passes through a downward-API env var (``PEER_RECOVERY_REPLICA_INDEX``). An explicit
``PEER_RECOVERY_ORDINAL`` overrides all of them (local runs, tests).

Invariant: the result is an int in ``[0, world_size)`` or a ``ValueError`` that names the
variable that was wrong. Pure: the environment is passed in.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

__all__ = ["ENV_ORDINAL", "ENV_REPLICA_INDEX", "ORDINAL_ENV_PRECEDENCE", "ordinal_from_env"]

#: Explicit override, highest precedence.
ENV_ORDINAL: Final = "PEER_RECOVERY_ORDINAL"
#: Set from the pod label ``training.kubeflow.org/replica-index`` through the downward API.
ENV_REPLICA_INDEX: Final = "PEER_RECOVERY_REPLICA_INDEX"
#: Read in this order; the first one set wins.
ORDINAL_ENV_PRECEDENCE: Final = (ENV_ORDINAL, "PET_NODE_RANK", "RANK", ENV_REPLICA_INDEX)


def ordinal_from_env(env: Mapping[str, str], world_size: int) -> tuple[int, str]:
    """Return ``(ordinal, name of the variable it came from)``.

    Raises ``ValueError`` when none is set, when the value is not a non-negative integer,
    or when it is outside ``[0, world_size)``: a wrong ordinal would hand this pod another
    pod's shard, so guessing is never an option.
    """
    for name in ORDINAL_ENV_PRECEDENCE:
        raw = env.get(name)
        if raw is None or raw.strip() == "":
            continue
        try:
            value = int(raw.strip())
        except ValueError:
            raise ValueError(
                f"peer-recovery: {name}={raw!r} is not an integer pod ordinal"
            ) from None
        if not 0 <= value < world_size:
            raise ValueError(
                f"peer-recovery: pod ordinal {name}={value} is out of range for a job of "
                f"{world_size} nodes (expected 0..{world_size - 1})"
            )
        return value, name
    names = ", ".join(ORDINAL_ENV_PRECEDENCE)
    raise ValueError(
        "peer-recovery: cannot tell this pod's ordinal: none of "
        f"{names} is set. In a PyTorchJob with a Master, RANK/PET_NODE_RANK are set by the "
        f"training-operator; without one, pass the replica-index label through the downward "
        f"API as {ENV_REPLICA_INDEX}."
    )
