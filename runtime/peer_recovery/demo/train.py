"""The demo's training script: a small transformer with AdamW, data-parallel over gloo.

Run by torchrun in every pod (``-m peer_recovery.demo.train``). It restores through
``PeerRecovery.restore`` (local snapshot, peer, or ``None``: load the checkpoint; under
the ``peer-recovery`` rendezvous backend the ranks agree first), trains, snapshots every
few steps, and writes what it did as JSON under ``--out`` for the driver:
``restore-round<R>-rank<r>.json`` after restoring and ``final-rank<r>.json`` at the end,
each with a SHA-256 of the model's and optimizer's state (bitwise identity across ranks
is what the driver checks).

Until the driver releases the job (``<out>/released``), the first run stops at
``--pause-at`` and waits there to be killed, as a job would be when a pod is lost.
At the checkpoint step every rank also writes the job's checkpoint with
``torch.distributed.checkpoint``. After a restore and the first step that follows it, the
script times the storage path: every rank loading that checkpoint at once with DCP's
``FileSystemReader`` and ``load_state_dict``, after its files were dropped from the page
cache (``posix_fadvise(DONTNEED)``: dropping every cache needs root). The restore report
carries wall-clock times (worker start, restore call, restore end, first step) for the
driver's table of where the resume goes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from peer_recovery.recovery import PeerRecovery


class TinyLM(nn.Module):
    def __init__(self, vocab: int, width: int, layers: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, 4, width * 4, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(width, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def digest_state(named_state_dicts: Iterable[tuple[str, Any]]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes (a DTensor's local shard),
    and the scalar leaves: equal digests mean bitwise-equal state."""
    digest = hashlib.sha256()

    def walk(prefix: str, value: Any) -> None:
        if hasattr(value, "to_local"):
            value = value.to_local()
        if isinstance(value, torch.Tensor):
            t = value.detach().contiguous().cpu()
            digest.update(f"{prefix}:{t.dtype}:{tuple(t.shape)}".encode())
            digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                walk(f"{prefix}/{key}", value[key])
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f"{prefix}/{i}", item)
        else:
            digest.update(f"{prefix}={value!r}".encode())

    for name, state_dict in named_state_dicts:
        walk(name, state_dict)
    return digest.hexdigest()


def state_hash(model: nn.Module, optim: torch.optim.Optimizer) -> str:
    """The digest of the demo's model and optimizer state."""
    return digest_state([("model", model.state_dict()), ("optim", optim.state_dict())])


def train_step(
    model: nn.Module, optim: torch.optim.Optimizer, step: int, vocab: int, group: Any
) -> float:
    rank, world = dist.get_rank(), dist.get_world_size(group)
    gen = torch.Generator().manual_seed(step * 1009 + rank)
    tokens = torch.randint(0, vocab, (8, 33), generator=gen)
    logits = model(tokens[:, :-1])
    loss = nn.functional.cross_entropy(logits.reshape(-1, vocab), tokens[:, 1:].reshape(-1))
    optim.zero_grad(set_to_none=False)
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= world
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    optim.step()
    return float(loss)


def process_started_at() -> float:
    """This process's start (wall clock) from ``/proc``: interpreter and imports included."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, IndexError, ValueError):
        return time.time()


def _write(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(value))
    tmp.rename(path)


def _drop_from_page_cache(directory: Path) -> None:
    """Evict the checkpoint's files from the page cache without root privileges: flush, then
    ``posix_fadvise(DONTNEED)`` on every file (``drop_caches`` would need root)."""
    for path in sorted(directory.rglob("*")):
        if not path.is_file():
            continue
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def save_dcp_checkpoint(model: nn.Module, optim: torch.optim.Optimizer, path: Path) -> None:
    """The job's checkpoint as users write it: ``torch.distributed.checkpoint`` (collective;
    replicated tensors are written once)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optim)
    dcp.save({"model": model_sd, "optim": optim_sd}, storage_writer=dcp.FileSystemWriter(path))


def time_storage_load(path: Path, build: Any) -> float:
    """The storage path: every rank loads the DCP checkpoint at ``path`` at once, cold
    (``FileSystemReader``, then ``load_state_dict`` into a model and optimizer built by
    ``build``, which leaves the live ones untouched); the slowest rank's seconds."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model, optim = build()
    if dist.get_rank() == 0:
        _drop_from_page_cache(path)
    dist.barrier()
    started = time.perf_counter()
    # Part of the load, as on the peer path: a never-stepped optimizer gets its state here.
    model_sd, optim_sd = get_state_dict(model, optim)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, storage_reader=dcp.FileSystemReader(path))
    set_state_dict(model, optim, model_state_dict=state["model"], optim_state_dict=state["optim"])
    took = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
    dist.all_reduce(took, op=dist.ReduceOp.MAX)
    return float(took)


def main() -> None:
    imported_at = time.time()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--pause-at", type=int, default=20)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--snapshot-every", type=int, default=5)
    parser.add_argument("--checkpoint-at", type=int, default=10)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument(
        "--shards",
        type=int,
        default=1,
        help="pods per replica: rank r holds shard r %% shards (a model of its own width)",
    )
    args = parser.parse_args()
    out: Path = args.out
    logging.basicConfig(
        level=logging.INFO,
        format=f"[rank {os.environ.get('RANK', '?')}] %(name)s %(levelname)s %(message)s",
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    round_no = int(os.environ.get("PEER_RECOVERY_ROUND", "0"))
    shard = rank % args.shards
    # Every rank creates every replicate group, in the same order (new_group is collective).
    groups = [dist.new_group(list(range(s, world, args.shards))) for s in range(args.shards)]
    grouped_at = time.time()

    def build() -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(shard)
        model = TinyLM(args.vocab, args.width + 8 * shard, args.layers)
        return model, torch.optim.AdamW(model.parameters(), lr=1e-3)

    model, optim = build()
    recovery = PeerRecovery.from_env(
        {"model": model, "optim": optim},
        async_snapshot=False,
        position={"shard": shard} if args.shards > 1 else None,
    )
    checkpoint = out / f"checkpoint-shard{shard}.pt"
    dcp_checkpoint = out / "checkpoint-dcp"
    meta = out / "checkpoint.json"
    checkpoint_step = json.loads(meta.read_text())["step"] if meta.exists() else None

    # Both paths are timed from a barrier of every rank (the storage path below too), so
    # neither counts the other ranks' start-up skew.
    dist.barrier()
    restore_at = time.time()
    started = time.perf_counter()
    result = recovery.restore(checkpoint_step)  # peer-aware under the plugin
    if result is not None:
        step = result.step
        report: dict[str, Any] = {
            "role": result.role.value,
            "source": result.source,
            "bytes": result.bytes,
            "seconds": result.seconds,
            "phases": recovery.stats.restore_phases,
        }
    elif checkpoint_step is not None:
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
        model.load_state_dict(saved["model"])
        optim.load_state_dict(saved["optim"])
        step, report = checkpoint_step, {"role": "checkpoint", "source": str(checkpoint)}
    else:
        step, report = 0, {"role": "fresh", "source": "initialisation"}
    took = time.perf_counter() - started  # before the hash below, which is not the restore's
    report.update(
        rank=rank,
        round=round_no,
        step=step,
        total_seconds=took,
        hash=state_hash(model, optim),
        shard=shard,
        started_at=process_started_at(),
        imported_at=imported_at,
        grouped_at=grouped_at,
        restore_at=restore_at,
        restored_at=restore_at + took,
    )
    pending: dict[str, Any] | None = report  # written after the first step that follows

    def finish_report() -> None:
        nonlocal pending
        if pending is None:
            return
        if result is not None and dcp_checkpoint.exists() and args.shards == 1:
            pending["storage_seconds"] = time_storage_load(dcp_checkpoint, build)
            pending["storage_bytes"] = sum(
                f.stat().st_size for f in dcp_checkpoint.rglob("*") if f.is_file()
            )
            pending["checkpoint_step"] = checkpoint_step
        _write(out / f"restore-round{round_no}-rank{rank}.json", pending)
        pending = None

    # The hash of the last snapshot before the pause: what a replaced rank resumes from.
    last_snapshot = (args.pause_at // args.snapshot_every) * args.snapshot_every
    snapshot_hash = None
    while step < args.steps:
        if step == args.pause_at and not (out / "released").exists():
            finish_report()
            _write(
                out / f"paused-rank{rank}.json",
                {"step": step, "hash": state_hash(model, optim),
                 "snapshot_step": last_snapshot, "snapshot_hash": snapshot_hash},
            )  # fmt: skip
            while True:  # a pod is about to be lost; torchrun stops this worker
                time.sleep(0.2)
        train_step(model, optim, step, args.vocab, groups[shard])
        step += 1
        if pending is not None:
            pending["first_step_at"] = time.time()
            finish_report()
        if step % args.snapshot_every == 0:
            recovery.snapshot(step)
            if step == last_snapshot:
                snapshot_hash = state_hash(model, optim)
        if step == args.checkpoint_at:
            if rank < args.shards:  # the first replica writes each shard's checkpoint
                torch.save({"model": model.state_dict(), "optim": optim.state_dict()}, checkpoint)
            if args.shards == 1:
                save_dcp_checkpoint(model, optim, dcp_checkpoint)
            dist.barrier()
            if rank == 0:
                _write(meta, {"step": step})
    finish_report()
    final = {"step": step, "hash": state_hash(model, optim), "shard": shard}
    _write(out / f"final-rank{rank}.json", final)
    dist.barrier()
    recovery.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
