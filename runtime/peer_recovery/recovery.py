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
serve it to their receivers meanwhile. A receiver given a transport that offers slot
replication (a round's, ``peer_recovery.peer_slots``) copies its holders' slot into its own
store, striped over every source its plan names (``RankPlan.sources``), and loads it after
the vote like a local slot; given a bare ``PGTransport`` it
receives in place after copying its objects aside (``snapshots.rollback``). Then all ranks
vote (``peer_recovery.vote``).

The vote is one decision for the whole job (``peer_recovery.decision``): written once in
the job's store and read by every rank, so all ranks act alike, a rank arriving after the
deadline included; a rank that cannot learn it raises ``DecisionUnknown`` and must end.
Every wait derives from one budget (``peer_recovery.budget``): a transfer may use its
transfer phase without the other ranks giving up on the vote meanwhile.

- If any rank failed, every rank returns ``None``, logs why and keeps it in
  ``last_failure``; every registered object is then bitwise as it was before the call
  (nothing was loaded; created optimizer state is dropped; a receiver's objects are put
  back). Nothing raises where ``None`` is the outcome, including a rank that never joins.
- If all voted yes, the checked slots are loaded. A load that fails after that raises
  ``RestoreAbandoned``: the other ranks resume, so this process must end, never train.

Snapshot identity (``snapshots.identity``): every snapshot records this job and the
lineage the state is on. A restore resumes one (step, lineage); afterwards every rank
quarantines what is not on that timeline (newer steps of the abandoned continuation, other
lineages, other jobs) and continues on a new lineage. A restore that returns ``None`` voids
(quarantines) every snapshot newer than ``checkpoint_step`` (all of them without one) on
every rank, and continues on a fresh lineage; ``invalidate(after_step=...)`` does the same
for a script that rolls back by itself.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch.distributed as dist

from peer_recovery import _env, peer_restore, peer_slots
from peer_recovery.budget import DEFAULT_RESTORE_TIMEOUT_S, ENV_RESTORE_TIMEOUT, RestoreBudget
from peer_recovery.decision import DecisionUnknown, JobDecision, default_store
from peer_recovery.protocol import keys
from peer_recovery.protocol.records import canonical_key
from peer_recovery.rank_plan import RankPlan, Role
from peer_recovery.shard_key import ShardKey
from peer_recovery.snapshots import identity, settings
from peer_recovery.snapshots.live import LiveState, Stateful, key_digest
from peer_recovery.snapshots.local_restore import (
    LocalAgreement,
    agree_on_step,
    load_private,
    usable_snapshots,
)
from peer_recovery.snapshots.manifest import Manifest
from peer_recovery.snapshots.metrics import PhaseClock, SnapshotStats, log_restore
from peer_recovery.snapshots.rollback import Backup
from peer_recovery.snapshots.sizing import SizingError
from peer_recovery.snapshots.store import SnapshotStore, plan_sections
from peer_recovery.snapshots.tree import Flat, flatten, unflatten
from peer_recovery.snapshots.writer import SnapshotWriter
from peer_recovery.vote import Ballot, VoteOutcome, decide, new_vote_group

__all__ = [
    "DecisionUnknown",
    "PeerRecovery",
    "RankPlan",
    "RestoreAbandoned",
    "RestoreResult",
    "Role",
]

log = logging.getLogger("peer_recovery.recovery")

#: Numbers the restores of this process: every rank makes the same calls in the same order,
#: so the n-th restore of every rank shares one decision key.
_ATTEMPTS = itertools.count()


@dataclass(frozen=True)
class RestoreResult:
    """What a successful restore did."""

    role: Role
    step: int
    source: str  # "local slot N" or "rank R"
    bytes: int
    seconds: float
    private_restored: bool  # rank-private state found and loaded (re-derive it otherwise)
    #: A replicated slot: the bytes each global rank sent (several when striped).
    bytes_by_source: Mapping[int, int] = dataclasses.field(default_factory=dict)


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
    source: str = ""  # "rank R" when the slot was replicated from a peer
    checked: tuple[list[Any], Any] | None = None  # LiveState.check's answer, reused to load
    uncommitted: bool = False  # a replicated slot whose manifest is installed after the vote
    by_source: Mapping[int, int] = dataclasses.field(default_factory=dict)  # replicated bytes


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
        restore_timeout_s: float | None = None,
        vote_timeout_s: float | None = None,
        pg: dist.ProcessGroup | None = None,
        store: SnapshotStore | None = None,
        job: str | None = None,
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
        self.budget = _budget(restore_timeout_s, vote_timeout_s)
        self.vote_timeout_s = self.budget.vote_s  # each wait for another rank
        self.state, self.private = LiveState(state), LiveState(private or {})
        self.stats = SnapshotStats()
        self._pg, self._pg_given = pg, pg is not None
        self._writer = SnapshotWriter(self.store, self.stats)
        self._undo: Callable[[], None] | None = None  # drops optimizer state a restore created
        self._backup: Backup | None = None  # a receiver's objects as they were
        self.last_failure: str | None = None  # why the last restore() returned None
        #: This job's identity: snapshots of another job are never loaded.
        self.job = job if job is not None else identity.job_identity(os.environ)
        #: The timeline new snapshots belong to; a restore moves it on.
        self.lineage = identity.root(self.job)
        self._nonce: str | None = None  # this restore's id for a fallback's lineage
        self._clock = PhaseClock()  # the phases of the restore under way

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
        position = ShardKey.merge_position(self.position, flat.position)
        return ShardKey(self.world_size, position, key_digest(flat, self.state.optimizer_names()))

    def template(self) -> Any:
        """What a receiver receives in place into: the shard key it expects and the live
        state as snapshots store it (a DTensor as its local shard), optimizer state created.
        A sender sends the same shape (:meth:`_send`)."""
        self.state.materialize()
        flat = self.state.flat()
        return _payload(self.shard_key(flat), unflatten(flat.tree, flat.tensors))

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
        return self._writer.write(
            step, key, replicated, private, self.async_snapshot, job=self.job, lineage=self.lineage
        )

    def invalidate(self, after_step: int) -> list[int]:
        """Void every snapshot newer than ``after_step``: quarantine it, never load it again.

        For a script that rolls back by itself (a NaN, a loss spike: it loads an older
        checkpoint): call it on every rank with the step it goes back to. New snapshots then
        start a new lineage, so they are never confused with the voided ones. Returns the
        voided steps. ``restore()`` does this itself when it returns ``None``.
        """
        if not isinstance(after_step, int) or isinstance(after_step, bool):
            raise ValueError(f"after_step must be an int, got {after_step!r}")
        self.wait()
        self.lineage = identity.invalidated(self.lineage, after_step)
        return self._void_newer(after_step, f"voided by invalidate(after_step={after_step})")

    def _void_newer(self, after_step: int, why: str) -> list[int]:
        voided = self.store.void(
            lambda m: m.step <= after_step and m.job == self.job, lambda m: why
        )
        if voided:
            log.warning(
                "peer-recovery: rank %d: voided snapshots of steps %s: %s", self.rank, voided, why
            )
        return voided

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
        self._clock = PhaseClock()
        if plan is None and transport is None and peer_restore.in_round():
            try:
                session = peer_restore.RoundSession.join(
                    self.rank, self.world_size, timeout=self.budget.vote_s
                )
            except Exception as error:  # the round's store is unreachable: no agreement
                self.last_failure = f"could not join the round: {type(error).__name__}: {error}"
                log.warning("peer-recovery: restore falls back: %s", self.last_failure)
                self._fell_back(checkpoint_step)
                return None
            self._clock.lap("join")
            if session is not None:
                return self._restore_in_round(session, checkpoint_step)
        return self._restore(checkpoint_step, plan, transport)

    def _restore_in_round(
        self, session: peer_restore.RoundSession, checkpoint_step: int | None
    ) -> RestoreResult | None:
        plan = session.agree(
            self._live_shard_key(), checkpoint_step, self.budget.vote_s, job=self.job
        )
        self._nonce = session.ctx.prefix  # the same on every rank, new every round
        self._clock.lap("agree")
        if plan is None:
            agreement = session.agreement
            self.last_failure = (
                agreement.reason if agreement is not None else "no agreement this round"
            )
            self._fell_back(checkpoint_step)
            return None
        transport = None
        if session.moves_bytes():
            try:
                transport = session.transport(self.template, self._device(), self.budget.transfer_s)
            except Exception:  # this rank votes no (no transport); the vote says why
                log.exception("peer-recovery: rank %d: no transport", self.rank)
            self._clock.lap("group")
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
        if self._nonce is None:
            self._nonce = os.urandom(16).hex()  # replaced by rank 0's on the local path
        failure: str | None = None
        sizing_error: SizingError | None = None
        data_bytes = 0
        usable: list[tuple[Manifest, Flat]] = []
        reasons: list[str] = []
        ready: _Ready | None = None  # what this rank loads once every rank voted yes
        received: RestoreResult | None = None  # a receiver's state, already in the objects
        clock = self._clock
        # Only ranks without a plan agree among themselves on a step (over a group); a plan
        # was agreed already, and the vote is in the job's store (``_decide``).
        pg, failure = self._vote_group() if plan is None else (None, None)
        clock.lap("vote group")
        streams = getattr(transport, "slot_streams", None)  # the round offers replication
        begun = time.monotonic()  # the decision waits a whole budget from here
        try:
            self.wait()
            if plan is not None and plan.role is Role.RECEIVE and streams is None:
                self._backup = Backup(self.state)  # the receive writes in place, before the vote
            live = self._live()
            # Size and preallocate first, so a too-small store fails at start-up on any path.
            private = self.private.flat() if self.private.objects else None
            data_bytes = plan_sections(live[0], private)[2]
            if plan is not None and plan.role is Role.RECEIVE and streams is not None:
                # Decide only; the slot the peer's bytes land in is allocated as they come,
                # the rest of the store after the restore (off its critical path).
                self.store.ensure_capacity(data_bytes, slots=())
            else:
                self.store.ensure_capacity(data_bytes)
            if plan is None or plan.role is not Role.RECEIVE:
                usable, reasons = usable_snapshots(
                    self.store, self.rank, live, checkpoint_step, self.job
                )
            clock.lap("prepare")
        except SizingError as error:
            sizing_error, failure = error, failure or str(error)
        except Exception as error:
            log.exception("peer-recovery: rank %d could not prepare its restore", self.rank)
            failure = failure or f"{type(error).__name__}: {error}"
        try:
            if plan is None and (pg is not None or self.world_size == 1):
                manifests = [m for m, _ in usable]
                local: LocalAgreement = agree_on_step(pg, self.store, self.rank, manifests, reasons)
                self._nonce = local.nonce
                failure = failure or local.reason
                if failure is None and local.manifest is not None:
                    ready = self._prepare_local(
                        local.manifest.step, usable, None, transport, local.manifest.lineage
                    )
            elif plan is not None and failure is None and plan.role is Role.RECEIVE:
                if streams is not None:
                    ready = self._replicate(plan, streams, live, checkpoint_step)
                else:
                    received = self._receive(plan, transport, checkpoint_step)
            elif plan is not None and failure is None:
                ready = self._prepare_local(plan.step, usable, plan, transport, plan.lineage)
        except Exception as error:
            log.exception("peer-recovery: rank %d failed to restore", self.rank)
            failure, ready, received = f"{type(error).__name__}: {error}", None, None
        clock.lap("transfer and check")
        step = ready.manifest.step if ready else (received.step if received else None)
        ballot = Ballot(True, step) if step is not None else Ballot(False, None, failure or "")
        if not ballot.ok and not ballot.reason:
            ballot = Ballot(False, None, "no snapshot restored")
        outcome = self._decide(ballot, begun)
        clock.lap("vote")
        if not outcome.ok:
            self._roll_back(outcome.reason)
            self._fell_back(checkpoint_step)
            if sizing_error is not None:
                raise sizing_error
            return None
        result = received if ready is None else self._load_prepared(ready)
        assert result is not None
        clock.lap("load")
        resumed_lineage = ready.manifest.lineage if ready else (plan.lineage if plan else None)
        try:
            self._resumed(resumed_lineage, result.step)
        except OSError:  # the agreement pairs (step, lineage): stale files cannot mix in
            log.exception("peer-recovery: rank %d: could not quarantine stale snapshots", self.rank)
        self.last_failure = None
        clock.lap("quarantine")
        seconds = time.perf_counter() - started
        result = dataclasses.replace(result, seconds=seconds)
        if ready is not None and ready.uncommitted:
            self._writer.submit(functools.partial(self._commit_replica, ready.manifest))
        # Allocate and fault the slots in off the training thread (a receiver allocated only
        # the one it received into), so the next snapshots do not stall.
        self._writer.submit(functools.partial(self.store.complete_capacity, data_bytes))
        self.stats.restore_seconds, self.stats.restore_bytes = seconds, result.bytes
        self.stats.restore_phases = dict(clock.phases)
        log_restore(result.role.value, result.step, result.source, result.bytes, seconds)
        log.info("peer-recovery: rank %d: restore phases (s): %s", self.rank, clock.describe())
        return result

    def _commit_replica(self, manifest: Manifest) -> None:
        """Install a replicated slot's manifest: from now on this rank holds the snapshot it
        received (redundancy is back). Runs on the snapshot thread, so the next snapshot
        waits for it and never writes into that slot first; a failure leaves the slot
        without a manifest (no snapshot) and is logged."""
        try:
            self.store.install(manifest)
        except Exception as error:
            log.warning(
                "peer-recovery: rank %d: could not commit the received snapshot of step %d "
                "(this rank holds no copy of it): %s",
                self.rank,
                manifest.step,
                error,
            )

    def _resumed(self, lineage: str | None, step: int) -> None:
        """After resuming at ``step`` of ``lineage``: keep only that timeline, move it on.

        Everything else (newer steps of the abandoned continuation, other lineages, other
        jobs) is quarantined, so it can never be taken for this timeline's snapshots.
        """
        self._nonce = None
        if lineage is None:  # a plan without a lineage (given by hand): keep the step's past
            lineage = self.lineage
        self.lineage = identity.resumed(lineage, step)
        self.wait()

        def keep(m: Manifest) -> bool:
            return m.job == self.job and identity.on_timeline(
                m.lineage, m.step, resumed_lineage=lineage, resumed_step=step
            )

        def why(m: Manifest) -> str:
            if m.job != self.job:
                return f"belongs to another job ({m.job!r})"
            return f"not on the timeline resumed at step {step} (lineage {m.lineage[:12]})"

        voided = self.store.void(keep, why)
        if voided:
            log.warning(
                "peer-recovery: rank %d: resumed at step %d; voided snapshots of steps %s "
                "(another timeline)",
                self.rank,
                step,
                voided,
            )

    def _fell_back(self, checkpoint_step: int | None) -> None:
        """``restore()`` returns None: void what is newer than the checkpoint, new lineage.

        The script now loads the checkpoint (or starts fresh): snapshots newer than it
        belong to a timeline this job has left. Never raises (``None`` is the outcome).
        """
        nonce, self._nonce = self._nonce or os.urandom(16).hex(), None
        self.lineage = identity.fallback(self.job, nonce, checkpoint_step)
        after = -1 if checkpoint_step is None else checkpoint_step
        try:
            self._void_newer(
                after, f"the restore fell back to the checkpoint (step {checkpoint_step})"
            )
        except Exception:
            log.exception("peer-recovery: rank %d: could not void newer snapshots", self.rank)

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

    def _decide(self, ballot: Ballot, begun: float) -> VoteOutcome:
        """The job's one decision (``peer_recovery.decision``); raises ``DecisionUnknown``
        when this rank cannot learn it: then it must not train."""
        if self.world_size == 1:
            return decide([ballot])
        attempt = f"{_round_id(os.environ)}.{next(_ATTEMPTS)}"
        try:
            store = default_store()
        except Exception as error:
            raise DecisionUnknown(
                f"rank {self.rank}: no job store to decide in: {error}"
            ) from error
        job = JobDecision(store, self.rank, self.world_size, attempt)
        deadline = self.budget.decision_deadline(begun)
        outcome = job.decide(ballot, deadline, self.budget.total_s, self.budget.vote_s)
        log.info("peer-recovery: rank %d: the job decided: %s", self.rank, outcome.reason)
        return outcome

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
        self,
        step: int,
        usable: list[tuple[Manifest, Flat]],
        plan: RankPlan | None,
        transport: Any,
        lineage: str | None,
    ) -> _Ready:
        """Pick and check this rank's slot of ``step`` on ``lineage`` (and send from it);
        load nothing yet."""
        found = [(m, f) for m, f in usable if m.step == step and lineage in (None, m.lineage)]
        if not found:
            raise _Failure(
                f"the plan says step {step}, this rank holds {[m.step for m, _ in usable]}"
            )
        manifest, live = found[0]
        streams = getattr(transport, "slot_streams", None)
        serving = None
        if plan is not None and plan.send_to and streams is not None:
            # Serve the slot at once, beside this rank's own checks: each receiver checks
            # every chunk against the manifest's checksums as it lands.
            serving = streams.serve(list(plan.send_to), self.store, manifest)
        if plan is not None:  # the local agreement verified already
            problem = self.store.verify(manifest)
            if problem:
                raise _Failure(problem)
        checked = self.state.check(live, manifest.replicated)  # every tensor has its place
        if serving is not None:
            streams.finish(serving)  # before the vote: the slot must not change under it
        elif plan is not None and plan.send_to:
            self._send(plan, transport, manifest)
        role = plan.role if plan is not None else Role.LOCAL
        return _Ready(manifest, live, role, checked=checked)

    def _replicate(
        self,
        plan: RankPlan,
        streams: Any,
        live: tuple[Flat, ShardKey],
        checkpoint_step: int | None,
    ) -> _Ready:
        """Copy the holders' slot into this rank's store (``peer_recovery.peer_slots``),
        striped over every source the plan names; load nothing yet: after the vote it is
        loaded like any local slot."""
        if checkpoint_step is not None and plan.step < checkpoint_step:
            raise _Failure(
                f"the plan's step {plan.step} is older than the checkpoint's {checkpoint_step}"
            )
        assert plan.receive_from is not None
        flat, key = live
        sources = list(plan.sources)
        who = f"rank {sources[0]}" if len(sources) == 1 else f"a holder of ranks {sources}"

        def accept(manifest: Manifest) -> str | None:
            if manifest.step != plan.step:
                return f"{who} offers step {manifest.step}, not {plan.step}"
            why = key.mismatch(manifest.shard_key)
            return None if why is None else f"{who} holds another shard: {why}"

        def check(manifest: Manifest) -> Any:  # while the bytes are on the wire
            return self.state.check(flat, manifest.replicated)  # every tensor has its place

        try:
            # Committed after the vote, in the background (``_commit_replica``).
            got = streams.receive(sources, self.store, accept, check, commit=False)
        except peer_slots.Refused as error:
            raise _Failure(str(error)) from None
        by_rank = dict(got.bytes_by_source)  # global ranks (``SlotStreams``)
        # The planned source names the transfer, unless it was dropped: then the rank that
        # sent the most.
        source = plan.receive_from
        if source in got.lost and by_rank:
            source = max(by_rank, key=lambda r: (by_rank[r], -r))
        return _Ready(
            got.manifest, flat, Role.RECEIVE, f"rank {source}", got.prepared, True, by_rank
        )

    def _load_prepared(self, ready: _Ready) -> RestoreResult:
        """Load the checked slot after a passed vote; a failure here must end the process."""
        manifest = ready.manifest
        try:
            buf = self.store.mapped(manifest.slot)
            nbytes = self.state.load_slot(ready.live, manifest.replicated, buf, ready.checked)
            private_ok = load_private(self.private, self.store, manifest, self.rank)
        except Exception as error:
            raise RestoreAbandoned(
                f"rank {self.rank}: loading step {manifest.step} failed after every rank voted "
                f"to resume from it; this process must not train: {error}"
            ) from error
        source = ready.source or f"local slot {manifest.slot}"
        return RestoreResult(
            ready.role, manifest.step, source, nbytes, 0.0, private_ok, ready.by_source
        )

    def _send(self, plan: RankPlan, transport: Any, manifest: Manifest) -> None:
        """Stream the stored state (views on the slot, no copy) to the plan's receivers."""
        if transport is None:
            raise _Failure("the plan says send, but no transport was given")
        state = self.store.read_state_dict(manifest, copy=False)
        payload = _payload(manifest.shard_key, state)  # the key travels with the bytes
        transport.send_checkpoint(list(plan.send_to), payload, step=plan.step)

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
        received = transport.recv_checkpoint(plan.receive_from, step=plan.step)
        sent_key, state = _unpack_payload(received, plan.receive_from)
        live = self.state.flat()
        # The sender's key, not one rebuilt from this rank's position: a rank of another
        # shard (same shapes, another mesh coordinate) is refused here, and the objects are
        # put back by the failed vote.
        why = self.shard_key(live).mismatch(sent_key)
        if why is not None:
            raise _Failure(f"state received from rank {plan.receive_from} is another shard: {why}")
        nbytes = self.state.load_received(live, flatten(state))
        return RestoreResult(
            Role.RECEIVE, plan.step, f"rank {plan.receive_from}", nbytes, 0.0, False
        )


def _payload(key: ShardKey, state: Any) -> dict[str, Any]:
    """What travels from sender to receiver: the sender's shard key and its state."""
    return {"shard_key": canonical_key(key.to_json()), "state": state}


def _unpack_payload(received: object, source: int) -> tuple[ShardKey, Any]:
    """The sender's shard key and state; a malformed payload is refused, naming the sender."""
    if not isinstance(received, dict) or set(received) != {"shard_key", "state"}:
        raise _Failure(f"rank {source} sent no shard key with its state")
    try:
        return ShardKey.from_json(json.loads(received["shard_key"])), received["state"]
    except (TypeError, ValueError) as error:
        raise _Failure(f"rank {source} sent a malformed shard key: {error}") from None


def _round_id(env: Mapping[str, str]) -> str:
    """What every rank of this worker group shares, and the next group does not: the
    plugin's round prefix, else the group's store address. Never the restart count: agents
    count their own restarts (one whose workers failed counts one more than one whose
    workers were stopped for a new member), so ranks of one round can disagree on it."""
    prefix = env.get(keys.ENV_ROUND_PREFIX)
    if prefix:
        return prefix
    return f"{env.get('MASTER_ADDR', '')}:{env.get('MASTER_PORT', '')}"


def _budget(restore_timeout_s: float | None, vote_timeout_s: float | None) -> RestoreBudget:
    """The one restore budget: ``restore_timeout_s``, else ``PEER_RECOVERY_RESTORE_TIMEOUT_S``;
    the older vote timeout (argument, then ``PEER_RECOVERY_VOTE_TIMEOUT_S``) still sets the
    vote phase, and the budget around it, when the budget itself is not given."""
    if restore_timeout_s is None and not os.environ.get(ENV_RESTORE_TIMEOUT):
        legacy = settings.resolve(vote_timeout_s, settings.ENV_VOTE_TIMEOUT, None, float)
        if legacy is not None:
            return RestoreBudget.from_vote_timeout(legacy)
    total = settings.resolve(
        restore_timeout_s, ENV_RESTORE_TIMEOUT, DEFAULT_RESTORE_TIMEOUT_S, float
    )
    return RestoreBudget(total)
