"""Host-memory snapshots of the training state: the store, its manifests, sizing, metrics.

``store`` owns the files (two preallocated slots per rank, manifests written last and
atomically); ``manifest`` and ``settings`` are torch-free so the torchrun agent can read
and publish manifests; ``tree`` flattens a state without pickle; ``live`` loads into the
registered objects in place; ``local_restore`` picks and agrees on the slot to restore.
``peer_recovery.recovery.PeerRecovery`` is the public entry.
"""
