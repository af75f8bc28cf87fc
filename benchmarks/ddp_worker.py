"""One rank of a DistributedDataParallel run of fastbp.nn.MLP (gloo, 127.0.0.1).

    python -m benchmarks.ddp_worker --rank R --world-size N --store FILE --output OUT [...]

Each rank trains on its contiguous share of one seeded global batch, so that
the result can be held against a single process training on the whole batch
(``global_batch``). Rank 0 writes the final parameters, the per-step times and
the thread policy in force to OUT. ``--fail-rank``/``--fail-at-step`` make one
rank raise mid-run, to test that the job then fails rather than hangs.
``launch`` starts every rank and waits for them.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import fastbp

SIZES = [64, 128, 64, 10]
ROOT = Path(__file__).resolve().parents[1]  # where `benchmarks` is a package


def global_batch(batch: int, sizes=SIZES) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(batch, sizes[0], generator=generator)
    return x, torch.randn(batch, sizes[-1], generator=generator)


def new_model(sizes=SIZES) -> fastbp.nn.MLP:
    torch.manual_seed(0)
    return fastbp.nn.MLP(sizes)


def train_step(model, optimizer, x, y) -> None:
    optimizer.zero_grad()
    torch.nn.functional.mse_loss(model(x), y).backward()
    optimizer.step()


def launch(output: Path, world_size: int = 2, timeout: float = 120, *options: str):
    """Run the ranks to completion; their (returncode, stderr), rank order."""
    # a file store: no port to pick, so no race with other processes for one
    store = Path(output).with_suffix(".store")
    store.unlink(missing_ok=True)
    common = ["--world-size", str(world_size), "--store", str(store), "--output", str(output)]
    ranks = [
        subprocess.Popen(
            [sys.executable, "-m", "benchmarks.ddp_worker", "--rank", str(rank), *common, *options],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for rank in range(world_size)
    ]
    results = []
    try:
        for rank in ranks:
            _, stderr = rank.communicate(timeout=timeout)
            results.append((rank.returncode, stderr))
    finally:
        for rank in ranks:
            rank.kill()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    for name in ("--rank", "--world-size"):
        parser.add_argument(name, type=int, required=True)
    parser.add_argument("--store", required=True, help="file for the rendezvous")
    parser.add_argument("--output", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)))
    parser.add_argument("--threads", type=int, help="torch.set_num_threads in each rank")
    parser.add_argument("--timeout", type=float, default=60, help="process group timeout, s")
    parser.add_argument("--no-sync", action="store_true", help="skip the all-reduce (compute only)")
    parser.add_argument("--fail-rank", type=int, default=-1)
    parser.add_argument("--fail-at-step", type=int, default=-1)
    arguments = parser.parse_args()
    torch_threads_at_start = torch.get_num_threads()

    dist.init_process_group(
        "gloo",
        init_method=f"file://{Path(arguments.store).resolve()}",
        rank=arguments.rank,
        world_size=arguments.world_size,
        timeout=datetime.timedelta(seconds=arguments.timeout),
    )
    if arguments.threads:
        torch.set_num_threads(arguments.threads)
    sizes = [int(size) for size in arguments.sizes.split(",")]
    model = new_model(sizes)
    ddp = DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    share = lambda t: t.chunk(arguments.world_size)[arguments.rank]  # noqa: E731
    x, y = map(share, global_batch(arguments.batch, sizes))
    seconds = []
    for step in range(arguments.steps):
        if arguments.rank == arguments.fail_rank and step == arguments.fail_at_step:
            raise RuntimeError(f"rank {arguments.rank} failed on purpose at step {step}")
        start = time.perf_counter()
        with ddp.no_sync() if arguments.no_sync else contextlib.nullcontext():
            train_step(ddp, optimizer, x, y)
        seconds.append(time.perf_counter() - start)
    if arguments.rank == 0:
        torch.save(
            {
                "state_dict": model.state_dict(),
                "step_seconds": seconds,
                "policy": fastbp.threads.describe(),
                "torch_threads": torch.get_num_threads(),
                "torch_threads_at_start": torch_threads_at_start,
            },
            arguments.output,
        )
    # Both ranks past their last collective before either tears the group down: a rank
    # that destroyed it while its peer was still on its way out made gloo's threads
    # abort that peer's exit now and then ("terminate called without an active exception")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Then leave without the interpreter's teardown: even after the barrier, gloo's
    # threads made it abort now and then ("terminate called without an active
    # exception": one rank in one of the README test runs of 2026-12-05), once all the
    # work was done and rank 0's results written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
