"""Peer restore in the worker: join the round, agree, and give the restore its transport.

:class:`peer_recovery.recovery.PeerRecovery` (the facade) calls down into this module when
the worker runs under the ``peer-recovery`` rendezvous plugin (:func:`in_round`); nothing
here calls back into it. A :class:`RoundSession`

1. publishes this rank's live shard key and ``checkpoint_step`` under the round's prefix;
2. gets the round's agreement (:mod:`peer_recovery.exchange`): rank 0 reads what every
   pod's agent published (snapshot holdings, plans) and every rank's record in one batch,
   computes the agreement (:mod:`peer_recovery.agreement`: resume step and roles, shard
   keys verified before any byte moves) and publishes it once; the other ranks read it.
   It returns this rank's :class:`~peer_recovery.rank_plan.RankPlan`, or None (load the
   checkpoint);
3. builds a gloo process group of only the ranks that send or receive (on the rendezvous
   store, under the round's prefix; its pairs connect lazily, so only the pairs that talk
   ever connect) and the transport on it;
4. publishes the agreement and the restore's result as records of the round's store
   protocol, for the pod's agent to report (workers never talk to the API server).

When the agreement says "load the checkpoint", every rank returns None without a vote:
every rank holds the one agreement the leader published.

A transport failure ends the process with ``EXIT_TRANSFER_FAILED`` (75) after leaving a
``load-checkpoint`` marker in the store: the process group is then unusable and receives
posted into the model may still land, so the process must not continue. torchrun restarts
the round and that round's directive makes every rank load the checkpoint.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Final

from peer_recovery import exchange
from peer_recovery.agreement import Action, Agreement
from peer_recovery.protocol import keys
from peer_recovery.protocol.codec import ExchangeError, publish
from peer_recovery.protocol.layout import Layout
from peer_recovery.protocol.records import (
    LoadCheckpointMarker,
    RankAgreed,
    RankResult,
    WorkerRecord,
)
from peer_recovery.rank_plan import RankPlan

__all__ = [
    "EXIT_TRANSFER_FAILED",
    "RoundContext",
    "RoundSession",
    "in_round",
]

log = logging.getLogger("peer_recovery.peer_restore")

#: Exit status of a worker whose transfer failed (EX_TEMPFAIL: torchrun restarts the round).
EXIT_TRANSFER_FAILED: Final = 75
#: Fault injection for tests and drills: "sender-dies-midstream" SIGKILLs a sending rank
#: mid-stream, once per job (see ``_DiesMidStream``).
_ENV_FAULT: Final = "PEER_RECOVERY_FAULT"


@dataclass(frozen=True)
class RoundContext:
    """Where this round's exchange lives (set by the plugin in the agent's environment)."""

    host: str
    port: int
    prefix: str
    round_no: int
    nnodes: int
    run_id: str
    ordinal: int
    local_rank: int
    local_world_size: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RoundContext | None:
        if not env.get(keys.ENV_ROUND_PREFIX):
            return None
        host, _, port = env[keys.ENV_STORE].rpartition(":")
        return cls(
            host,
            int(port),
            env[keys.ENV_ROUND_PREFIX],
            int(env[keys.ENV_ROUND]),
            int(env[keys.ENV_NNODES]),
            env.get("TORCHELASTIC_RUN_ID", ""),
            int(env.get(keys.ENV_ORDINAL, "0")),
            int(env.get("LOCAL_RANK", "0")),
            int(env.get("LOCAL_WORLD_SIZE", "1")),
        )


def in_round(env: Mapping[str, str] | None = None) -> bool:
    """True in a worker started by torchrun under the ``peer-recovery`` rendezvous backend."""
    return bool((os.environ if env is None else env).get(keys.ENV_ROUND_PREFIX))


class RoundSession:
    """One worker's part in this round's exchange (see the module docstring)."""

    def __init__(
        self, ctx: RoundContext, store: Any, rank: int, world_size: int, env: Mapping[str, str]
    ) -> None:
        self.ctx, self.store, self.rank, self.world_size = ctx, store, rank, world_size
        self.env = env
        self.agreement: Agreement | None = None

    @classmethod
    def join(
        cls, rank: int, world_size: int, *, timeout: float, env: Mapping[str, str] | None = None
    ) -> RoundSession | None:
        """Connect to the round's store; None when not running under the plugin."""
        env = os.environ if env is None else env
        ctx = RoundContext.from_env(env)
        if ctx is None:
            return None
        from torch.distributed import TCPStore

        store = TCPStore(ctx.host, ctx.port, is_master=False, timeout=timedelta(seconds=timeout))
        return cls(ctx, store, rank, world_size, env)

    def agree(
        self,
        live_shard_key: str,
        checkpoint_step: int | None,
        timeout: float,
        *,
        job: str | None = None,
    ) -> RankPlan | None:
        """This rank's plan for the round, or None: every rank loads the checkpoint.

        ``job``: this job's identity; snapshots published with another are never used.
        """
        ctx = self.ctx
        try:
            agreement = self._agree(live_shard_key, checkpoint_step, timeout, job)
        except (ExchangeError, ValueError) as error:
            log.warning("peer-recovery: rank %d: no agreement this round: %s", self.rank, error)
            self._publish_agreed(None, f"no agreement: {error}")
            return None
        log.info("peer-recovery: round %d: %s", ctx.round_no, agreement.reason)
        self.agreement = agreement
        self._publish_agreed(agreement, "")
        if not agreement.ok:
            log.warning("peer-recovery: restore falls back to the checkpoint: %s", agreement.reason)
            return None
        role = agreement.roles[self.rank]
        assert agreement.step is not None
        return RankPlan(
            agreement.step,
            receive_from=role.source if role.action is Action.PEER else None,
            send_to=role.send_to,
            lineage=agreement.lineage,
            also_from=role.also_from if role.action is Action.PEER else (),
        )

    def moves_bytes(self) -> bool:
        """Does this rank send or receive (and so need a transport)?"""
        return self.agreement is not None and self.rank in self.agreement.movers

    def transport(
        self, template: Callable[[], object], device: Any, timeout: float
    ) -> _RecoveryTransport:
        """A gloo group of the ranks that move bytes, and the transport on it; ``timeout``
        is the restore budget's transfer phase (``peer_recovery.budget``).

        The group connects lazily: only the pairs that send to each other ever connect,
        not the full mesh of every mover (many receivers from many sources stay cheap)."""
        import torch.distributed as dist

        from peer_recovery.peer_slots import SlotStreams
        from peer_recovery.transport import PGTransport

        assert self.agreement is not None
        members = self.agreement.movers
        ctx, env = self.ctx, self.env
        pg_store = dist.PrefixStore(keys.pg_prefix(ctx.prefix), self.store)
        pg = _lazy_gloo(pg_store, members.index(self.rank), len(members), timeout, env)
        wire = pg
        if env.get(_ENV_FAULT) == "sender-dies-midstream":
            fault_key, store_ = keys.fault_key(ctx.run_id), self.store
            wire = _DiesMidStream(pg, lambda: int(store_.add(fault_key, 1)) == 1)
        inner = PGTransport(wire, timeout, device, state_dict=template)
        marker_key = keys.load_checkpoint_key(ctx.run_id)
        store, rank = self.store, self.rank

        def fail(error: BaseException) -> None:
            reason = f"round {ctx.round_no}: rank {rank}: {error}".splitlines()[0]
            log.error(
                "peer-recovery: transfer failed, exiting with %d: %s", EXIT_TRANSFER_FAILED, reason
            )
            try:
                publish(store, marker_key, LoadCheckpointMarker(ctx.round_no, reason))
            finally:
                logging.shutdown()
                sys.stderr.flush()
                os._exit(EXIT_TRANSFER_FAILED)

        recovery = _RecoveryTransport(inner, list(members), pg, fail, template)
        # The rank restores by replicating its holder's slot (peer_slots), not in place.
        recovery.slot_streams = SlotStreams(wire, list(members), fail)
        return recovery

    def report(self, result: Any) -> None:
        """Publish whether this rank restored (``result``: a ``RestoreResult`` or None), for
        the pod's agent. Never raises: reporting must not break a recovery."""
        ctx = self.ctx
        try:
            record = RankResult(
                rank=self.rank,
                restored=result is not None,
                step=None if result is None else result.step,
                bytes=0 if result is None else int(result.bytes),
                seconds=0.0 if result is None else float(result.seconds),
            )
            publish(self.store, keys.result_key(ctx.prefix, ctx.ordinal, ctx.local_rank), record)
        except Exception as error:
            log.warning("peer-recovery: could not publish the restore result: %s", error)

    # --- the exchange ----------------------------------------------------------------------

    def _agree(
        self, live_shard_key: str, checkpoint_step: int | None, timeout: float, job: str | None
    ) -> Agreement:
        """Publish this rank's record; the leader agrees for all, the others read its answer.
        ``job``: this job's identity: holdings of other jobs are never used."""
        ctx, store = self.ctx, self.store
        me = WorkerRecord(self.rank, live_shard_key, checkpoint_step)
        publish(store, keys.worker_key(ctx.prefix, self.rank), me)
        if self.rank == exchange.LEADER:
            return exchange.lead(store, ctx.prefix, ctx.nnodes, self.world_size, timeout, job)
        return exchange.follow(store, ctx.prefix, self.rank, self.world_size, timeout)

    def _publish_agreed(self, agreement: Agreement | None, reason: str) -> None:
        """This rank's view of ``agreement`` (None when none was reached: ``reason`` says
        why), for the pod's agent. Never raises."""
        ctx = self.ctx
        try:
            role = None if agreement is None else agreement.roles.get(self.rank)
            source = None if role is None else role.source
            record = RankAgreed(
                rank=self.rank,
                local_world_size=ctx.local_world_size,
                ok=bool(agreement is not None and agreement.ok),
                step=None if agreement is None else agreement.step,
                action=None if role is None else role.action.value,
                source_ordinal=None if source is None else self._layout().pod_of(source),
                planned_by=None
                if role is None or role.planned_by is None
                else role.planned_by.value,
                reason=reason or ("" if agreement is None else agreement.reason),
            )
            publish(self.store, keys.agreed_key(ctx.prefix, ctx.ordinal, ctx.local_rank), record)
        except Exception as error:  # reporting must never break a recovery
            log.warning("peer-recovery: could not publish the agreement for the agent: %s", error)

    def _layout(self) -> Layout:
        return Layout(self.ctx.nnodes, self.world_size)


def _lazy_gloo(store: Any, rank: int, size: int, timeout: float, env: Mapping[str, str]) -> Any:
    """A gloo group whose pairs connect on first use, on the address gloo would pick: the
    ``GLOO_SOCKET_IFNAME`` interface, else this host's name if it resolves, else loopback."""
    import torch.distributed as dist

    gloo = dist.ProcessGroupGloo
    interface = env.get("GLOO_SOCKET_IFNAME", "").split(",")[0]
    try:
        if interface:
            device = gloo.create_device(interface=interface, lazy_init=True)
        else:
            try:
                hostname = socket.gethostname()
                socket.getaddrinfo(hostname, None)
            except OSError:
                hostname = "127.0.0.1"
            device = gloo.create_device(hostname=hostname, lazy_init=True)
    except TypeError:  # a torch without lazily connected gloo pairs: the full mesh
        return gloo(store, rank, size, timedelta(seconds=timeout))
    options = gloo._Options()
    options._timeout = timedelta(seconds=timeout)
    options._devices = [device]
    return gloo(store, rank, size, options)


class _DiesMidStream:
    """Fault injection: the process group, except that this process SIGKILLs itself
    mid-stream, if ``claim()`` says the job's one injected fault is still to fire (a pod
    that dies is replaced; its restarted worker does not die again).

    With the in-place transport: when it posts its second data message, after the first
    one was sent. Serving a slot: when the first request of a receiver arrives (to fetch a
    chunk, or to stop when other holders served every chunk), before answering it, so a
    striped receiver loses it whichever chunks it asked it for. The receiver is then left
    mid-stream however many messages are in flight."""

    def __init__(self, pg: Any, claim: Callable[[], bool]) -> None:
        self._pg, self._claim = pg, claim
        self._first: Any = None

    def _die(self) -> None:
        if not self._claim():
            return
        log.error("peer-recovery: fault injection: this sender dies mid-stream")
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    def send(self, tensors: list[Any], dst: int, tag: int) -> Any:
        from peer_recovery.snapshots.replica import DATA_TAG as SLOT_DATA_TAG
        from peer_recovery.transport.engine import DATA_TAG

        if DATA_TAG <= tag < SLOT_DATA_TAG:
            if self._first is not None:
                self._first.wait(timedelta(seconds=60))
                self._die()
            self._first = self._pg.send(tensors, dst, tag)
            return self._first
        return self._pg.send(tensors, dst, tag)

    def recv(self, tensors: list[Any], src: int, tag: int) -> Any:
        from peer_recovery.snapshots.replica import REQUEST_TAG

        work = self._pg.recv(tensors, src, tag)
        return _ThenDie(work, self._die) if tag == REQUEST_TAG else work

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pg, name)


class _ThenDie:
    """A posted receive whose completion kills the process (``_DiesMidStream``)."""

    def __init__(self, work: Any, die: Callable[[], None]) -> None:
        self._work, self._die = work, die

    def wait(self, *args: Any) -> Any:
        done = self._work.wait(*args)
        self._die()
        return done


class _RecoveryTransport:
    """The transport with global ranks mapped to the recovery group's, failing fast.

    Any ``TransferError`` ends the process (``fail``): after a failed transfer the group is
    unusable and receives posted into the model may still land.
    """

    def __init__(
        self,
        inner: Any,
        members: list[int],
        pg: Any,
        fail: Callable[[BaseException], None],
        live: Callable[[], object],
    ) -> None:
        self._inner, self._members, self._pg, self._fail = inner, members, pg, fail
        self._live = live
        self.slot_streams: Any = None  # a peer_slots.SlotStreams when the round offers it

    @property
    def stats(self) -> Any:
        return self._inner.stats

    def send_checkpoint(
        self, dst_ranks: Sequence[int], state_dict: object, *, step: int | None = None
    ) -> None:
        from peer_recovery.transport import TransferError

        started = time.perf_counter()
        try:
            self._inner.send_checkpoint(
                [self._members.index(r) for r in dst_ranks], state_dict, step=step
            )
        except TransferError as error:
            self._fail(error)
        log.info(
            "peer-recovery: sent to ranks %s in %.2fs",
            list(dst_ranks),
            time.perf_counter() - started,
        )

    def recv_checkpoint(self, src_rank: int, *, step: int | None = None) -> object:
        from peer_recovery.transport import TransferError

        try:
            received = self._inner.recv_checkpoint(self._members.index(src_rank), step=step)
        except TransferError as error:
            self._fail(error)
            raise  # unreachable: fail() exits
        _adopt_metadata(received, self._live())
        return received


def _adopt_metadata(received: object, live: object) -> None:
    """Give received module state dicts the receiver's own ``_metadata`` (module versions).

    ``nn.Module.state_dict()`` hangs ``_metadata`` on its OrderedDict; the transport, like
    PyTorch's, carries keys and leaves but not that attribute. It describes the receiving
    code, not the sender's state, so the receiver's own is the right one (and the shard key
    of the received state then matches the live one, as it does for a local restore).
    """
    if not isinstance(received, dict) or not isinstance(live, dict):
        return
    metadata = getattr(live, "_metadata", None)
    if metadata is not None and not hasattr(received, "_metadata"):
        # A plain dict cannot carry it; then there is nothing to match either.
        with contextlib.suppress(AttributeError):
            received._metadata = metadata  # type: ignore[attr-defined]
    for key, value in received.items():
        if key in live:
            _adopt_metadata(value, live[key])
