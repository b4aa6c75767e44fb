"""Who this pod is, from the environment the downward API gives it (pure).

A pod of a PyTorchJob learns its name, UID and namespace from env vars filled by the
downward API (``POD_NAME`` <- ``metadata.name``, ``POD_UID`` <- ``metadata.uid``,
``POD_NAMESPACE`` <- ``metadata.namespace``; ``NODE_NAME`` <- ``spec.nodeName`` is
optional). The job name is ``PEER_RECOVERY_JOB_NAME`` when set (the downward API can pass
the ``training.kubeflow.org/job-name`` label), else it is read off the pod name, which the
training-operator always builds as ``<job>-<replica type>-<index>``; the replica type and
index come from the same name.

Invariant: :func:`pod_identity` returns a complete :class:`PodIdentity` or None (not in a
pod); a partial or malformed identity is a ``ValueError`` naming the variable, because a
wrong identity would report on another pod's recovery.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Final

from peer_recovery.protocol.records import PodIdentity

__all__ = [
    "ENV_JOB_NAME",
    "ENV_NODE_NAME",
    "ENV_POD_NAME",
    "ENV_POD_NAMESPACE",
    "ENV_POD_UID",
    "IDENTITY_ENV",
    "pod_identity",
]

ENV_POD_NAME: Final = "POD_NAME"
ENV_POD_UID: Final = "POD_UID"
ENV_POD_NAMESPACE: Final = "POD_NAMESPACE"
ENV_NODE_NAME: Final = "NODE_NAME"
ENV_JOB_NAME: Final = "PEER_RECOVERY_JOB_NAME"
#: The three a pod must have, with the downward-API field each comes from.
IDENTITY_ENV: Final = {
    ENV_POD_NAME: "metadata.name",
    ENV_POD_UID: "metadata.uid",
    ENV_POD_NAMESPACE: "metadata.namespace",
}

_POD_NAME = re.compile(r"^(?P<job>.+)-(?P<type>[a-z0-9]+)-(?P<index>[0-9]+)$")


def pod_identity(env: Mapping[str, str]) -> PodIdentity | None:
    """This pod's identity, or None when none of the identity variables is set."""
    values = {name: (env.get(name) or "").strip() for name in IDENTITY_ENV}
    if not any(values.values()):
        return None
    missing = [f"{n} (from {IDENTITY_ENV[n]})" for n, v in values.items() if not v]
    if missing:
        raise ValueError(
            "peer-recovery: incomplete pod identity; set through the downward API: "
            + ", ".join(missing)
        )
    name = values[ENV_POD_NAME]
    match = _POD_NAME.match(name)
    if match is None:
        raise ValueError(
            f"peer-recovery: {ENV_POD_NAME}={name!r} is not a PyTorchJob pod name "
            "(<job>-<replica type>-<index>)"
        )
    job = (env.get(ENV_JOB_NAME) or "").strip() or match["job"]
    if not name.startswith(f"{job}-"):
        raise ValueError(
            f"peer-recovery: {ENV_POD_NAME}={name!r} does not belong to job "
            f"{ENV_JOB_NAME}={job!r} (pods are named <job>-<replica type>-<index>)"
        )
    return PodIdentity(
        pod=name,
        uid=values[ENV_POD_UID],
        namespace=values[ENV_POD_NAMESPACE],
        job=job,
        replica_type=match["type"],
        replica_index=int(match["index"]),
        node=(env.get(ENV_NODE_NAME) or "").strip(),
    )
