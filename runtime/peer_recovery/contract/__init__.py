"""The contract the operator and the runtime share: one home, imported by both sides.

Pure, torch-free, kopf-free and kubernetes-free, and the bottom layer of the project: it
imports nothing else of ``peer_recovery`` (import-linter checks that). The operator imports
nothing of the runtime but this package.

Modules, each with one job:

- ``names``: the CRD's and the PyTorchJob's names, annotation and label keys, the enums;
- ``phases``: the phase transition table and its checks;
- ``bodies``: deterministic names and the bodies both sides write;
- ``records``: the one parser of PeerRecovery bodies;
- ``moves``: the checked, preconditioned phase move and the status it writes;
- ``errors``: the kinds of API-server failure both client layers raise;
- ``annotations``: the PyTorchJob's peer-recovery annotations;
- ``ordinals``: pod ordinal from replica type and index;
- ``planning``: the pure planner (which healthy pod streams to which rejoining pod).
"""

from __future__ import annotations

__all__: list[str] = []
