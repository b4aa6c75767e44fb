# The example trainer image's script (examples/trainer/Dockerfile): the DDP recipe of
# docs/user-guide.md, unchanged but for the lines marked "pacing", which slow each step
# (--step-seconds) so there is time to delete a pod and watch it recover.
# tests/packaging/test_images.py checks that everything else is the recipe.
# recipe: train_ddp.py
"""Data-parallel (DDP) training with peer recovery: the whole script."""

import argparse
import os
import time  # pacing
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from peer_recovery import PeerRecovery, RNGState


def latest_checkpoint(directory: Path) -> int | None:
    marker = directory / "latest"
    return int(marker.read_text()) if marker.exists() else None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--snapshot-every", type=int, default=10)
    parser.add_argument("--checkpoint-every", type=int, default=100)
    parser.add_argument("--checkpoint-dir", type=Path, default=Path("/checkpoints"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--step-seconds", type=float, default=0.0)  # pacing
    args = parser.parse_args()

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"])) if cuda else torch.device("cpu")
    torch.manual_seed(args.seed)  # the same initial weights on every rank

    model = DDP(
        nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Dropout(0.1), nn.Linear(64, 1)).to(device)
    )
    optim = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(optim, step_size=50, gamma=0.5)
    data = TensorDataset(torch.randn(4096, 32), torch.randn(4096, 1))
    sampler = DistributedSampler(data, seed=args.seed)  # the same order after any restart
    loader = DataLoader(data, batch_size=32, sampler=sampler)

    # 1. Register what to snapshot: replicated state, and apart from it rank-private state.
    recovery = PeerRecovery.from_env(
        {"model": model, "optim": optim, "sched": sched}, private={"rng": RNGState()}
    )
    # 2. Once, at start-up, on every rank: resume from snapshots or peers if every rank can.
    checkpoint_step = latest_checkpoint(args.checkpoint_dir)
    # After None every object is as it was before the call, on every rank: each rank then
    # loads the checkpoint, or starts from its initialisation when there is none.
    result = recovery.restore(checkpoint_step=checkpoint_step)
    if result is not None:
        step = result.step
    elif checkpoint_step is not None:  # the ordinary path: load the durable checkpoint
        saved = torch.load(args.checkpoint_dir / f"step-{checkpoint_step}.pt", weights_only=True)
        for name, obj in (("model", model), ("optim", optim), ("sched", sched)):
            obj.load_state_dict(saved[name])
        step = checkpoint_step
    else:
        step = 0
    if result is None or not result.private_restored:
        torch.manual_seed(args.seed + 1000 * rank + step)  # re-derive this rank's RNG

    steps_per_epoch = len(loader)
    while step < args.steps:
        # The data position is a function of the step: re-derived on every rank.
        epoch, skip = divmod(step, steps_per_epoch)
        sampler.set_epoch(epoch)
        for i, (x, y) in enumerate(loader):
            if i < skip:
                continue
            loss = nn.functional.mse_loss(model(x.to(device)), y.to(device))
            optim.zero_grad()
            loss.backward()
            optim.step()
            sched.step()
            step += 1
            time.sleep(args.step_seconds)  # pacing
            # 3. Every few steps: copy the state to host memory (blocks for the copy only).
            if step % args.snapshot_every == 0:
                recovery.snapshot(step)
            if step % args.checkpoint_every == 0:  # durable checkpoints as before
                if rank == 0:
                    args.checkpoint_dir.mkdir(parents=True, exist_ok=True)
                    state = {"model": model.state_dict(), "optim": optim.state_dict(),
                             "sched": sched.state_dict()}  # fmt: skip
                    torch.save(state, args.checkpoint_dir / f"step-{step}.pt")
                    (args.checkpoint_dir / "latest").write_text(str(step))
                dist.barrier()
            if step >= args.steps:
                break
    # 4. A clean exit removes the snapshot files.
    recovery.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
