"""pytest-benchmark groups: one training step (or forward pass) per implementation.

Groups are named after the workload (``train docs-64x1000x100x10 cpu``, …).
Every implementation comes from ``fastbp.backends``, the registry the tests
check; each benchmark first checks, once, that it computes what torch-eager
computes, then times it. ``extra_info`` holds samples/s, GFLOP/s and the
two ratios of ``fastbp.bench.figures`` (those baselines run first in each
group, so their medians are known when the others finish).
"""

import pytest
import torch

import fastbp
from fastbp.backends import (
    INFERENCE_IMPLEMENTATIONS,
    STEP_IMPLEMENTATIONS,
    WORKLOADS,
    check_step,
)
from fastbp.bench import baseline, figures

fastbp.threads.ensure_policy()
_medians: dict[tuple[str, str], float] = {}


def _record(benchmark, device: str, name: str, workload, training=True) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # benchmarks disabled: a smoke run, nothing to report
        return
    median = stats.stats.median
    _medians[benchmark.group, name] = median
    eager = _medians.get((benchmark.group, baseline("torch-eager", device)))
    floor = _medians.get((benchmark.group, baseline("gemm-floor", device)))
    found = figures(workload, median, eager, floor, training)
    benchmark.extra_info.update({k: v for k, v in found.items() if v is not None})


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("name", list(STEP_IMPLEMENTATIONS))
def test_train_step(benchmark, workload, name):
    implementation, workload = STEP_IMPLEMENTATIONS[name], WORKLOADS[workload]
    if implementation.device == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU; none on this machine")
    if implementation.device not in workload.devices:
        pytest.skip(f"{workload.name} is a GPU-sized batch, timed on CUDA only")
    if "compile" in name:  # fresh caches, as fastbp bench gives each workload (see bench_workload)
        torch._dynamo.reset()
    check_step(name, workload, implementation.device)
    step = implementation.make(workload, implementation.device)
    step.run()  # compile outside the timing
    benchmark.group = f"train {workload.name} {implementation.device}"
    benchmark(step.run)
    _record(benchmark, implementation.device, name, workload)


@pytest.mark.parametrize("workload", list(WORKLOADS))
@pytest.mark.parametrize("name", list(INFERENCE_IMPLEMENTATIONS))
def test_inference(benchmark, workload, name):
    workload = WORKLOADS[workload]
    if "cpu" not in workload.devices:
        pytest.skip(f"{workload.name} is a GPU-sized batch, timed on CUDA only")
    forward = INFERENCE_IMPLEMENTATIONS[name](workload, "cpu")
    expected = INFERENCE_IMPLEMENTATIONS["torch-eager"](workload, "cpu")()
    torch.testing.assert_close(forward(), expected, rtol=1e-4, atol=1e-5)
    benchmark.group = f"inference {workload.name} cpu"
    benchmark(forward)
    _record(benchmark, "cpu", name, workload, training=False)
