"""Every record of the round's store protocol, as a typed dataclass with its JSON codec.

``to_json`` gives what is published; ``from_json`` checks what was read field by field and
raises :class:`~peer_recovery.protocol.codec.ExchangeError` (or, for a plan,
:class:`PlanError`) naming the record and the field. Keys are in ``keys``; the encoding and
its size cap in ``codec``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from peer_recovery.contract.names import Mode, PlannedBy
from peer_recovery.protocol.codec import ExchangeError

__all__ = [
    "AgentRecord",
    "AgreementRecord",
    "Directive",
    "Holding",
    "LoadCheckpointMarker",
    "Move",
    "OrdinalClaim",
    "PlanEntry",
    "PlanError",
    "PlanRecord",
    "PodIdentity",
    "RankAgreed",
    "RankResult",
    "WorkerRecord",
    "canonical_key",
]

_REASON_MAX = 2048


class PlanError(ValueError):
    """A plan was present but malformed; the message names where it came from."""


def _int(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{what} must be an int >= 0, got {value!r}")
    return value


def _str(value: Any, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} must be a string, got {value!r:.80}")
    return value


def _opt_int(value: Any, what: str) -> int | None:
    return None if value is None else _int(value, what)


def _opt_choice(value: Any, allowed: tuple[str, ...], what: str) -> str | None:
    if value is None:
        return None
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")
    return str(value)


def _parse(cls_name: str, where: str, parse: Any) -> Any:
    try:
        return parse()
    except (KeyError, TypeError, ValueError) as error:
        raise ExchangeError(f"{where}: malformed {cls_name}: {error}") from None


def canonical_key(shard_key_json: Any) -> str:
    """One string per shard key, so that keys compare as strings in the agreement."""
    return json.dumps(shard_key_json, sort_keys=True, separators=(",", ":"))


# --- agents -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Holding:
    """One snapshot a pod holds: whose rank's state, at which step, under which shard key,
    and its identity (the job that took it, its lineage, the checksum of its content)."""

    rank: int
    step: int
    shard_key: str
    nbytes: int = 0
    job: str = ""
    lineage: str = ""
    checksum: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "step": self.step, "shard_key": self.shard_key,
                "nbytes": self.nbytes, "job": self.job, "lineage": self.lineage,
                "checksum": self.checksum}  # fmt: skip

    @classmethod
    def from_json(cls, raw: Mapping[str, Any]) -> Holding:
        return cls(
            _int(raw["rank"], "rank"),
            _int(raw["step"], "step"),
            str(raw["shard_key"]),
            _int(raw.get("nbytes", 0), "nbytes"),
            _str(raw.get("job", ""), "job"),
            _str(raw.get("lineage", ""), "lineage"),
            _str(raw.get("checksum", ""), "checksum"),
        )


@dataclass(frozen=True)
class AgentRecord:
    """``agent/<o>``: one pod's agent, its host and the snapshots it holds."""

    ordinal: int
    host: str
    pid: int
    holdings: tuple[Holding, ...] = ()

    def to_json(self) -> dict[str, Any]:
        return {"ordinal": self.ordinal, "host": self.host, "pid": self.pid,
                "holdings": [h.to_json() for h in self.holdings]}  # fmt: skip

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str) -> AgentRecord:
        return _parse(
            "agent record",
            where,
            lambda: cls(
                _int(raw["ordinal"], "ordinal"),
                str(raw.get("host") or ""),
                _int(raw.get("pid", 0), "pid"),
                tuple(Holding.from_json(h) for h in raw["holdings"]),
            ),
        )


@dataclass(frozen=True)
class PlanEntry:
    """One target pod's plan: stream from ``source`` (``Mode.PEER``) or restore locally.

    ``target`` and ``source`` are pod ordinals. It comes from a plan source (the operator's
    PeerRecovery, a plan file) and is published under ``plan/<o>``.
    """

    target: int
    source: int | None
    mode: Mode
    planned_by: PlannedBy
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "source": self.source,
            "mode": self.mode.value,
            "plannedBy": self.planned_by.value,
            "reason": self.reason,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str) -> PlanEntry:
        """Validate one entry; ``where`` names it in errors."""
        if not isinstance(raw, Mapping):
            raise PlanError(f"{where}: a plan entry must be an object")
        target = raw.get("target")
        source = raw.get("source")
        if not isinstance(target, int) or isinstance(target, bool) or target < 0:
            raise PlanError(f"{where}: 'target' must be a pod ordinal, got {target!r}")
        try:
            mode = Mode(raw.get("mode", Mode.PEER.value))
            planned_by = PlannedBy(raw.get("plannedBy", PlannedBy.OPERATOR.value))
        except ValueError as exc:
            raise PlanError(f"{where}: {exc}") from None
        if mode is Mode.PEER:
            if not isinstance(source, int) or isinstance(source, bool) or source < 0:
                raise PlanError(
                    f"{where}: a Peer plan needs 'source' as a pod ordinal, got {source!r}"
                )
            if source == target:
                raise PlanError(f"{where}: pod {target} cannot be its own source")
        elif source is not None:
            raise PlanError(f"{where}: a Local plan has no 'source' (got {source!r})")
        reason = raw.get("reason", "")
        return cls(target, source, mode, planned_by, reason if isinstance(reason, str) else "")


@dataclass(frozen=True)
class PlanRecord:
    """``plan/<o>``: the pod's plan, or None (it holds snapshots, or no plan came)."""

    plan: PlanEntry | None

    def to_json(self) -> dict[str, Any]:
        return {"plan": None if self.plan is None else self.plan.to_json()}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str) -> PlanRecord:
        plan = raw.get("plan")
        try:
            return cls(None if plan is None else PlanEntry.from_json(plan, where))
        except PlanError as error:
            raise ExchangeError(str(error)) from None


@dataclass(frozen=True)
class Directive:
    """``directive``: rank 0's agent's word for the round, read by every worker."""

    #: Why the job must load its checkpoint this round; None when it need not.
    load_checkpoint: str | None
    pods_per_replica: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"load_checkpoint": self.load_checkpoint, "pods_per_replica": self.pods_per_replica}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str) -> Directive:
        def parse() -> Directive:
            reason = raw.get("load_checkpoint")
            k = raw.get("pods_per_replica")
            if k is not None and (_int(k, "pods_per_replica") < 1):
                raise ValueError(f"pods_per_replica must be >= 1, got {k!r}")
            return cls(None if reason is None else str(reason)[:_REASON_MAX], k)

        return _parse("directive", where, parse)


@dataclass(frozen=True)
class LoadCheckpointMarker:
    """``load-checkpoint``: left by a worker whose transfer failed, consumed by rank 0's
    agent in the next round's directive."""

    round_no: int
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"round": self.round_no, "reason": self.reason}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str) -> LoadCheckpointMarker:
        return _parse(
            "load-checkpoint marker",
            where,
            lambda: cls(
                _int(raw.get("round", 0), "round"),
                str(raw.get("reason") or "a transfer failed")[:_REASON_MAX],
            ),
        )


@dataclass(frozen=True)
class OrdinalClaim:
    """``peer-recovery/ordinal/<c10d rank>``: which pod ordinal an agent stands for."""

    ordinal: int
    host: str
    pid: int

    def to_json(self) -> dict[str, Any]:
        return {"ordinal": self.ordinal, "host": self.host, "pid": self.pid}

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str) -> OrdinalClaim:
        return _parse(
            "ordinal claim",
            where,
            lambda: cls(_int(raw["ordinal"], "ordinal"), str(raw["host"]), _int(raw["pid"], "pid")),
        )


@dataclass(frozen=True)
class PodIdentity:
    """``pod/<o>``: this pod, as a PeerRecovery's ``spec.target`` / ``spec.source`` records
    it (read from the downward-API env by ``peer_recovery.kube.identity``)."""

    pod: str
    uid: str
    namespace: str
    job: str
    replica_type: str
    replica_index: int
    node: str = ""

    def to_json(self) -> dict[str, Any]:
        return {
            "pod": self.pod,
            "uid": self.uid,
            "namespace": self.namespace,
            "job": self.job,
            "replicaType": self.replica_type,
            "replicaIndex": self.replica_index,
            "node": self.node,
        }

    @classmethod
    def from_json(cls, raw: Mapping[str, object], where: str) -> PodIdentity:
        """Parse what another agent published; errors name ``where``."""
        try:
            index = raw["replicaIndex"]
            if not isinstance(index, int) or isinstance(index, bool) or index < 0:
                raise ValueError(f"replicaIndex must be an int >= 0, got {index!r}")
            fields = [raw[k] for k in ("pod", "uid", "namespace", "job", "replicaType")]
            if not all(isinstance(f, str) and f for f in fields):
                raise ValueError(f"pod, uid, namespace, job, replicaType must be text: {fields}")
            node = raw.get("node") or ""
            return cls(*fields, index, str(node))  # type: ignore[arg-type]
        except (KeyError, ValueError) as error:
            raise ValueError(f"{where}: malformed pod identity: {error}") from None


# --- workers ------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerRecord:
    """``worker/<r>``: the shard key of a rank's live state and its checkpoint step."""

    rank: int
    shard_key: str
    checkpoint_step: int | None = None

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "shard_key": self.shard_key,
                "checkpoint_step": self.checkpoint_step}  # fmt: skip

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str) -> WorkerRecord:
        return _parse(
            "worker record",
            where,
            lambda: cls(
                _int(raw["rank"], "rank"),
                str(raw["shard_key"]),
                _opt_int(raw.get("checkpoint_step"), "checkpoint_step"),
            ),
        )


@dataclass(frozen=True)
class RankAgreed:
    """``outcome/<o>/<l>/agreed``: one rank's view of the round's agreement (every rank
    computed the same one), for its pod's agent to report."""

    rank: int
    local_world_size: int
    ok: bool
    step: int | None
    #: "local" or "peer"; None when the round falls back to the checkpoint.
    action: str | None
    source_ordinal: int | None
    planned_by: str | None
    reason: str

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {
            "rank": self.rank,
            "local_world_size": self.local_world_size,
            "ok": self.ok,
            "step": self.step,
            "reason": self.reason,
        }
        for key, value in (
            ("action", self.action),
            ("source_ordinal", self.source_ordinal),
            ("planned_by", self.planned_by),
        ):
            if value is not None:
                record[key] = value
        return record

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str) -> RankAgreed:
        return _parse(
            "record",
            where,
            lambda: cls(
                rank=_int(raw["rank"], "rank"),
                local_world_size=max(1, _int(raw["local_world_size"], "local_world_size")),
                ok=bool(raw["ok"]),
                step=_opt_int(raw.get("step"), "step"),
                action=_opt_choice(raw.get("action"), ("local", "peer"), "action"),
                source_ordinal=_opt_int(raw.get("source_ordinal"), "source_ordinal"),
                planned_by=_opt_choice(
                    raw.get("planned_by"), ("operator", "runtime"), "planned_by"
                ),
                reason=str(raw.get("reason") or "")[:_REASON_MAX],
            ),
        )


@dataclass(frozen=True)
class RankResult:
    """``outcome/<o>/<l>/result``: whether one rank's restore (and the vote) succeeded."""

    rank: int
    restored: bool
    step: int | None
    bytes: int
    seconds: float

    def to_json(self) -> dict[str, Any]:
        return {"rank": self.rank, "restored": self.restored, "step": self.step,
                "bytes": self.bytes, "seconds": self.seconds}  # fmt: skip

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str) -> RankResult:
        def parse() -> RankResult:
            seconds = float(raw.get("seconds") or 0.0)
            if not seconds >= 0:
                raise ValueError(f"seconds={seconds!r}")
            return cls(
                rank=_int(raw["rank"], "rank"),
                restored=bool(raw["restored"]),
                step=_opt_int(raw.get("step"), "step"),
                bytes=_int(raw.get("bytes") or 0, "bytes"),
                seconds=seconds,
            )

        return _parse("record", where, parse)


@dataclass(frozen=True)
class Move:
    """One peer transfer of the round: ``receiver`` gets its state from ``source`` (its
    primary source, as planned) striped with ``also_from`` (other holders of the same
    snapshot, each serving part of the slot)."""

    receiver: int
    source: int
    planned_by: PlannedBy
    also_from: tuple[int, ...] = ()


@dataclass(frozen=True)
class AgreementRecord:
    """``agreement``: the round's agreement as its leader (rank 0) computed it, published
    once for every other rank: the step (None: every rank loads the checkpoint), the
    snapshots' lineage at that step, the reason, and only the moves; every rank not named in
    a move restores locally. A move is ``[receiver, source, plannedBy, [also_from...]]``."""

    step: int | None
    reason: str
    moves: tuple[Move, ...] = ()
    lineage: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "reason": self.reason, "lineage": self.lineage,
                "moves": [[m.receiver, m.source, m.planned_by.value, list(m.also_from)]
                          for m in self.moves]}  # fmt: skip

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str) -> AgreementRecord:
        def move(entry: Any) -> Move:
            if not isinstance(entry, list) or len(entry) != 4 or not isinstance(entry[3], list):
                raise ValueError(
                    f"a move must be [receiver, source, planned_by, [also_from...]], "
                    f"got {entry!r:.200}"
                )
            receiver, source = _int(entry[0], "receiver"), _int(entry[1], "source")
            also = tuple(_int(a, "also_from") for a in entry[3])
            if receiver == source or receiver in also:
                raise ValueError(f"rank {receiver} cannot receive from itself")
            if len({source, *also}) != 1 + len(also):
                raise ValueError(f"rank {receiver} names a source twice: {[source, *also]}")
            return Move(receiver, source, PlannedBy(entry[2]), also)

        def parse() -> AgreementRecord:
            step = _opt_int(raw["step"], "step")
            moves = tuple(move(e) for e in raw.get("moves") or ())
            receivers = [m.receiver for m in moves]
            if len(set(receivers)) != len(receivers):
                raise ValueError(f"a rank receives twice in {receivers}")
            if step is None and moves:
                raise ValueError("moves without a step")
            lineage = raw.get("lineage")
            if lineage is not None and not isinstance(lineage, str):
                raise ValueError(f"lineage must be a string, got {lineage!r}")
            return cls(step, str(raw.get("reason") or ""), moves, lineage)

        return _parse("agreement record", where, parse)
