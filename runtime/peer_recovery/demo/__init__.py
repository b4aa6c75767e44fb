"""``make demo``: a replaced pod's rank recovers its training state from a peer, locally.

``python -m peer_recovery.demo`` runs the driver (:mod:`peer_recovery.demo.driver`);
``local_job`` runs torchrun agents as pods on one machine; ``train`` is the training script.
"""
