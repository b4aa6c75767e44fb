"""The round's store protocol: what agents and workers publish to each other.

One package owns it: every key (``keys``), the size-capped JSON codec and bounded waits
(``codec``), every record as a typed dataclass with its parser (``records``), and the
rank <-> pod-ordinal layout (``layout``). Torch-free and kubernetes-free: the torchrun
plugin, the workers and the cluster agent all speak it, and none of them needs another's
package to do so. Values are JSON, never pickle.
"""

from __future__ import annotations

__all__: list[str] = []
