"""Errors raised by the transport.

Every error names the peer rank it concerns, the stage of the transfer it happened in, and
the key path of the state-dict leaf where one applies, so a log line alone tells an operator
what failed. The hierarchy is part of the public API (fixed by the design):

- ``TransferError(RuntimeError)``: any failed transfer; the process group must not be reused.
- ``TransferTimeout(TransferError, TimeoutError)``: a wait ran past the timeout.
- ``IntegrityError(TransferError)``: a bucket's checksum did not match.
- ``StepMismatchError(TransferError)``: sender and receiver disagree on the step.
- ``MetadataError(TransferError)``: metadata that cannot be encoded safely, or received
  metadata that is corrupt, hostile, over a cap, or does not match an in-place target.
"""

from __future__ import annotations

__all__ = [
    "IntegrityError",
    "MetadataError",
    "StepMismatchError",
    "TransferError",
    "TransferTimeout",
]


class TransferError(RuntimeError):
    """A transfer failed; after this the process group must not be reused."""

    def __init__(
        self,
        message: str,
        *,
        peer: int | None = None,
        stage: str | None = None,
        key_path: str | None = None,
    ) -> None:
        self.peer = peer
        self.stage = stage
        self.key_path = key_path
        self.detail = message
        parts = []
        if peer is not None:
            parts.append(f"peer rank {peer}")
        if stage is not None:
            parts.append(f"stage {stage}")
        if key_path is not None:
            parts.append(f"key {key_path}")
        prefix = f"[{', '.join(parts)}] " if parts else ""
        super().__init__(prefix + message)

    def with_context(self, *, peer: int | None = None, stage: str | None = None) -> TransferError:
        """Return a copy of this error with missing peer/stage filled in (same class)."""
        return type(self)(
            self.detail,
            peer=self.peer if self.peer is not None else peer,
            stage=self.stage if self.stage is not None else stage,
            key_path=self.key_path,
        )


class TransferTimeout(TransferError, TimeoutError):
    """A wait on the peer ran past the transport's timeout."""


class IntegrityError(TransferError):
    """Received bytes do not match the checksum the sender computed."""


class StepMismatchError(TransferError):
    """The sender's step is not the step the receiver asked for."""


class MetadataError(TransferError):
    """Metadata cannot be encoded safely, or received metadata is invalid or unacceptable."""
