"""GPU smoke check of the transport: run on a CUDA machine, prints PASS/FAIL lines.

Self-contained (needs only torch and this repository): two processes on one machine.

- gloo with CUDA tensors: the sender stages GPU memory through pinned host buffers, the
  receiver gets fresh tensors on the GPU, then receives in place into GPU memory (same
  ``data_ptr``), with and without integrity checks, plus CPU state into a GPU receiver;
- NCCL (device to device) when at least two GPUs exist, fresh and in place;
- a snapshot's local restore from its slot into GPU tensors, through pinned staging.

Exits non-zero on any failure; finishes in well under 5 minutes.

    python benchmarks/gpu_smoke.py
"""

from __future__ import annotations

import multiprocessing
import os
import sys
import tempfile
import time
import traceback
from datetime import timedelta
from typing import Any

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "runtime"))

TIMEOUT = timedelta(seconds=60)


def _state(device: Any, seed: int = 0) -> dict[str, Any]:
    import torch

    g = torch.Generator().manual_seed(seed)
    return {
        "large": torch.randn(1024, 1024, generator=g).to(device),  # 4 MB: chunked
        "noncontig": torch.randn(512, 768, generator=g).to(device).t(),
        "bf16": torch.randn(300, generator=g).bfloat16().to(device),
        "small": [torch.randn(17, generator=g).to(device) for _ in range(50)],
        "opt": {0: {"step": torch.tensor(3.0).to(device), "betas": (0.9, 0.99)}},
    }


def _zeros(state: Any) -> Any:
    import torch

    if isinstance(state, dict):
        return {k: _zeros(v) for k, v in state.items()}
    if isinstance(state, list):
        return [_zeros(v) for v in state]
    return torch.zeros_like(state) if isinstance(state, torch.Tensor) else state


def _flat(state: Any) -> list[Any]:
    import torch

    if isinstance(state, dict):
        return [x for v in state.values() for x in _flat(v)]
    if isinstance(state, (list, tuple)):
        return [x for v in state for x in _flat(v)]
    return [state] if isinstance(state, torch.Tensor) else []


def _check_equal(got: Any, want: Any, device: Any, name: str) -> None:
    import torch

    for a, b in zip(_flat(got), _flat(want), strict=True):
        assert a.device.type == device.type, f"{name}: {a.device} is not on {device}"
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert torch.equal(a.cpu(), b.cpu()), f"{name}: values differ"


def _cases(rank: int, backend: str) -> list[str]:
    import torch
    import torch.distributed as dist

    from peer_recovery.transport import PGTransport

    device = torch.device("cuda", rank if backend == "nccl" else 0)
    torch.cuda.set_device(device)
    pg = dist.group.WORLD
    passed = []

    def case(name: str, send_state: Any, **kw: Any) -> None:
        dist.barrier()
        if rank == 0:
            PGTransport(pg, TIMEOUT, device, integrity=kw.get("integrity")).send_checkpoint(
                [1], send_state, step=5
            )
            return
        targets = kw.get("targets")
        ptrs = [t.data_ptr() for t in _flat(targets)] if targets is not None else None
        transport = PGTransport(
            pg,
            TIMEOUT,
            device,
            (lambda: targets) if targets is not None else None,
            integrity=kw.get("integrity"),
        )
        t0 = time.perf_counter()
        got = transport.recv_checkpoint(0, step=5)
        torch.cuda.synchronize()
        _check_equal(got, send_state, device, name)
        if ptrs is not None:
            assert [t.data_ptr() for t in _flat(got)] == ptrs, f"{name}: not in place"
        rate = transport.stats.payload_bytes / (time.perf_counter() - t0) / 1e9
        passed.append(f"{backend}: {name} ({rate:.2f} GB/s)")

    gpu_state = _state(device)
    case("CUDA tensors, fresh, on the GPU", gpu_state)
    case("in place into GPU memory", gpu_state, targets=_zeros(gpu_state))
    case("in place with integrity checks", gpu_state, targets=_zeros(gpu_state), integrity=True)
    cpu_state = _state(torch.device("cpu"), seed=1)
    case("CPU state into a GPU receiver", cpu_state)
    big = {f"w{i}": torch.randn(64 << 18, device=device) for i in range(4)}  # 1 GB
    case("1 GB of CUDA tensors in place", big, targets=_zeros(big))
    return passed


def _worker(rank: int, store: str, backend: str, out: Any) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    try:
        import torch.distributed as dist

        dist.init_process_group(
            "cpu:gloo,cuda:nccl" if backend == "nccl" else "gloo",
            init_method=f"file://{store}",
            rank=rank,
            world_size=2,
        )
        out.put((rank, True, _cases(rank, backend)))
        dist.barrier()
        dist.destroy_process_group()
    except BaseException:
        out.put((rank, False, traceback.format_exc()))


def _run(backend: str) -> bool:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as tmp:
        procs = [
            ctx.Process(target=_worker, args=(r, os.path.join(tmp, "store"), backend, out))
            for r in range(2)
        ]
        for p in procs:
            p.start()
        results = {}
        try:
            for _ in procs:
                rank, ok, value = out.get(timeout=240)
                results[rank] = (ok, value)
        except Exception as exc:  # queue.Empty: a rank hung
            print(f"FAIL {backend}: no result within 240 s ({type(exc).__name__})")
        finally:
            for p in procs:
                p.join(30)
                if p.is_alive():
                    p.kill()
    good = len(results) == 2 and all(ok for ok, _ in results.values())
    for rank, (ok, value) in sorted(results.items()):
        if ok:
            for line in value:
                print(f"PASS {line}")
        else:
            print(f"FAIL {backend} rank {rank}:\n{value}")
    return good


def _local_restore_to_gpu() -> bool:
    """A snapshot of GPU tensors restored from its slot into GPU tensors in place, through
    pinned staging (``LiveState.load_slot``), bitwise equal; with its rate."""
    import shutil

    import torch

    from peer_recovery.shard_key import ShardKey
    from peer_recovery.snapshots.live import LiveState, flat_digest
    from peer_recovery.snapshots.store import SnapshotStore

    class Holder:
        def __init__(self, tensors: dict[str, Any]) -> None:
            self.tensors = tensors

        def state_dict(self) -> dict[str, Any]:
            return dict(self.tensors)

        def load_state_dict(self, state: dict[str, Any]) -> None:
            assert all(state[k] is self.tensors[k] for k in state)

    device = torch.device("cuda")
    g = torch.Generator().manual_seed(2)
    stored = {f"w{i}": torch.randn(64 << 18, generator=g).to(device) for i in range(4)}
    stored.update({f"s{i}": torch.randn(257, generator=g).to(device) for i in range(2000)})
    stored["half"] = torch.randn(1000, generator=g).half().to(device)
    root = tempfile.mkdtemp(
        prefix="gpu-smoke-slot-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
    )
    try:
        store = SnapshotStore(root, rank=0)
        flat = LiveState({"m": Holder(stored)}).flat()
        key = ShardKey(1, (), flat_digest(flat))
        manifest = store.commit(store.write_data(1, key, flat, None), threads=4)
        targets = {k: torch.zeros_like(v) for k, v in stored.items()}
        live = LiveState({"m": Holder(targets)})
        ptrs = [t.data_ptr() for t in targets.values()]
        t0 = time.perf_counter()
        nbytes = live.load_slot(live.flat(), manifest.replicated, store.mapped(manifest.slot))
        torch.cuda.synchronize()
        rate = nbytes / (time.perf_counter() - t0) / 1e9
        same = all(torch.equal(targets[k], stored[k]) for k in stored)
        in_place = [t.data_ptr() for t in targets.values()] == ptrs
    except Exception:
        print(f"FAIL local restore to the GPU:\n{traceback.format_exc()}")
        return False
    finally:
        shutil.rmtree(root, ignore_errors=True)
    if same and in_place:
        print(
            f"PASS local restore from the slot into GPU tensors, pinned staging ({rate:.2f} GB/s)"
        )
        return True
    print(f"FAIL local restore to the GPU: equal={same} in_place={in_place}")
    return False


def main() -> int:
    import torch

    if not torch.cuda.is_available():
        print("FAIL no CUDA device: this smoke check needs a GPU")
        return 1
    print(
        f"torch {torch.__version__}, {torch.cuda.device_count()} GPU(s): "
        f"{torch.cuda.get_device_name(0)}"
    )
    ok = _local_restore_to_gpu()
    ok = _run("gloo") and ok
    if torch.cuda.device_count() >= 2:
        ok = _run("nccl") and ok
    else:
        print("SKIP nccl: needs two GPUs")
    print("PASS all" if ok else "FAIL some checks")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
