"""Registry training steps timed in turn in one process, round after round: the A/B
runs and batch sweeps that ``fastbp bench`` does not take, as its workloads are the
registry's own. For example, the step against its roofline floor at batches the
registry does not hold:

    python -m benchmarks.interleaved --workloads mnist-784x256x128x10-b128 \\
        --batches 256,512 --implementations roofline-floor,fastbp-fused

Prints, per workload, each implementation's median µs a step and its ratio to the
first implementation's. Each round times every implementation once, so that a machine
that slows for a while slows them all; compare figures of one run only.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Iterator

from fastbp import registry


def _workloads(names: list[str], batches: list[int]) -> Iterator[registry.Workload]:
    """The named workloads, or each of them at every one of ``batches``."""
    for name in names:
        workload = registry.WORKLOADS[name]
        if not batches:
            yield workload
        for batch in batches:
            yield dataclasses.replace(workload, batch=batch, name=f"{name} at batch {batch}")


def _check(kind: str, names: list[str], known) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise SystemExit(f"unknown {kind} {', '.join(unknown)}; choose from {', '.join(known)}")


def _medians(workload: registry.Workload, implementations: list[str], rounds: int,
             calls: int) -> dict[str, float]:  # fmt: skip
    """Each implementation's median µs a step over ``rounds`` rounds of ``calls`` steps."""
    steps = {
        name: registry.REGISTRY[(name, "cpu")].step(workload, "cpu") for name in implementations
    }
    for step in steps.values():  # warm: numba's cache, workspaces, the thread pools
        for _ in range(calls):
            step.run()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(calls):
                step.run()
            times[name].append((time.perf_counter() - start) / calls * 1e6)
    return {name: statistics.median(values) for name, values in times.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", required=True, help="registry workload names, commas")
    parser.add_argument(
        "--implementations", required=True, help="CPU implementations, commas; the first: base"
    )
    parser.add_argument("--batches", default="", help="run each workload at these batches")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--calls", type=int, default=10, help="steps timed together")
    args = parser.parse_args(argv)
    names, implementations = args.workloads.split(","), args.implementations.split(",")
    batches = [int(b) for b in args.batches.split(",") if b]
    _check("workload", names, registry.WORKLOADS)
    _check("implementation", implementations, {e.name for e in registry.entries("cpu", "step")})
    for workload in _workloads(names, batches):
        _check(f"implementation for {workload.name}", implementations,
               {e.name for e in registry.entries("cpu", "step") if e.runs(workload)})  # fmt: skip
        medians = _medians(workload, implementations, args.rounds, args.calls)
        base = medians[implementations[0]]
        cells = [f"{name} {us:.1f} µs ({us / base:.3f})" for name, us in medians.items()]
        print(f"{workload.name}: " + ", ".join(cells), flush=True)


if __name__ == "__main__":
    main()
