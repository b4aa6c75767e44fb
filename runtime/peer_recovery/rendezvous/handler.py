"""The ``peer-recovery`` rendezvous handler: c10d's dynamic rendezvous with pinned ranks.

It wraps the ``DynamicRendezvousHandler`` torchrun's ``c10d`` backend would create and
forwards every method and property to it, except that:

- ``get_backend()`` is ``"peer-recovery"``;
- ``next_rendezvous()`` returns this pod's ordinal as the group rank (stock c10d ranks
  agents by host and pid, which reorders them whenever one is replaced). All agents check,
  through the round's store, that their ordinals are distinct and cover ``0..n-1``;
- the bootstrap store address (``MASTER_ADDR``/``MASTER_PORT``) is built per round for the
  pinned rank 0, and c10d runs with ``TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1``: torch's
  shared agent store is created once by the first round's rank 0 and cached, so after an
  agent is replaced the new agent waits for an address nobody publishes (or a new rank 0
  publishes one the others never read). ``use_agent_store`` is forwarded and so reports
  False; rank 0's worker hosts the workers' store, as with every non-shared torchrun.
- after each round it calls the round hook it was made with (the plugin's wiring passes
  :meth:`peer_recovery.rendezvous.round.RoundPublisher.publish`, which publishes this
  pod's snapshot holdings and plan) and points its workers at the round's keys.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable, Mapping
from datetime import timedelta
from typing import Any, Final

from torch.distributed import PrefixStore, Store
from torch.distributed.elastic.rendezvous import (
    RendezvousError,
    RendezvousHandler,
    RendezvousInfo,
    RendezvousParameters,
    RendezvousStoreInfo,
)

from peer_recovery.protocol import keys
from peer_recovery.protocol.codec import publish, read_all
from peer_recovery.protocol.records import OrdinalClaim
from peer_recovery.rendezvous.identity import ordinal_from_env
from peer_recovery.rendezvous.launch import check_launch, torchrun_max_restarts

__all__ = ["BACKEND_NAME", "PeerRecoveryRendezvousHandler", "RoundHook", "create_handler"]

log = logging.getLogger(__name__)

#: ``torchrun --rdzv-backend=peer-recovery``; also what ``get_backend()`` reports.
BACKEND_NAME: Final = "peer-recovery"

_DISABLE_SHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"
#: Bound on waiting for the other agents' ordinals once c10d's round is complete.
_PIN_TIMEOUT_S = 60.0

#: Called after the ranks are pinned: (base store, run id, round, ordinal, nnodes) -> None.
RoundHook = Callable[[Store, str, int, int, int], None]


class PeerRecoveryRendezvousHandler(RendezvousHandler):
    """c10d dynamic rendezvous whose group rank is the pod ordinal."""

    def __init__(
        self,
        inner: RendezvousHandler,
        *,
        base_store: Store,
        endpoint: tuple[str, int],
        ordinal: int,
        ordinal_from: str,
        local_addr: str | None,
        on_round: RoundHook | None = None,
        pin_timeout: float = _PIN_TIMEOUT_S,
    ) -> None:
        self._inner = inner
        self._base_store = base_store
        self._endpoint = endpoint
        self._ordinal = ordinal
        self._ordinal_from = ordinal_from
        self._local_addr = local_addr
        self._on_round = on_round
        self._pin_timeout = pin_timeout

    # --- what differs from c10d --------------------------------------------------------

    def get_backend(self) -> str:
        return BACKEND_NAME

    @property
    def ordinal(self) -> int:
        """This pod's ordinal, which is its group rank in every round."""
        return self._ordinal

    def next_rendezvous(self) -> RendezvousInfo:
        info = self._inner.next_rendezvous()
        store, world_size = info.store, info.world_size
        run_id = self._inner.get_run_id()
        self._pin(store, info.rank, world_size)
        round_no = self._agree_round(store, run_id)
        bootstrap = RendezvousStoreInfo.build(
            self._ordinal,
            PrefixStore("peer-recovery/bootstrap/", store),
            local_addr=self._local_addr,
        )
        self._point_workers(run_id, round_no, world_size)
        if self._on_round is not None:
            self._on_round(self._base_store, run_id, round_no, self._ordinal, world_size)
        log.info(
            "peer-recovery: round %d of %s, pod ordinal %d (from %s) is group rank %d of %d "
            "(c10d had ranked it %d)",
            round_no, run_id, self._ordinal, self._ordinal_from, self._ordinal,
            world_size, info.rank,
        )  # fmt: skip
        return RendezvousInfo(store, self._ordinal, world_size, bootstrap)

    def _pin(self, store: Store, c10d_rank: int, world_size: int) -> None:
        """Publish this agent's ordinal; fail clearly if any two agents claim the same one."""
        if self._ordinal >= world_size:
            raise RendezvousError(
                f"peer-recovery: pod ordinal {self._ordinal} (from {self._ordinal_from}) is out "
                f"of range for a round of {world_size} nodes"
            )
        me = OrdinalClaim(self._ordinal, socket.gethostname(), os.getpid())
        publish(store, keys.ordinal_claim_key(c10d_rank), me)
        claim_keys = [keys.ordinal_claim_key(r) for r in range(world_size)]
        raw = read_all(store, claim_keys, self._pin_timeout, "agent ordinals")
        claims: dict[int, list[str]] = {}
        for value, key in zip(raw, claim_keys, strict=True):
            claim = OrdinalClaim.from_json(value, key)
            claims.setdefault(claim.ordinal, []).append(f"{claim.host}:{claim.pid}")
        twice = {o: who for o, who in claims.items() if len(who) > 1}
        if twice:
            detail = "; ".join(f"ordinal {o} claimed by {', '.join(w)}" for o, w in twice.items())
            raise RendezvousError(f"peer-recovery: two agents claim one pod ordinal: {detail}")

    def _agree_round(self, store: Store, run_id: str) -> int:
        """A job-wide round number, strictly increasing across rounds (fresh key prefix)."""
        key = keys.ROUND_NUMBER_KEY
        if self._ordinal == 0:
            number = self._base_store.add(keys.rounds_key(run_id), 1)
            store.set(key, str(number))
        store.wait([key], timedelta(seconds=self._pin_timeout))
        return int(store.get(key).decode())

    def _point_workers(self, run_id: str, round_no: int, world_size: int) -> None:
        """Workers inherit the agent's environment when torchrun starts them."""
        host, port = self._endpoint
        os.environ[keys.ENV_STORE] = f"{host}:{port}"
        os.environ[keys.ENV_ROUND_PREFIX] = keys.round_prefix(run_id, round_no)
        os.environ[keys.ENV_ROUND] = str(round_no)
        os.environ[keys.ENV_NNODES] = str(world_size)
        os.environ[keys.ENV_ORDINAL] = str(self._ordinal)

    # --- forwarded unchanged -----------------------------------------------------------

    @property
    def use_agent_store(self) -> bool:
        return self._inner.use_agent_store

    def is_closed(self) -> bool:
        return self._inner.is_closed()

    def set_closed(self) -> None:
        self._inner.set_closed()

    def num_nodes_waiting(self) -> int:
        return self._inner.num_nodes_waiting()

    def get_run_id(self) -> str:
        return self._inner.get_run_id()

    def shutdown(self) -> bool:
        return self._inner.shutdown()

    def __getattr__(self, name: str) -> Any:
        # Anything else c10d's handler offers (``settings``, future additions) is its own.
        if name.startswith("__") or name == "_inner":
            raise AttributeError(name)
        return getattr(self._inner, name)


def _log_to_stderr() -> None:
    """torchrun configures only torch's loggers; give the plugin's lines the same stderr."""
    root = logging.getLogger("peer_recovery")
    if not root.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[peer-recovery] %(levelname)s %(message)s"))
        root.addHandler(handler)
        root.setLevel(os.environ.get("PEER_RECOVERY_LOGLEVEL", "INFO"))


def create_handler(
    params: RendezvousParameters,
    round_hook: Callable[[Mapping[str, Any], Mapping[str, str]], RoundHook | None],
) -> PeerRecoveryRendezvousHandler:
    """The handler for ``--rdzv-backend=peer-recovery``; ``round_hook(config, env)`` makes
    the hook called after each round (the plugin's wiring decides what it publishes)."""
    _log_to_stderr()
    from torch.distributed.elastic.rendezvous.c10d_rendezvous_backend import create_backend
    from torch.distributed.elastic.rendezvous.dynamic_rendezvous import (
        create_handler as create_dynamic_handler,
    )
    from torch.distributed.elastic.rendezvous.utils import parse_rendezvous_endpoint

    check_launch(
        run_id=params.run_id,
        min_nodes=params.min_nodes,
        max_nodes=params.max_nodes,
        max_restarts=torchrun_max_restarts(),
    )
    ordinal, ordinal_from = ordinal_from_env(os.environ, params.max_nodes)
    if params.get("store_type", "tcp").strip().lower() != "tcp":
        raise ValueError("peer-recovery: only the tcp store_type is supported (workers read it)")
    os.environ[_DISABLE_SHARED_STORE] = "1"
    backend, store = create_backend(params)
    inner = create_dynamic_handler(store, backend, params)
    return PeerRecoveryRendezvousHandler(
        inner,
        base_store=store,
        endpoint=parse_rendezvous_endpoint(params.endpoint, default_port=29400),
        ordinal=ordinal,
        ordinal_from=ordinal_from,
        local_addr=params.local_addr,
        on_round=round_hook(params.config, os.environ),
    )
