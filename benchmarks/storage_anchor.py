"""Benchmark: the storage anchors, a filesystem and an S3-compatible object store, same state.

The state is the demo's (``peer_recovery.demo.train``: a transformer with AdamW, about
126 MB per rank with the defaults below), saved once with ``torch.distributed.checkpoint``
to a local directory and to a bucket of a ``moto`` S3 server on 127.0.0.1 (through DCP's
fsspec writer and ``s3fs``). ``--ranks`` processes (gloo) then load it, every rank the
whole state, all at once behind one barrier, as ``make demo``'s storage path does:

- filesystem: ``FileSystemReader``; before each load the checkpoint's files are dropped
  from the page cache with ``posix_fadvise(DONTNEED)`` (dropping every cache needs root);
- s3: DCP's ``FsspecReader`` on ``s3://``, read through ``s3fs`` from the moto server.

Each load ends with ``set_state_dict`` into a fresh model and optimizer. A load's time is
the slowest rank's; medians of ``--repeats``, alternated. The moto server keeps objects in
memory on loopback, so the s3 figure is the protocol's cost (HTTP, signing, s3fs), not a
network's or a real store's. Needs the ``bench`` extra (moto, s3fs). Last line:
``RESULT ranks=<n> bytes=<n> filesystem_seconds=<f> s3_seconds=<f>``.

    python benchmarks/storage_anchor.py [--ranks 2] [--repeats 5]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

BUCKET = "peer-recovery-bench"
CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _build(args: argparse.Namespace) -> tuple[Any, Any]:
    import torch

    from peer_recovery.demo.train import TinyLM

    torch.manual_seed(0)
    model = TinyLM(args.vocab, args.width, args.layers)
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def _state(model: Any, optim: Any) -> dict[str, Any]:
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_sd, optim_sd = get_state_dict(model, optim)
    return {"model": model_sd, "optim": optim_sd}


def _drop_from_page_cache(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def _rank(rank: int, args: argparse.Namespace, port: int, directory: Path, endpoint: str) -> None:
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.fsspec_filesystem import FsspecReader
    from torch.distributed.checkpoint.state_dict import set_state_dict

    torch.set_num_threads(1)
    store = dist.TCPStore("127.0.0.1", port, args.ranks, is_master=rank == 0)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=args.ranks,
                            timeout=timedelta(seconds=600))  # fmt: skip
    results: dict[str, list[float]] = {"filesystem": [], "s3": []}
    for _ in range(args.repeats):
        for anchor in results:
            model, optim = _build(args)
            state = _state(model, optim)
            if anchor == "filesystem":
                reader: Any = dcp.FileSystemReader(directory)
                if rank == 0:
                    _drop_from_page_cache(directory)
            else:
                reader = FsspecReader(f"s3://{BUCKET}/checkpoint", endpoint_url=endpoint)
            dist.barrier()
            started = time.perf_counter()
            dcp.load(state, storage_reader=reader)
            set_state_dict(model, optim, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])  # fmt: skip
            took = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
            dist.all_reduce(took, op=dist.ReduceOp.MAX)
            results[anchor].append(float(took))
            if rank == 0:
                print(f"  {anchor:10s} load: {float(took):.3f}s (slowest of {args.ranks} ranks)",
                      flush=True)  # fmt: skip
    if rank == 0:
        size = sum(f.stat().st_size for f in directory.rglob("*") if f.is_file())
        fs, s3 = (statistics.median(results[a]) for a in ("filesystem", "s3"))
        print(f"filesystem (page cache dropped): {fs:.3f}s; s3 (moto on loopback): {s3:.3f}s; "
              f"s3/filesystem {s3 / fs:.2f}")  # fmt: skip
        print(f"RESULT ranks={args.ranks} bytes={size} filesystem_seconds={fs:.4f} "
              f"s3_seconds={s3:.4f}", flush=True)  # fmt: skip
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args()
    try:
        import s3fs
        from moto.server import ThreadedMotoServer
    except ImportError as error:
        raise SystemExit(
            f"needs the bench extra (pip install peer-recovery[bench]): {error}"
        ) from None
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.fsspec_filesystem import FsspecWriter

    os.environ.update(CREDENTIALS)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's per-request log lines
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    try:
        with tempfile.TemporaryDirectory(prefix="peer-recovery-anchor-") as tmp:
            directory = Path(tmp) / "checkpoint"
            state = _state(*_build(args))
            dcp.save(state, storage_writer=dcp.FileSystemWriter(directory))
            s3fs.S3FileSystem(endpoint_url=endpoint).mkdir(BUCKET)
            dcp.save(state, storage_writer=FsspecWriter(f"s3://{BUCKET}/checkpoint",
                                                        endpoint_url=endpoint))  # fmt: skip
            del state
            print(f"{args.ranks} ranks load one DCP checkpoint each, all at once; "
                  f"{args.repeats} repeats", flush=True)  # fmt: skip
            ctx = multiprocessing.get_context("spawn")
            store_port = _free_port()
            ranks = [ctx.Process(target=_rank, args=(r, args, store_port, directory, endpoint))
                     for r in range(args.ranks)]  # fmt: skip
            for p in ranks:
                p.start()
            for p in ranks:
                p.join()
            if any(p.exitcode for p in ranks):
                raise SystemExit(f"a rank failed: exit codes {[p.exitcode for p in ranks]}")
    finally:
        server.stop()


if __name__ == "__main__":
    main()
