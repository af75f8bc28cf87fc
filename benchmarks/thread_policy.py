"""Measure the thread policy: the mixed eager loop against its parts, and the user's
own numpy matmul before and after fastbp runs, under each way of governing the pools.

    python -m benchmarks.thread_policy [--rounds 7] [--steps 200] [--json out.json]

Each setting runs in its own process (the GEMM binding is per process); in a
process the four parts run in interleaved rounds and the median per-step time
of each is kept, so the ratios compare figures taken side by side. The settings:

- ``off``: the kernels' GEMMs in scipy's OpenBLAS, every pool at its default;
- ``scipy, process-wide limit``: scipy's OpenBLAS, every OpenBLAS pool of the
  process limited to 1 thread for good (what fastbp did before issue 20);
- ``scipy, held in calls``: scipy's OpenBLAS held at 1 thread during fastbp's
  calls only (the fallback where torch exports no BLAS);
- ``torch``: the kernels' GEMMs in torch's BLAS (the default).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SETTINGS = {
    "off": {"FASTBP_THREAD_POLICY": "off"},
    "scipy, process-wide limit": {"FASTBP_GEMM": "scipy", "LIMIT_PROCESS": "1"},
    "scipy, held in calls": {"FASTBP_GEMM": "scipy"},
    "torch": {"FASTBP_GEMM": "torch"},
}
MATMUL_SIZE = 1000


def _matmul_seconds(repeats: int = 15) -> float:
    """The median time of a user's own float32 numpy matmul.

    After a pause: threads of a pool that just ran spin before they sleep (torch's
    OpenMP ones too, fastbp or not), and this compares the settings numpy runs
    under, not what last ran.
    """
    import numpy as np

    time.sleep(0.5)
    a = np.random.default_rng(0).standard_normal((MATMUL_SIZE, MATMUL_SIZE), np.float32)
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ a
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def measure(rounds: int, steps: int) -> dict:
    before = _matmul_seconds()
    import fastbp
    from benchmarks.workloads import check_thread_policy_workload, thread_policy_workload
    from fastbp.bench import time_interleaved

    if os.environ.get("LIMIT_PROCESS"):
        from threadpoolctl import threadpool_limits

        fastbp.threads.ensure_policy()  # loads scipy's OpenBLAS, then limit all for good
        threadpool_limits(1, user_api="blas")
    check_thread_policy_workload()
    parts, _ = thread_policy_workload()
    for run in parts.values():  # compile, load caches, settle the policy
        run()
    samples = time_interleaved({name: (run, steps) for name, run in parts.items()}, rounds)
    median = {name: statistics.median(times) * 1e6 for name, times in samples.items()}
    return {
        "policy": fastbp.threads.describe(),
        "median_us": median,
        "mixed_vs_parts": median["mixed"] / (median["fastbp_alone"] + median["torch_alone"]),
        "mixed_vs_kernels": median["mixed"] / (median["kernels_alone"] + median["torch_alone"]),
        "numpy_matmul_after_vs_before": _matmul_seconds() / before,
    }


def _table(results: dict) -> None:
    first = next(iter(results.values()))
    header = ["setting", *first["median_us"], "mixed/(fastbp+torch)", "mixed/(kernels+torch)"]
    header.append(f"user's {MATMUL_SIZE}² numpy matmul, after/before")
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for setting, result in results.items():
        cells = [setting, *(f"{t:.0f} µs" for t in result["median_us"].values())]
        cells += [f"{result['mixed_vs_parts']:.2f}", f"{result['mixed_vs_kernels']:.2f}"]
        cells.append(f"{result['numpy_matmul_after_vs_before']:.2f}")
        print("| " + " | ".join(cells) + " |")


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
    for setting, environment in SETTINGS.items():
        command = [sys.executable, "-m", "benchmarks.thread_policy", "--child"]
        command += ["--rounds", str(arguments.rounds), "--steps", str(arguments.steps)]
        env = {**os.environ, **environment}
        output = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
        results[setting] = json.loads(output.stdout)
    _table(results)
    if arguments.json:
        with open(arguments.json, "w") as handle:
            json.dump(results, handle, indent=2)


if __name__ == "__main__":
    main()
