"""Benchmark: snapshot stall and restore time against torch.save / torch.load from disk.

The state is a GPT-2-small-shaped model (124M parameters, fp32, embeddings tied so each
tensor is stored once) with AdamW state and a scheduler, about 1.5 GB. The anchor, measured
in the same run on the same state (alternating with ours, so that both see the same load on a
shared machine), is what a script does without peer-recovery:
``torch.save`` to local disk (plus fsync, as a checkpoint must be durable) and, after a
restart, ``torch.load`` of that file after it has been dropped from the page cache
(``posix_fadvise(DONTNEED)``) followed by ``load_state_dict``. Ratios are anchor / ours.

Usage: ``python benchmarks/snapshot.py [--device cpu|cuda] [--layers 12] [--repeat 3]``
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from peer_recovery.recovery import PeerRecovery


class Block(torch.nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.ln_1, self.ln_2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.c_attn, self.attn_proj = torch.nn.Linear(d, 3 * d), torch.nn.Linear(d, d)
        self.c_fc, self.mlp_proj = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)


class GPT2Small(torch.nn.Module):
    """Parameter shapes of GPT-2 small (the output head is the tied token embedding)."""

    def __init__(self, layers: int = 12, d: int = 768, vocab: int = 50257, ctx: int = 1024) -> None:
        super().__init__()
        self.wte, self.wpe = torch.nn.Embedding(vocab, d), torch.nn.Embedding(ctx, d)
        self.h = torch.nn.ModuleList(Block(d) for _ in range(layers))
        self.ln_f = torch.nn.LayerNorm(d)


def build(layers: int, device: str, seed: int) -> tuple[torch.nn.Module, Any, Any]:
    torch.manual_seed(seed)
    model = GPT2Small(layers).to(device)
    optim = torch.optim.AdamW(model.parameters(), lr=6e-4, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: min(1.0, (s + 1) / 100))
    return model, optim, sched


def one_step(model: torch.nn.Module, optim: Any, sched: Any) -> None:
    """An optimizer step with a synthetic gradient: gives AdamW its state, cheaply."""
    for p in model.parameters():
        p.grad = torch.full_like(p, 1e-3)
    optim.step()
    sched.step()
    optim.zero_grad(set_to_none=True)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--shm", default="/dev/shm", help="memory filesystem for the store")
    parser.add_argument("--disk", default=None, help="local-disk directory for torch.save")
    args = parser.parse_args()

    shm = Path(tempfile.mkdtemp(prefix="bench-snapshot-", dir=args.shm))
    disk = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=args.disk))
    try:
        run(args, shm, disk)
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        shutil.rmtree(disk, ignore_errors=True)


def restore_ours(
    state: dict[str, Any], shm: Path, args: argparse.Namespace, seed: int, step: int
) -> float:
    """Restore into freshly built objects (what a restarted worker does); seconds."""
    fresh = build(args.layers, args.device, seed + 1)
    restored = PeerRecovery(dict(zip(state, fresh, strict=True)), directory=str(shm))
    started = time.perf_counter()
    result = restored.restore()
    sync(args.device)
    seconds = time.perf_counter() - started
    assert result is not None and result.step == step
    # The background prefault of the slots (for the next snapshots) must not overlap the
    # next measurement; the files stay for the next restore.
    restored.close(remove=False)
    return seconds


def save_anchor(state: dict[str, Any], path: Path) -> float:
    """torch.save (+fsync, as a checkpoint must be durable) to local disk; seconds."""
    started = time.perf_counter()
    torch.save({name: obj.state_dict() for name, obj in state.items()}, path)
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return time.perf_counter() - started


def load_anchor(state: dict[str, Any], path: Path, args: argparse.Namespace, seed: int) -> float:
    """torch.load from disk (dropped from the page cache) + load_state_dict; seconds."""
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold: from the disk, not the cache
    os.close(fd)
    fresh = build(args.layers, args.device, seed + 1)
    started = time.perf_counter()
    loaded = torch.load(path, map_location=args.device, weights_only=True)
    for obj, (name, sd) in zip(fresh, loaded.items(), strict=True):
        assert name in state
        obj.load_state_dict(sd)
    sync(args.device)
    return time.perf_counter() - started


def run(args: argparse.Namespace, shm: Path, disk: Path) -> None:
    model, optim, sched = build(args.layers, args.device, 0)
    one_step(model, optim, sched)
    params = sum(p.numel() for p in model.parameters())
    state = {"model": model, "optim": optim, "sched": sched}

    # Ours and the anchor alternate, so that on a shared machine both see the same load.
    path = disk / "checkpoint.pt"
    recovery = PeerRecovery(state, directory=str(shm), async_snapshot=True)
    recovery.snapshot(0)  # first snapshot: preallocation and first touch of the slot pages
    recovery.wait()
    first_stall = recovery.stats.last_stall_seconds
    stalls, commits, saves = [], [], []
    for step in range(1, args.repeat + 1):
        one_step(model, optim, sched)
        sync(args.device)
        stalls.append(recovery.snapshot(step))  # async: training blocked for the copy only
        recovery.wait()
        commits.append(recovery.stats.last_commit_seconds)
        saves.append(save_anchor(state, path))
    nbytes = recovery.stats.last_bytes
    recovery.async_snapshot = False
    sync_totals = []
    for step in range(args.repeat + 1, 2 * args.repeat + 1):
        started = time.perf_counter()
        recovery.snapshot(step)  # sync: copy + checksums + manifest
        sync_totals.append(time.perf_counter() - started)
    restores, loads = [], []
    for seed in range(args.repeat):
        restores.append(restore_ours(state, shm, args, seed, 2 * args.repeat))
        loads.append(load_anchor(state, path, args, seed))
    recovery.close()

    med = statistics.median
    print(
        f"state: {params / 1e6:.1f}M parameters + AdamW state on {args.device}, "
        f"{nbytes / 2**30:.2f} GiB per snapshot; medians of {args.repeat}; "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average at the end {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    )
    rows = [
        ("snapshot stall (async: copy only)", med(stalls), med(saves), "torch.save+fsync"),
        (
            "snapshot total (sync: copy+crc32+manifest)",
            med(sync_totals),
            med(saves),
            "torch.save+fsync",
        ),
        (
            "restore (fresh objects, crc32 verified)",
            med(restores),
            med(loads),
            "torch.load cold+load_state_dict",
        ),
    ]
    print(f"{'operation':46} {'ours s':>8} {'anchor s':>9} {'ratio':>7}  anchor")
    for label, ours, anchor, anchor_label in rows:
        print(f"{label:46} {ours:8.3f} {anchor:9.3f} {anchor / ours:6.1f}x  {anchor_label}")
    print(
        f"first snapshot stall (page first touch): {first_stall:.3f} s; "
        f"background commit (crc32 of {nbytes / 2**30:.2f} GiB + manifest): {med(commits):.3f} s "
        f"= {nbytes / med(commits) / 1e9:.1f} GB/s"
    )
    runs = {"stall": stalls, "save": saves, "restore": restores, "load": loads}
    print(
        "each run, s: "
        + "; ".join(f"{k} " + " ".join(f"{v:.2f}" for v in vs) for k, vs in runs.items())
    )


if __name__ == "__main__":
    main()
