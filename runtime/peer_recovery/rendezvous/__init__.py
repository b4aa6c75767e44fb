"""torchrun's ``peer-recovery`` rendezvous backend: c10d with ranks pinned to pod ordinals.

Modules: ``identity`` (pod ordinal from the env), ``launch`` (torchrun settings checks),
``handler`` (the wrapped c10d handler that pins ranks and calls a hook each round),
``round`` (what an agent publishes each round), ``manifests`` (this pod's snapshot holdings,
read from the manifests). The ``torchrun.handlers`` entry point is
:func:`peer_recovery.plugin.handler_creator`, which wires these to a plan source. Importing
this package imports none of its modules.
"""

from __future__ import annotations

__all__: list[str] = []
