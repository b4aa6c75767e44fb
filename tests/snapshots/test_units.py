"""In-process behaviour of the snapshot parts: encoding, manifests, keys, sizing, votes,
optimizer state creation, the slot protocol, and restore into never-stepped optimizers."""

from __future__ import annotations

import json
import math
import subprocess
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch

from peer_recovery.optim_state import materialize
from peer_recovery.recovery import PeerRecovery, RestoreAbandoned
from peer_recovery.shard_key import ShardKey, state_digest
from peer_recovery.snapshots import settings, sizing
from peer_recovery.snapshots.manifest import Manifest, ManifestError
from peer_recovery.snapshots.metrics import PhaseClock
from peer_recovery.snapshots.store import SnapshotStore
from peer_recovery.snapshots.tree import FlattenError, flatten, unflatten
from peer_recovery.vote import Ballot, decide


def test_tree_round_trip_keeps_types_and_module_metadata() -> None:
    od: OrderedDict[str, Any] = OrderedDict(w=torch.arange(6.0).view(2, 3))
    od._metadata = {"": {"version": 2}}  # type: ignore[attr-defined]
    state = {
        "od": od,
        0: [1, 2.5, math.inf, None, True, "s", b"\x00\xff", (3, torch.tensor(7, dtype=torch.int8))],
        "0": {"nested": [torch.zeros(0, 4, dtype=torch.bfloat16)]},
    }
    flat = flatten(state)
    json.dumps(flat.tree)  # JSON-able, no pickle
    back = unflatten(json.loads(json.dumps(flat.tree)), flat.tensors)
    assert set(back) == {"od", 0, "0"}
    assert type(back["od"]) is OrderedDict and back["od"]._metadata == {"": {"version": 2}}
    assert back[0][:7] == [1, 2.5, math.inf, None, True, "s", b"\x00\xff"]
    assert isinstance(back[0][7], tuple) and back[0][7][0] == 3
    assert back[0][7][1].dtype == torch.int8 and back["0"]["nested"][0].shape == (0, 4)


@pytest.mark.parametrize("bad", [object(), {1.5j: 1}, {"k": {(1, 2): 3}}])
def test_tree_refuses_what_it_cannot_store_naming_where(bad: Any) -> None:
    with pytest.raises(FlattenError, match="cannot snapshot"):
        flatten({"state": bad})


def test_digest_ignores_order_and_values_but_not_shapes_or_names() -> None:
    a = state_digest([("x", "float32", (2, 3)), ("y", "int64", ())], ["lr"])
    assert a == state_digest([("y", "int64", ()), ("x", "float32", (2, 3))], ["lr"])
    assert a != state_digest([("x", "float32", (3, 2)), ("y", "int64", ())], ["lr"])
    assert a != state_digest([("x", "float16", (2, 3)), ("y", "int64", ())], ["lr"])
    assert a != state_digest([("x", "float32", (2, 3)), ("z", "int64", ())], ["lr"])
    key = ShardKey(4, ShardKey.make_position({"tp": 1}), a)
    assert ShardKey.from_json(json.loads(json.dumps(key.to_json()))) == key
    assert "world size 8" in (key.mismatch(ShardKey(8, key.position, a)) or "")
    assert "parallel position" in (key.mismatch(ShardKey(4, (("tp", 0),), a)) or "")


def _manifest(tmp_path: Path) -> Manifest:
    store = SnapshotStore(tmp_path, rank=0)
    model = torch.nn.Linear(3, 2)
    flat = flatten({"model": model.state_dict()})
    from peer_recovery.snapshots.live import flat_digest

    pending = store.write_data(5, ShardKey(1, (), flat_digest(flat)), flat, None)
    return store.commit(pending)


def test_manifest_round_trip_and_damage_is_refused(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    raw = manifest.encode()
    assert Manifest.decode(raw) == manifest
    assert manifest.summary()["step"] == 5 and manifest.summary()["checksum"].startswith("b2:")
    with pytest.raises(ManifestError, match="own checksum"):
        Manifest.decode(raw.replace(b'"step":5', b'"step":6'))
    with pytest.raises(ManifestError, match="not JSON"):
        Manifest.decode(raw[:-3])
    body = manifest.body()
    body["replicated"]["tensors"][1][3] = 0  # the bias now overlaps the weight
    forged = json.dumps(body, separators=(",", ":"), sort_keys=True)
    import zlib

    with pytest.raises(ManifestError, match="overlaps"):
        Manifest.decode(json.dumps({"body": body, "crc32": zlib.crc32(forged.encode())}).encode())


@pytest.mark.parametrize(
    ("field", "bad", "message"),
    [
        (0, 7, "layout entry names"),
        (2, [3, -1], "shape of .* must be an int >= 0"),
        (2, [3, True], "shape of .* must be an int >= 0"),
        (3, -8, "offset of .* must be an int >= 0"),
        (4, 1.5, "size of .* must be an int >= 0"),
    ],
)
def test_manifest_entries_are_checked_field_by_field_in_any_json_layout(
    tmp_path: Path, field: int, bad: Any, message: str
) -> None:
    """``decode`` reads what ``encode`` wrote without encoding it again, and also accepts
    the same body in another JSON layout; every entry's fields are checked either way."""
    import zlib

    manifest = _manifest(tmp_path)
    body = manifest.body()
    canonical = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    spaced = json.dumps({"crc32": zlib.crc32(canonical), "body": body}, indent=1).encode()
    assert Manifest.decode(spaced) == manifest
    body["replicated"]["tensors"][0][field] = bad
    canonical = json.dumps(body, separators=(",", ":"), sort_keys=True).encode()
    forged = b'{"body":' + canonical + b',"crc32":' + str(zlib.crc32(canonical)).encode() + b"}"
    with pytest.raises(ManifestError, match=message):
        Manifest.decode(forged)


def test_writes_alternate_slots_and_invalidate_before_overwriting(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, rank=0)
    t = torch.arange(10.0)
    flat = flatten({"t": t})
    key = ShardKey(1, (), "0" * 64)
    first = store.commit(store.write_data(1, key, flat, None))
    second = store.commit(store.write_data(2, key, flat, None))
    assert {first.slot, second.slot} == {0, 1}
    pending = store.write_data(3, key, flat, None)  # copied, not committed: "killed" here
    assert pending.manifest.slot == first.slot
    assert not store.manifest_path(first.slot).exists()  # the overwritten slot stopped counting
    found, problems = SnapshotStore(tmp_path, rank=0).scan()
    assert [m.step for m in found] == [2] and problems == []


def test_checksums_in_threads_equal_one_thread_and_catch_a_flipped_bit(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path, rank=0)
    flat = flatten({"t": torch.arange(3 << 20, dtype=torch.float32)})  # 12 MiB
    pending = store.write_data(1, ShardKey(1, (), "0" * 64), flat, None)
    chunk = 1 << 20  # 12 chunks, so threads really split them
    one = store._checksums(pending.manifest.slot, pending.manifest.data_bytes, chunk, 1)
    assert store._checksums(pending.manifest.slot, pending.manifest.data_bytes, chunk, 4) == one
    manifest = store.commit(pending, threads=4)
    assert store.verify(manifest) is None
    store._map(manifest.slot)[(5 << 20) + 7] ^= 1  # one bit, inside the tensor
    assert "failed its checksum" in (store.verify(manifest) or "")


def test_sizing_decision_names_the_shortfall() -> None:
    gib = 1 << 30
    ok, line = sizing.decide(sizing.Sizing(4 * gib, 0, 3 * gib, None, None), "/dev/shm/x")
    assert not ok and "NOT ENOUGH SPACE" in line and "lacks 1.00 GiB" in line
    ok, line = sizing.decide(sizing.Sizing(4 * gib, 0, 9 * gib, 3 * gib, 0), "/dev/shm/x")
    assert not ok and "memory limit" in line
    ok, line = sizing.decide(sizing.Sizing(2 * gib, 0, 9 * gib, 8 * gib, 7 * gib), "/dev/shm/x")
    assert not ok and "already in use" in line
    ok, line = sizing.decide(sizing.Sizing(2 * gib, 2 * gib, 0, None, None), "/dev/shm/x")
    assert ok and line.endswith(": ok")  # reusing existing slots needs no new space


def test_too_small_store_fails_at_restore_with_a_clear_error(tmp_path: Path) -> None:
    """The filesystem's free space is stated (injected) here; the next test uses a real one."""

    def tiny(directory: Path, need: int, allocated: int) -> sizing.Sizing:
        real = sizing.probe(directory, need, allocated)
        return sizing.Sizing(need, allocated, 1 << 20, real.memory_limit, real.memory_used)

    model = torch.nn.Linear(1024, 1024)
    store = SnapshotStore(tmp_path / "shm", rank=0, probe=tiny)
    recovery = PeerRecovery({"model": model}, store=store)
    with pytest.raises(sizing.SizingError, match="NOT ENOUGH SPACE"):
        recovery.restore()
    assert not store.data_path(0).exists()


def test_capacity_can_be_decided_without_allocating_and_one_slot_opened_alone(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A receiving rank decides the sizing first, allocates only the slot a peer's bytes go
    to, and completes the store in the background; a failure there is logged, not raised."""
    store = SnapshotStore(tmp_path / "shm", rank=0)
    store.ensure_capacity(8 << 20, slots=())
    assert [store.capacity(slot) for slot in (0, 1)] == [0, 0]
    assert store.sizing_line is not None and "need 16.00 MiB for two slots" in store.sizing_line
    slot, buf = store.open_slot(8 << 20, only=True)
    assert store.capacity(slot) >= 8 << 20 and store.capacity(1 - slot) == 0
    assert buf.numel() == store.capacity(slot)
    store.complete_capacity(8 << 20)
    assert store.capacity(1 - slot) == store.capacity(slot)

    def tiny(directory: Path, need: int, allocated: int) -> sizing.Sizing:
        return sizing.Sizing(need, allocated, 1 << 20, None, None)

    small = SnapshotStore(tmp_path / "small", rank=0, probe=tiny)
    with pytest.raises(sizing.SizingError, match="NOT ENOUGH SPACE"):
        small.ensure_capacity(8 << 20, slots=())  # deciding alone still refuses
    with caplog.at_level("WARNING", logger="peer_recovery"):
        small.complete_capacity(8 << 20)
    assert "could not preallocate the snapshot slots" in caplog.text
    assert [small.capacity(slot) for slot in (0, 1)] == [0, 0]


def test_phase_clock_adds_up_named_phases_in_order() -> None:
    clock = PhaseClock()
    for name in ("agree", "transfer", "agree"):
        clock.lap(name)
    assert list(clock.phases) == ["agree", "transfer"]
    assert all(seconds >= 0 for seconds in clock.phases.values())
    assert clock.describe().startswith("agree=") and " transfer=" in clock.describe()


def test_too_small_real_tmpfs_fails_at_preallocation(tmp_path: Path) -> None:
    """A real 1 MiB tmpfs (needs mount privileges; skipped without them)."""
    mount = tmp_path / "tmpfs"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        recovery = PeerRecovery({"model": torch.nn.Linear(512, 512)}, directory=str(mount))
        with pytest.raises(sizing.SizingError, match="NOT ENOUGH SPACE") as raised:
            recovery.restore()
        assert str(mount) in str(raised.value)
    finally:
        subprocess.run(["umount", str(mount)], check=False)


def test_vote_decision_and_ballots() -> None:
    ballot = Ballot(False, None, "snapshot store gone ✗" * 100)
    back = Ballot.decode(ballot.encode())
    assert not back.ok and back.step is None and back.reason.startswith("snapshot store gone ✗")
    assert decide([Ballot(True, 7), Ballot(True, 7)]).ok
    outcome = decide([Ballot(True, 7), Ballot(False, None, "wiped"), Ballot(True, 7)])
    assert not outcome.ok and outcome.failed == {1: "wiped"} and "rank 1: wiped" in outcome.reason
    assert not decide([Ballot(True, 7), Ballot(True, 6)]).ok  # different steps never commit


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1),
        lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, weight_decay=0.01, nesterov=True),
    ],
    ids=["AdamW", "SGD-momentum"],
)
def test_materialize_creates_state_without_touching_parameters(make: Any) -> None:
    model = torch.nn.Linear(5, 3)
    with torch.no_grad():
        model.weight[0, :2] = torch.tensor([-0.0, 0.0])
    before = [p.detach().clone() for p in model.parameters()]
    optim = make(model.parameters())
    undo = materialize(optim)
    assert undo is not None and len(optim.state) == 2
    for old, new in zip(before, model.parameters(), strict=True):
        assert torch.equal(old.view(torch.int32), new.detach().view(torch.int32))  # bitwise
        assert new.grad is None
    assert optim.param_groups[0]["lr"] in (1e-3, 0.1)
    undo()
    assert not optim.state
    assert materialize(make([torch.nn.Parameter(torch.ones(2))])) is not None


def _train(model: torch.nn.Module, optim: Any, steps: int) -> None:
    for _ in range(steps):
        model(torch.randn(4, 6)).square().sum().backward()
        optim.step()
        optim.zero_grad()


@pytest.mark.parametrize("kind", ["AdamW", "SGD"])
def test_restore_into_never_stepped_optimizer_is_bitwise(tmp_path: Path, kind: str) -> None:
    def build(seed: int) -> tuple[torch.nn.Module, Any]:
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.GELU(), torch.nn.Linear(8, 2))
        if kind == "AdamW":
            return model, torch.optim.AdamW(model.parameters(), lr=1e-2)
        return model, torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)

    model, optim = build(0)
    _train(model, optim, 3)
    PeerRecovery({"m": model, "o": optim}, directory=str(tmp_path), async_snapshot=False).snapshot(
        3
    )
    fresh_model, fresh_optim = build(1)
    result = PeerRecovery({"m": fresh_model, "o": fresh_optim}, directory=str(tmp_path)).restore()
    assert result is not None and result.step == 3
    # Equal now, and equal after training on: the optimizer state really was restored.
    torch.manual_seed(5)
    _train(model, optim, 2)
    torch.manual_seed(5)
    _train(fresh_model, fresh_optim, 2)
    for a, b in zip(model.parameters(), fresh_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_snapshot_taken_before_the_first_step_restores_an_empty_optimizer(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 3)
    optim = torch.optim.AdamW(model.parameters())
    PeerRecovery({"m": model, "o": optim}, directory=str(tmp_path), async_snapshot=False).snapshot(
        0
    )
    fresh = torch.nn.Linear(3, 3)
    fresh_optim = torch.optim.AdamW(fresh.parameters())
    assert (
        PeerRecovery({"m": fresh, "o": fresh_optim}, directory=str(tmp_path)).restore() is not None
    )
    assert not fresh_optim.state and torch.equal(fresh.weight, model.weight)


def test_settings_precedence_argument_then_env_then_default() -> None:
    env = {settings.ENV_DIR: "/from/env", settings.ENV_ASYNC: "no"}
    assert settings.resolve("/arg", settings.ENV_DIR, "/default", str, env) == "/arg"
    assert settings.resolve(None, settings.ENV_DIR, "/default", str, env) == "/from/env"
    assert settings.resolve(None, settings.ENV_DIR, "/default", str, {}) == "/default"
    assert settings.resolve(None, settings.ENV_ASYNC, True, settings.parse_bool, env) is False
    with pytest.raises(ValueError, match="PEER_RECOVERY_SNAPSHOT_ASYNC='maybe'"):
        settings.resolve(
            None, settings.ENV_ASYNC, True, settings.parse_bool, {settings.ENV_ASYNC: "maybe"}
        )


def test_a_load_that_fails_after_the_vote_passed_ends_the_restore(tmp_path: Path) -> None:
    """Every rank voted to resume: a failing load must not turn into ``None`` (others train)."""

    class Refuses:
        def __init__(self) -> None:
            self.value = 1

        def state_dict(self) -> dict[str, Any]:
            return {"value": self.value}

        def load_state_dict(self, state: dict[str, Any]) -> None:
            raise ValueError("this build cannot take that value")

    model = torch.nn.Linear(2, 2)
    PeerRecovery(
        {"m": model, "r": Refuses()}, directory=str(tmp_path), async_snapshot=False
    ).snapshot(1)
    recovery = PeerRecovery({"m": torch.nn.Linear(2, 2), "r": Refuses()}, directory=str(tmp_path))
    with pytest.raises(RestoreAbandoned, match=r"must not train.*cannot take that value"):
        recovery.restore()


def test_gc_paused_restores_the_collectors_state_even_on_error() -> None:
    import gc

    from peer_recovery._gc import gc_paused

    assert gc.isenabled()
    with pytest.raises(RuntimeError), gc_paused():
        assert not gc.isenabled()
        raise RuntimeError("the work failed")
    assert gc.isenabled()
    gc.disable()
    try:
        with gc_paused():
            pass
        assert not gc.isenabled()  # left as the caller had it
    finally:
        gc.enable()
