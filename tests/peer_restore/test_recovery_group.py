"""The recovery group on real gloo (ranks as threads): its pairs connect only when they talk."""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.distributed as dist

from peer_recovery.peer_restore import _lazy_gloo


def test_two_movers_exchange_while_a_third_member_never_joins() -> None:
    # A full-mesh group (what the recovery group was before) cannot pass this: each member's
    # constructor waits until every member has joined.
    master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    received: dict[int, torch.Tensor] = {}
    errors: list[BaseException] = []

    def member(rank: int) -> None:
        try:
            client = dist.TCPStore("127.0.0.1", master.port, is_master=False)
            pg: Any = _lazy_gloo(dist.PrefixStore("pg/", client), rank, 3, 20.0,
                                 {"GLOO_SOCKET_IFNAME": "lo"})  # fmt: skip
            if rank == 0:
                pg.send([torch.arange(4, dtype=torch.float32)], 1, 0).wait()
            else:
                buffer = torch.zeros(4)
                pg.recv([buffer], 0, 0).wait()
                received[rank] = buffer
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=member, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    assert received[1].tolist() == [0.0, 1.0, 2.0, 3.0]
