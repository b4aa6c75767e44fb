"""peer-recovery's Kubernetes operator (kopf).

Watches the pods of PyTorchJobs annotated ``peer-recovery: enabled``, plans which healthy
pod streams to which rejoining pod with ``peer_recovery.contract.planning``, and records each
recovery as a ``PeerRecovery`` object. Never imports torch: the operator image installs
``peer-recovery[operator]`` only.
"""

__version__ = "0.1.0"
