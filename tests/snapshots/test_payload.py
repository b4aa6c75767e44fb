"""What a sender sends a receiver: its shard key travels with its state, and a payload
without a well-formed key is refused naming the sender."""

from __future__ import annotations

import json

import pytest

from peer_recovery.recovery import _Failure, _payload, _unpack_payload
from peer_recovery.shard_key import ShardKey

KEY = ShardKey(4, (("shard", 1),), "a" * 64)


def test_the_senders_key_comes_back_as_it_was_sent() -> None:
    payload = json.loads(json.dumps(_payload(KEY, {"model": {}})))  # JSON-able, no pickle
    assert _unpack_payload(payload, 0) == (KEY, {"model": {}})


@pytest.mark.parametrize(
    ("received", "why"),
    [
        ({"model": {}}, "rank 3 sent no shard key with its state"),
        ({"shard_key": "{", "state": {}}, "rank 3 sent a malformed shard key"),
        ({"shard_key": json.dumps({"world_size": 4}), "state": {}}, "malformed shard key"),
    ],
)
def test_a_payload_without_a_well_formed_key_is_refused(received: object, why: str) -> None:
    with pytest.raises(_Failure, match=why):
        _unpack_payload(received, 3)
