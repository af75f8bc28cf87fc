"""Measure thread counts under DDP: 2 ranks on one machine, each with all the
cores (oversubscribed) against its share, as torchrun's OMP_NUM_THREADS gives it.

    python -m benchmarks.ddp_threads [--rounds 3] [--steps 100]

Each round launches every setting one after the other (gloo, 127.0.0.1), with
the all-reduce and without it (``no_sync``: the two ranks' compute alone, where
oversubscription shows), and keeps each run's median step time of rank 0; the
table shows the median over rounds, so settings are compared side by side.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from pathlib import Path

import torch

from benchmarks.ddp_worker import launch
from fastbp.threads import cores

SIZES, GLOBAL_BATCH = "1000,100,10", 2048


def median_step_us(threads: int, sync: bool, steps: int, folder: Path) -> tuple[float, str]:
    output = folder / "rank0.pt"
    options = ["--steps", str(steps), "--sizes", SIZES, "--batch", str(GLOBAL_BATCH)]
    if not sync:
        options.append("--no-sync")
    options += ["--threads", str(threads)]
    results = launch(output, 2, 600, *options)
    if any(code != 0 for code, _ in results):
        raise RuntimeError("a rank failed:\n" + "\n".join(stderr[-2000:] for _, stderr in results))
    report = torch.load(output)
    used = f"{report['torch_threads']}, {report['policy']['threads']}"
    return statistics.median(report["step_seconds"][10:]) * 1e6, used


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100)
    arguments = parser.parse_args()
    settings = {
        (f"all {cores()} cores per rank", sync): (cores(), sync) for sync in (True, False)
    } | {("cores / ranks", sync): (max(1, cores() // 2), sync) for sync in (True, False)}
    samples = {name: [] for name in settings}
    used = {}
    with tempfile.TemporaryDirectory() as folder:
        for _ in range(arguments.rounds):
            for name, (threads, sync) in settings.items():
                us, used[name] = median_step_us(threads, sync, arguments.steps, Path(folder))
                samples[name].append(us)
    print(
        f"2 ranks, MLP {SIZES}, global batch {GLOBAL_BATCH}, {cores()} cores, "
        f"{arguments.rounds} rounds of {arguments.steps} steps"
    )
    print(
        "| setting | threads per rank (torch, fastbp's calls) | all-reduce | median step, rank 0 |"
    )
    print("|---|---|---|---|")
    for (name, sync), values in sorted(samples.items(), key=lambda item: not item[0][1]):
        reduce = "yes" if sync else "no (no_sync)"
        median = statistics.median(values)
        print(f"| {name} | {used[name, sync]} | {reduce} | {median:.0f} µs |")


if __name__ == "__main__":
    main()
