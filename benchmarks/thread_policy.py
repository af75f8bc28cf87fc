"""Measure the thread policy: mixed eager loop vs its parts, policy on and off.

    python -m benchmarks.thread_policy [--rounds 7] [--steps 200] [--json out.json]

Each setting runs in its own process (the GEMM binding is per process); in a
process the three parts run in interleaved rounds and the median per-step time
of each is kept, so the ratio compares figures taken side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys


def measure(rounds: int, steps: int) -> dict:
    import fastbp
    from benchmarks.workloads import check_thread_policy_workload, thread_policy_workload
    from fastbp.bench import time_interleaved

    check_thread_policy_workload()
    parts, _ = thread_policy_workload()
    for run in parts.values():  # compile, load caches, apply the policy
        run()
    samples = time_interleaved({name: (run, steps) for name, run in parts.items()}, rounds)
    median = {name: statistics.median(times) * 1e6 for name, times in samples.items()}
    return {
        "policy": fastbp.threads.describe(),
        "median_us": median,
        "mixed_vs_parts": median["mixed"] / (median["fastbp_alone"] + median["torch_alone"]),
        "mixed_vs_kernels": median["mixed"] / (median["kernels_alone"] + median["torch_alone"]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    if arguments.child:
        print(json.dumps(measure(arguments.rounds, arguments.steps)))
        return
    results = {}
    for policy in ("off", "on"):
        command = [sys.executable, "-m", "benchmarks.thread_policy", "--child"]
        command += ["--rounds", str(arguments.rounds)]
        command += ["--steps", str(arguments.steps)]
        env = dict(os.environ, FASTBP_THREAD_POLICY=policy)
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        results[policy] = json.loads(output.stdout)
    header = [
        "policy",
        *results["on"]["median_us"],
        "mixed/(fastbp+torch)",
        "mixed/(kernels+torch)",
    ]
    print("| " + " | ".join(header) + " | gemm |")
    print("|" + "---|" * (len(header) + 1))
    for policy, result in results.items():
        times = [f"{t:.1f} µs" for t in result["median_us"].values()]
        ratios = [f"{result['mixed_vs_parts']:.2f}", f"{result['mixed_vs_kernels']:.2f}"]
        print("| " + " | ".join([policy, *times, *ratios, result["policy"]["gemm"]]) + " |")
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
