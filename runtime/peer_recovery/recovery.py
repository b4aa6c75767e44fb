"""``PeerRecovery``: snapshot the training state every few steps; restore it after a restart.

A training script registers its state (``Stateful`` objects: model, optimizer, scheduler)
and, apart from it, its rank-private state (data-loader position, RNG), then calls
``restore(checkpoint_step)`` once at start-up and ``snapshot(step)`` every few steps::

    recovery = PeerRecovery.from_env({"model": model, "optim": opt, "sched": sched},
                                     private={"rng": rng_state})
    result = recovery.restore(checkpoint_step=last_checkpoint_step)
    if result is None:
        ...load the ordinary checkpoint (or start from scratch)...

Restore is all-or-nothing across ranks: this rank's part is decided by a ``RankPlan``
(restore locally, receive from a peer, or restore locally and send to peers). Without a
plan every rank restores locally at the newest step all ranks hold. Ranks that load their
own slot first check it (checksums, and that every stored tensor fits the live state) and
send from it; a receiver receives in place after copying its objects aside
(``snapshots.rollback``). Then all ranks vote (``peer_recovery.vote``).

- If any rank failed, every rank returns ``None``, logs why and keeps it in
  ``last_failure``; every registered object is then bitwise as it was before the call
  (nothing was loaded; created optimizer state is dropped; a receiver's objects are put
  back). Nothing raises where ``None`` is the outcome, including a rank that never joins.
- If all voted yes, the checked slots are loaded. A load that fails after that raises
  ``RestoreAbandoned``: the other ranks resume, so this process must end, never train.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from peer_recovery import _env, peer_restore
from peer_recovery.protocol.records import canonical_key
from peer_recovery.rank_plan import RankPlan, Role
from peer_recovery.shard_key import ShardKey
from peer_recovery.snapshots import settings
from peer_recovery.snapshots.live import LiveState, Stateful, key_digest
from peer_recovery.snapshots.local_restore import agree_on_step, load_private, usable_snapshots
from peer_recovery.snapshots.manifest import Manifest
from peer_recovery.snapshots.metrics import SnapshotStats, log_restore
from peer_recovery.snapshots.rollback import Backup
from peer_recovery.snapshots.sizing import SizingError
from peer_recovery.snapshots.store import SnapshotStore, plan_sections
from peer_recovery.snapshots.tree import Flat, flatten
from peer_recovery.snapshots.writer import SnapshotWriter
from peer_recovery.vote import Ballot, new_vote_group, vote

__all__ = ["PeerRecovery", "RankPlan", "RestoreAbandoned", "RestoreResult", "Role"]

log = logging.getLogger("peer_recovery.recovery")

DEFAULT_VOTE_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class RestoreResult:
    """What a successful restore did."""

    role: Role
    step: int
    source: str  # "local slot N" or "rank R"
    bytes: int
    seconds: float
    private_restored: bool  # rank-private state found and loaded (re-derive it otherwise)


class _Failure(Exception):
    """This rank cannot restore; the message is its ballot's reason."""


class RestoreAbandoned(RuntimeError):
    """Loading failed after every rank voted to resume: this process must not train on."""


@dataclass(frozen=True)
class _Ready:
    """A slot checked and agreed on, to load once every rank voted yes."""

    manifest: Manifest
    live: Flat
    role: Role


class PeerRecovery:
    """Snapshots of registered state in host memory, and the all-or-nothing restore."""

    def __init__(
        self,
        state: Mapping[str, Stateful],
        private: Mapping[str, Stateful] | None = None,
        *,
        directory: str | os.PathLike[str] | None = None,
        rank: int = 0,
        world_size: int = 1,
        position: Mapping[str, int] | None = None,
        async_snapshot: bool | None = None,
        vote_timeout_s: float | None = None,
        pg: dist.ProcessGroup | None = None,
        store: SnapshotStore | None = None,
    ) -> None:
        if not state:
            raise ValueError("PeerRecovery needs at least one Stateful object to snapshot")
        root = settings.resolve(directory, settings.ENV_DIR, settings.DEFAULT_ROOT, str)
        self.rank, self.world_size = rank, world_size
        self.position = ShardKey.make_position(position)
        self.store = store or SnapshotStore(Path(root) / f"rank-{rank}", rank=rank)
        self.async_snapshot = settings.resolve(
            async_snapshot, settings.ENV_ASYNC, True, settings.parse_bool
        )
        self.vote_timeout_s = settings.resolve(
            vote_timeout_s, settings.ENV_VOTE_TIMEOUT, DEFAULT_VOTE_TIMEOUT_S, float
        )
        self.state, self.private = LiveState(state), LiveState(private or {})
        self.stats = SnapshotStats()
        self._pg, self._pg_given = pg, pg is not None
        self._writer = SnapshotWriter(self.store, self.stats)
        self._undo: Callable[[], None] | None = None  # drops optimizer state a restore created
        self._backup: Backup | None = None  # a receiver's objects as they were
        self.last_failure: str | None = None  # why the last restore() returned None

    @classmethod
    def from_env(
        cls,
        state: Mapping[str, Stateful],
        private: Mapping[str, Stateful] | None = None,
        **overrides: Any,
    ) -> PeerRecovery:
        """Build from what torchrun gives (``RANK``, ``WORLD_SIZE``); arguments win."""
        overrides.setdefault("rank", int(os.environ.get("RANK", "0")))
        overrides.setdefault("world_size", int(os.environ.get("WORLD_SIZE", "1")))
        return cls(state, private, **overrides)

    @staticmethod
    def pods_per_replica(default: int = 1) -> int:
        """The job's ``peerrecovery.io/pods-per-replica``, as the webhook passes it to the
        pod (``$PEER_RECOVERY_PODS_PER_REPLICA``): how many consecutive pods shard one
        replica, for building the device mesh; ``default`` outside such a pod."""
        return _env.pods_per_replica(os.environ, default)

    # -- identity ------------------------------------------------------------------------
    def shard_key(self, flat: Flat) -> ShardKey:
        """The key of ``flat`` (this state's layout); lazily created optimizer state is left
        out, so a parameter that never got a gradient does not change it."""
        return ShardKey(
            self.world_size, self.position, key_digest(flat, self.state.optimizer_names())
        )

    def template(self) -> Any:
        """The live replicated state dict, optimizer state created: receive in place into it."""
        self.state.materialize()
        return {name: obj.state_dict() for name, obj in self.state.objects.items()}

    def manifests(self) -> list[Manifest]:
        """This rank's committed snapshots, newest first (cheap: reads the JSON only)."""
        self.wait()
        return self.store.scan()[0]

    # -- snapshots -----------------------------------------------------------------------
    def snapshot(self, step: int) -> float:
        """Copy the state into the store; return the seconds training was blocked.

        In async mode (the default) only the copy blocks; checksums and the manifest follow
        in a background thread, and the next snapshot first waits for them.
        """
        if not isinstance(step, int) or step < 0:
            raise ValueError(f"snapshot step must be an int >= 0, got {step!r}")
        self.wait()
        replicated = self.state.flat()
        private = self.private.flat() if self.private.objects else None
        key = self.shard_key(replicated)
        return self._writer.write(step, key, replicated, private, self.async_snapshot)

    def wait(self) -> None:
        """Wait for a background snapshot's commit (which never raises: a failed one is
        logged and counted in ``stats``) and other background work."""
        self._writer.wait()

    def close(self, *, remove: bool = True) -> None:
        """Finish pending work; on a clean exit remove the snapshot files (``remove``)."""
        try:
            self._writer.shutdown()
        finally:
            if remove:
                self.store.remove_all()

    def __enter__(self) -> PeerRecovery:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        # Keep the snapshots when leaving by an exception: that is when they are needed.
        self.close(remove=exc_type is None)

    # -- restore -------------------------------------------------------------------------
    def restore(
        self,
        checkpoint_step: int | None = None,
        *,
        plan: RankPlan | None = None,
        transport: Any = None,
    ) -> RestoreResult | None:
        """Restore this rank's part, then vote; ``None`` (reason logged) unless all succeed.

        Every rank must call this, with the same ``checkpoint_step``; every rank takes part
        in the same collectives whatever fails locally, so a failure never turns into a
        hang. ``plan`` and ``transport`` (a ``peer_recovery.transport.PGTransport``) say
        this rank's part; without them all ranks restore locally, at the newest step every
        rank holds intact. Under torchrun's ``peer-recovery`` rendezvous backend, a call
        without them first joins the round's agreement (:mod:`peer_recovery.peer_restore`),
        which gives this rank its plan and transport.
        """
        if plan is None and transport is None and peer_restore.in_round():
            try:
                session = peer_restore.RoundSession.join(
                    self.rank, self.world_size, timeout=self.vote_timeout_s
                )
            except Exception as error:  # the round's store is unreachable: no agreement
                self.last_failure = f"could not join the round: {type(error).__name__}: {error}"
                log.warning("peer-recovery: restore falls back: %s", self.last_failure)
                return None
            if session is not None:
                return self._restore_in_round(session, checkpoint_step)
        return self._restore(checkpoint_step, plan, transport)

    def _restore_in_round(
        self, session: peer_restore.RoundSession, checkpoint_step: int | None
    ) -> RestoreResult | None:
        plan = session.agree(self._live_shard_key(), checkpoint_step, self.vote_timeout_s)
        if plan is None:
            agreement = session.agreement
            self.last_failure = (
                agreement.reason if agreement is not None else "no agreement this round"
            )
            return None
        transport = None
        if session.moves_bytes():
            try:
                transport = session.transport(self.template, self._device())
            except Exception:  # this rank votes no (no transport); the vote says why
                log.exception("peer-recovery: rank %d: no transport", self.rank)
        result = self._restore(checkpoint_step, plan, transport)
        session.report(result)
        return result

    def _live_shard_key(self) -> str:
        """The live state's key as snapshots record it (lazy optimizer state never counts)."""
        return canonical_key(self.shard_key(self.state.flat()).to_json())

    def _device(self) -> Any:
        """Where the registered model lives (fresh received tensors go there); CPU by default."""
        import torch

        for obj in self.state.objects.values():
            if isinstance(obj, torch.nn.Module):
                for tensor in (*obj.parameters(), *obj.buffers()):
                    return tensor.device
        return torch.device("cpu")

    def _restore(
        self, checkpoint_step: int | None, plan: RankPlan | None, transport: Any
    ) -> RestoreResult | None:
        """Prepare this rank's part, vote, then load: see the module docstring."""
        started = time.perf_counter()
        self._undo, self._backup = None, None
        failure: str | None = None
        sizing_error: SizingError | None = None
        usable: list[tuple[Manifest, Flat]] = []
        reasons: list[str] = []
        ready: _Ready | None = None  # what this rank loads once every rank voted yes
        received: RestoreResult | None = None  # a receiver's state, already in the objects
        pg, failure = self._vote_group()
        try:
            self.wait()
            if plan is not None and plan.role is Role.RECEIVE:
                self._backup = Backup(self.state)  # the receive writes in place, before the vote
            live = self._live()
            # Size and preallocate first, so a too-small store fails at start-up on any path.
            private = self.private.flat() if self.private.objects else None
            self.store.ensure_capacity(plan_sections(live[0], private)[2])
            if plan is None or plan.role is not Role.RECEIVE:
                usable, reasons = usable_snapshots(self.store, self.rank, live, checkpoint_step)
        except SizingError as error:
            sizing_error, failure = error, failure or str(error)
        except Exception as error:
            log.exception("peer-recovery: rank %d could not prepare its restore", self.rank)
            failure = failure or f"{type(error).__name__}: {error}"
        try:
            if plan is None and (pg is not None or self.world_size == 1):
                manifests = [m for m, _ in usable]
                step, why = agree_on_step(pg, self.store, self.rank, manifests, reasons)
                failure = failure or why
                if failure is None and step is not None:
                    ready = self._prepare_local(step, usable, None, transport)
            elif plan is not None and failure is None and plan.role is Role.RECEIVE:
                received = self._receive(plan, transport, checkpoint_step)
            elif plan is not None and failure is None:
                ready = self._prepare_local(plan.step, usable, plan, transport)
        except Exception as error:
            log.exception("peer-recovery: rank %d failed to restore", self.rank)
            failure, ready, received = f"{type(error).__name__}: {error}", None, None
        step = ready.manifest.step if ready else (received.step if received else None)
        ballot = Ballot(True, step) if step is not None else Ballot(False, None, failure or "")
        if not ballot.ok and not ballot.reason:
            ballot = Ballot(False, None, "no snapshot restored")
        outcome = vote(pg, ballot)
        if not outcome.ok:
            self._roll_back(outcome.reason)
            if sizing_error is not None:
                raise sizing_error
            return None
        result = received if ready is None else self._load_prepared(ready)
        assert result is not None
        self.last_failure = None
        seconds = time.perf_counter() - started
        result = dataclasses.replace(result, seconds=seconds)
        # Fault the slots in off the training thread, so the next snapshots do not stall.
        self._writer.submit(self.store.prefault)
        self.stats.restore_seconds, self.stats.restore_bytes = seconds, result.bytes
        log_restore(result.role.value, result.step, result.source, result.bytes, seconds)
        return result

    def _roll_back(self, reason: str) -> None:
        """The vote failed: every object back as it was before ``restore()``; say why."""
        if self._undo is not None:
            self._undo()  # a never-stepped optimizer has no state again
        if self._backup is not None:
            try:
                self._backup.put_back()  # taken before any state was created or received
            except Exception as error:
                raise RestoreAbandoned(
                    f"rank {self.rank}: the restore failed ({reason}) and putting the objects "
                    f"back failed too; this process must not train: {error}"
                ) from error
        self._undo, self._backup = None, None
        self.last_failure = reason
        log.warning("peer-recovery: restore falls back to the checkpoint: %s", reason)

    def _vote_group(self) -> tuple[dist.ProcessGroup | None, str | None]:
        if self._pg is None and self.world_size > 1:
            self._pg, why = new_vote_group(self.world_size, self.vote_timeout_s)
            return self._pg, why
        return self._pg, None

    def _live(self) -> tuple[Flat, ShardKey]:
        """The live state with never-stepped optimizers given state (undone on failure)."""
        self._undo = self.state.materialize(zero=False)  # every byte is loaded, or undone
        flat = self.state.flat()
        return flat, self.shard_key(flat)

    def _prepare_local(
        self, step: int, usable: list[tuple[Manifest, Flat]], plan: RankPlan | None, transport: Any
    ) -> _Ready:
        """Pick and check this rank's slot of ``step`` (and send from it); load nothing yet."""
        found = [(m, f) for m, f in usable if m.step == step]
        if not found:
            raise _Failure(
                f"the plan says step {step}, this rank holds {[m.step for m, _ in usable]}"
            )
        manifest, live = found[0]
        if plan is not None:  # the local agreement verified already
            problem = self.store.verify(manifest)
            if problem:
                raise _Failure(problem)
        self.state.check(live, manifest.replicated)  # every stored tensor has its place
        if plan is not None and plan.send_to:
            self._send(plan, transport, manifest)
        return _Ready(manifest, live, plan.role if plan is not None else Role.LOCAL)

    def _load_prepared(self, ready: _Ready) -> RestoreResult:
        """Load the checked slot after a passed vote; a failure here must end the process."""
        manifest = ready.manifest
        try:
            nbytes = self.state.load(
                ready.live, manifest.replicated, self.store.tensors(manifest, manifest.replicated)
            )
            private_ok = load_private(self.private, self.store, manifest, self.rank)
        except Exception as error:
            raise RestoreAbandoned(
                f"rank {self.rank}: loading step {manifest.step} failed after every rank voted "
                f"to resume from it; this process must not train: {error}"
            ) from error
        return RestoreResult(
            ready.role, manifest.step, f"local slot {manifest.slot}", nbytes, 0.0, private_ok
        )

    def _send(self, plan: RankPlan, transport: Any, manifest: Manifest) -> None:
        """Stream the stored state (views on the slot, no copy) to the plan's receivers."""
        if transport is None:
            raise _Failure("the plan says send, but no transport was given")
        state = self.store.read_state_dict(manifest, copy=False)
        transport.send_checkpoint(list(plan.send_to), state, step=plan.step)

    def _receive(
        self, plan: RankPlan, transport: Any, checkpoint_step: int | None
    ) -> RestoreResult:
        """Receive the state from a peer into the live objects (in place where possible)."""
        if transport is None:
            raise _Failure("the plan says receive, but no transport was given")
        if checkpoint_step is not None and plan.step < checkpoint_step:
            raise _Failure(
                f"the plan's step {plan.step} is older than the checkpoint's {checkpoint_step}"
            )
        assert plan.receive_from is not None
        state = transport.recv_checkpoint(plan.receive_from, step=plan.step)
        flat = flatten(state)
        key = self.shard_key(flat)
        live_key = self.shard_key(self.state.flat())
        why = live_key.mismatch(key)
        if why is not None:
            raise _Failure(f"state received from rank {plan.receive_from} is another shard: {why}")
        for name, obj in self.state.objects.items():
            obj.load_state_dict(state[name])
        nbytes = sum(t.numel() * t.element_size() for t in flat.tensors)
        return RestoreResult(
            Role.RECEIVE, plan.step, f"rank {plan.receive_from}", nbytes, 0.0, False
        )
