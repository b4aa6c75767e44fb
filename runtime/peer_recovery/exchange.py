"""The round's exchange: one leader reads every record once and publishes the agreement.

Every rank used to read every agent's, plan and worker record and compute the agreement
itself: at N ranks that is N x N records through the one rendezvous store (and N runs of
the agreement), which grows past seconds at a thousand ranks. Instead:

- every rank publishes its ``WorkerRecord`` (``worker/<r>``), as before;
- the leader (:data:`LEADER`, rank 0) waits for the directive, every pod's agent and plan
  record and every rank's worker record in one bounded wait, reads them in one batched
  ``multi_get`` (:func:`read_inputs`), computes the agreement (:mod:`peer_recovery.agreement`)
  and publishes it once as an :class:`~peer_recovery.protocol.records.AgreementRecord`
  (``agreement``): step, reason and only the moves (each receiver's primary source and
  the other holders it stripes over);
- every other rank waits for that one key (:func:`follow`).

The store then carries O(N) records per round and the agreement is computed once. When the
leader cannot agree (a record missing in time, a malformed one), it publishes an agreement
without a step and with the reason, so every rank falls back to the checkpoint the same way.
A follower's :class:`~peer_recovery.agreement.Agreement` holds the roles of the ranks that
move bytes and its own (everyone else restores locally); the leader's holds every role.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from peer_recovery.agreement import MAX_SOURCES, Action, Agreement, PodReport, Role, agree
from peer_recovery.protocol import keys
from peer_recovery.protocol.codec import ExchangeError, publish, read_all
from peer_recovery.protocol.records import (
    AgentRecord,
    AgreementRecord,
    Directive,
    Move,
    PlanRecord,
    WorkerRecord,
)

__all__ = [
    "FOLLOWER_MARGIN_S",
    "LEADER",
    "RoundInputs",
    "follow",
    "from_record",
    "lead",
    "read_inputs",
    "to_record",
]

#: The rank that reads every record and publishes the agreement.
LEADER: Final = 0
#: A follower waits this much longer than the leader waits for records, so that the leader's
#: own "no agreement" (published after its wait) reaches it.
FOLLOWER_MARGIN_S: Final = 30.0


@dataclass(frozen=True)
class RoundInputs:
    """Everything the agreement is computed from, as published this round."""

    directive: Directive
    pods: tuple[PodReport, ...]
    workers: tuple[WorkerRecord, ...]

    def agree(self, nnodes: int, world_size: int, job: str | None = None) -> Agreement:
        """The agreement; ``job``: this job's identity (other jobs' holdings are ignored)."""
        return agree(
            nnodes=nnodes,
            world_size=world_size,
            pods=self.pods,
            ranks=self.workers,
            load_checkpoint=self.directive.load_checkpoint,
            pods_per_replica=self.directive.pods_per_replica,
            job=job,
        )


def read_inputs(
    store: Any, prefix: str, nnodes: int, world_size: int, timeout: float
) -> RoundInputs:
    """Wait (at most ``timeout`` s) for the round's records; read them in one batch."""
    directive_key = keys.directive_key(prefix)
    agent_keys = [keys.agent_key(prefix, o) for o in range(nnodes)]
    plan_keys = [keys.plan_key(prefix, o) for o in range(nnodes)]
    worker_keys = [keys.worker_key(prefix, r) for r in range(world_size)]
    every = [directive_key, *agent_keys, *plan_keys, *worker_keys]
    raw = read_all(store, every, timeout, "round records")
    directive = Directive.from_json(raw[0], directive_key)
    agents = [
        AgentRecord.from_json(r, k) for r, k in zip(raw[1 : 1 + nnodes], agent_keys, strict=True)
    ]
    plans = [
        PlanRecord.from_json(r, k).plan
        for r, k in zip(raw[1 + nnodes : 1 + 2 * nnodes], plan_keys, strict=True)
    ]
    workers = tuple(
        WorkerRecord.from_json(r, k)
        for r, k in zip(raw[1 + 2 * nnodes :], worker_keys, strict=True)
    )
    pods = tuple(
        PodReport(a.ordinal, a.holdings, plan, a.host or None)
        for a, plan in zip(agents, plans, strict=True)
    )
    return RoundInputs(directive, pods, workers)


def to_record(agreement: Agreement) -> AgreementRecord:
    """What the leader publishes: the step, its lineage, the reason and the moves."""
    moves = tuple(
        Move(rank, role.source, role.planned_by, role.also_from)
        for rank, role in sorted(agreement.roles.items())
        if role.action is Action.PEER and role.source is not None and role.planned_by is not None
    )
    return AgreementRecord(agreement.step, agreement.reason, moves, agreement.lineage)


def from_record(record: AgreementRecord, rank: int, world_size: int) -> Agreement:
    """A follower's agreement: the roles of the ranks that move bytes, and ``rank``'s own.

    Raises ValueError when a move names a rank outside the world, a receiver also sends, or
    a receiver has more than :data:`~peer_recovery.agreement.MAX_SOURCES` sources.
    """
    if record.step is None:
        return Agreement(step=None, roles={}, reason=record.reason)
    received = {m.receiver: m for m in record.moves}
    send_to: dict[int, list[int]] = {}
    for m in record.moves:
        senders = (m.source, *m.also_from)
        if not all(r < world_size for r in (m.receiver, *senders)):
            raise ValueError(f"move {list(senders)}->{m.receiver} outside world size {world_size}")
        if len(senders) > MAX_SOURCES:
            raise ValueError(
                f"rank {m.receiver} has {len(senders)} sources, more than {MAX_SOURCES}"
            )
        for sender in senders:
            if sender in received:
                raise ValueError(f"rank {sender} both receives and sends")
            send_to.setdefault(sender, []).append(m.receiver)
    roles: dict[int, Role] = {}
    for r in {rank, *received, *send_to}:
        move = received.get(r)
        roles[r] = Role(
            rank=r,
            action=Action.LOCAL if move is None else Action.PEER,
            source=None if move is None else move.source,
            send_to=tuple(sorted(send_to.get(r, ()))),
            planned_by=None if move is None else move.planned_by,
            also_from=() if move is None else move.also_from,
        )
    return Agreement(step=record.step, roles=roles, reason=record.reason, lineage=record.lineage)


def lead(
    store: Any,
    prefix: str,
    nnodes: int,
    world_size: int,
    timeout: float,
    job: str | None = None,
) -> Agreement:
    """The leader's part: read everything once, agree, publish (also when it cannot agree).
    ``job``: the job's identity, which every holding used must carry."""
    try:
        agreement = read_inputs(store, prefix, nnodes, world_size, timeout).agree(
            nnodes, world_size, job
        )
    except (ExchangeError, ValueError) as error:
        agreement = Agreement(step=None, roles={}, reason=f"no agreement: {error}")
    publish(store, keys.agreement_key(prefix), to_record(agreement))
    return agreement


def follow(store: Any, prefix: str, rank: int, world_size: int, timeout: float) -> Agreement:
    """Every other rank's part: the leader's agreement (raises ExchangeError when it is not
    there within ``timeout`` + :data:`FOLLOWER_MARGIN_S` or is malformed)."""
    key = keys.agreement_key(prefix)
    (raw,) = read_all(store, [key], timeout + FOLLOWER_MARGIN_S, "the leader's agreement")
    try:
        return from_record(AgreementRecord.from_json(raw, key), rank, world_size)
    except ValueError as error:
        raise ExchangeError(f"{key}: {error}") from None
