"""Peer restore in the worker: read the round, agree, move the bytes, then the vote.

``PeerRecovery.restore(checkpoint_step)`` calls :func:`restore` when the worker runs under
the ``peer-recovery`` rendezvous plugin (:func:`in_round`); it then:

1. publishes this rank's live shard key and ``checkpoint_step`` under the round's prefix;
2. reads what every pod's agent published (snapshot manifests, plans) and every rank's
   record, and computes the agreement (:mod:`peer_recovery.agreement`): resume step and
   roles, shard keys verified before any byte moves;
3. builds a gloo process group of only the ranks that send or receive (on the rendezvous
   store, under the round's prefix) and hands ``PeerRecovery.restore`` this rank's
   ``RankPlan`` and a transport; ``restore`` loads, sends or receives, then runs the
   all-or-nothing vote.

Not under the plugin (no round in the environment), it is ``PeerRecovery.restore``. When
the agreement says "load the checkpoint", every rank returns None without a vote: all
ranks computed the same agreement from the same published inputs.

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
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Final

from peer_recovery.agreement import Action, Agreement, Holding, PodReport, RankReport, agree
from peer_recovery.kube import outcome as _outcome  # what the agent reports (cluster)
from peer_recovery.plan_sources import PlanEntry
from peer_recovery.rendezvous import exchange
from peer_recovery.rendezvous.manifests import canonical_key
from peer_recovery.rendezvous.round import directive_key, plan_key

if TYPE_CHECKING:
    from peer_recovery.recovery import PeerRecovery, RestoreResult

__all__ = [
    "ENV_TRANSFER_TIMEOUT",
    "EXIT_TRANSFER_FAILED",
    "RoundContext",
    "in_round",
    "restore",
]

log = logging.getLogger("peer_recovery.peer_restore")

#: Exit status of a worker whose transfer failed (EX_TEMPFAIL: torchrun restarts the round).
EXIT_TRANSFER_FAILED: Final = 75
ENV_TRANSFER_TIMEOUT: Final = "PEER_RECOVERY_TRANSFER_TIMEOUT_S"
DEFAULT_TRANSFER_TIMEOUT_S: Final = 300.0
#: Fault injection for tests and drills: "sender-dies-midstream" SIGKILLs a sending rank
#: once its first data message is sent, as it is about to post the second.
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

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> RoundContext | None:
        if not env.get(exchange.ENV_ROUND_PREFIX):
            return None
        host, _, port = env[exchange.ENV_STORE].rpartition(":")
        return cls(
            host,
            int(port),
            env[exchange.ENV_ROUND_PREFIX],
            int(env[exchange.ENV_ROUND]),
            int(env[exchange.ENV_NNODES]),
            env.get("TORCHELASTIC_RUN_ID", ""),
        )


def in_round(env: Mapping[str, str] | None = None) -> bool:
    """True in a worker started by torchrun under the ``peer-recovery`` rendezvous backend."""
    return bool((os.environ if env is None else env).get(exchange.ENV_ROUND_PREFIX))


def restore(
    recovery: PeerRecovery,
    checkpoint_step: int | None = None,
    *,
    env: Mapping[str, str] | None = None,
) -> RestoreResult | None:
    """Restore ``recovery``'s state from local snapshots or peers; None: load the checkpoint."""
    env = os.environ if env is None else env
    ctx = RoundContext.from_env(env)
    if ctx is None:
        return recovery.restore(checkpoint_step)
    from torch.distributed import TCPStore

    timeout = recovery.vote_timeout_s
    store = TCPStore(ctx.host, ctx.port, is_master=False, timeout=timedelta(seconds=timeout))
    try:
        agreement = _agree(recovery, store, ctx, checkpoint_step, timeout)
    except (exchange.ExchangeError, ValueError) as error:
        log.warning("peer-recovery: rank %d: no agreement this round: %s", recovery.rank, error)
        why = f"no agreement: {error}"
        _outcome.publish_agreed(
            store, ctx.prefix, recovery.rank, None, per_pod=1, reason=why, env=env
        )
        return None
    log.info("peer-recovery: round %d: %s", ctx.round_no, agreement.reason)
    per_pod = max(1, recovery.world_size // max(1, ctx.nnodes))
    _outcome.publish_agreed(store, ctx.prefix, recovery.rank, agreement, per_pod=per_pod, env=env)
    if not agreement.ok:
        log.warning("peer-recovery: restore falls back to the checkpoint: %s", agreement.reason)
        return None
    from peer_recovery.recovery import RankPlan

    role = agreement.roles[recovery.rank]
    assert agreement.step is not None
    plan = RankPlan(
        agreement.step,
        receive_from=role.source if role.action is Action.PEER else None,
        send_to=role.send_to,
    )
    transport = None
    if recovery.rank in agreement.movers:
        transfer_timeout = float(env.get(ENV_TRANSFER_TIMEOUT) or DEFAULT_TRANSFER_TIMEOUT_S)
        transport = _transport(recovery, store, ctx, agreement.movers, transfer_timeout, env)
    result = recovery.restore(checkpoint_step, plan=plan, transport=transport)
    _outcome.publish_result(store, ctx.prefix, recovery.rank, result, env=env)
    return result


def _live_shard_key(recovery: PeerRecovery) -> str:
    """The live state's key as snapshots record it (optimizer state created, then undone)."""
    undo = recovery.state.materialize()
    try:
        return canonical_key(recovery.shard_key(recovery.state.flat()).to_json())
    finally:
        if undo is not None:
            undo()


def _agree(
    recovery: PeerRecovery,
    store: Any,
    ctx: RoundContext,
    checkpoint_step: int | None,
    timeout: float,
) -> Agreement:
    me = {
        "rank": recovery.rank,
        "shard_key": _live_shard_key(recovery),
        "checkpoint_step": checkpoint_step,
    }
    store.set(exchange.worker_key(ctx.prefix, recovery.rank), exchange.encode(me))
    (directive,) = exchange.read_all(store, [directive_key(ctx.prefix)], timeout, "directive")
    agents = exchange.read_all(
        store, [exchange.agent_key(ctx.prefix, o) for o in range(ctx.nnodes)], timeout, "agents"
    )
    plans = exchange.read_all(
        store, [plan_key(ctx.prefix, o) for o in range(ctx.nnodes)], timeout, "plans"
    )
    for agent, plan in zip(agents, plans, strict=True):
        agent["plan"] = plan.get("plan")
    workers = exchange.read_all(
        store,
        [exchange.worker_key(ctx.prefix, r) for r in range(recovery.world_size)],
        timeout,
        "workers",
    )
    return agree(
        nnodes=ctx.nnodes,
        world_size=recovery.world_size,
        pods=[_pod_report(a) for a in agents],
        ranks=[_rank_report(w) for w in workers],
        load_checkpoint=directive.get("load_checkpoint"),
        pods_per_replica=directive.get("pods_per_replica"),
    )


def _pod_report(raw: Mapping[str, Any]) -> PodReport:
    try:
        holdings = tuple(
            Holding(int(h["rank"]), int(h["step"]), str(h["shard_key"]), int(h.get("nbytes", 0)))
            for h in raw["holdings"]
        )
        plan = raw.get("plan")
        ordinal = int(raw["ordinal"])
        return PodReport(
            ordinal,
            holdings,
            None if plan is None else PlanEntry.from_json(plan, f"pod {ordinal}'s plan"),
            str(raw.get("host") or "") or None,
        )
    except (KeyError, TypeError, ValueError) as error:
        raise exchange.ExchangeError(f"malformed agent record: {error}") from None


def _rank_report(raw: Mapping[str, Any]) -> RankReport:
    try:
        step = raw.get("checkpoint_step")
        return RankReport(
            int(raw["rank"]), str(raw["shard_key"]), None if step is None else int(step)
        )
    except (KeyError, TypeError, ValueError) as error:
        raise exchange.ExchangeError(f"malformed worker record: {error}") from None


def _transport(
    recovery: PeerRecovery,
    store: Any,
    ctx: RoundContext,
    members: Sequence[int],
    timeout: float,
    env: Mapping[str, str],
) -> _RecoveryTransport:
    """A gloo group of the ranks that move bytes, and the transport on it."""
    import torch.distributed as dist

    from peer_recovery.transport import PGTransport

    pg_store = dist.PrefixStore(f"{ctx.prefix}pg/", store)
    pg = dist.ProcessGroupGloo(
        pg_store, members.index(recovery.rank), len(members), timedelta(seconds=timeout)
    )
    wire = _DiesMidStream(pg) if env.get(_ENV_FAULT) == "sender-dies-midstream" else pg
    device = _state_device(recovery)
    inner = PGTransport(wire, timeout, device, state_dict=recovery.template)
    marker = exchange.load_checkpoint_key(ctx.run_id)

    def fail(error: BaseException) -> None:
        reason = f"round {ctx.round_no}: rank {recovery.rank}: {error}".splitlines()[0]
        log.error(
            "peer-recovery: transfer failed, exiting with %d: %s", EXIT_TRANSFER_FAILED, reason
        )
        try:
            store.set(marker, exchange.encode({"round": ctx.round_no, "reason": reason}))
        finally:
            logging.shutdown()
            sys.stderr.flush()
            os._exit(EXIT_TRANSFER_FAILED)

    return _RecoveryTransport(inner, list(members), pg, fail, recovery.template)


def _state_device(recovery: PeerRecovery) -> Any:
    """Where the registered model lives (fresh received tensors go there); CPU by default."""
    import torch

    for obj in recovery.state.objects.values():
        if isinstance(obj, torch.nn.Module):
            for tensor in (*obj.parameters(), *obj.buffers()):
                return tensor.device
    return torch.device("cpu")


class _DiesMidStream:
    """Fault injection: the process group, except that this process SIGKILLs itself when
    the transport posts its second data message, after the first one was sent. The receiver
    is then left mid-stream however many messages the transport keeps in flight."""

    def __init__(self, pg: Any) -> None:
        self._pg = pg
        self._first: Any = None

    def send(self, tensors: list[Any], dst: int, tag: int) -> Any:
        from peer_recovery.transport.engine import DATA_TAG

        if tag >= DATA_TAG:
            if self._first is not None:
                self._first.wait(timedelta(seconds=60))
                os.kill(os.getpid(), signal.SIGKILL)
            self._first = self._pg.send(tensors, dst, tag)
            return self._first
        return self._pg.send(tensors, dst, tag)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pg, name)


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
