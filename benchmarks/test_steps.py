"""pytest-benchmark groups: one training step or forward pass per registry entry.

Groups are named after the workload and task (``train docs-64x1000x100x10 cpu``, …).
Every implementation comes from ``fastbp.registry``, the registry the tests
check; each benchmark first checks, once, that it computes what torch-eager
computes, then times it. ``extra_info`` holds samples/s, GFLOP/s and the
ratios of ``fastbp.bench.figures`` (those baselines run first in each
group, so their medians are known when the others finish).

A plain ``pytest`` runs each once as a check; the torch.compile entries, whose
compile alone takes seconds per workload, run there on one workload only
(``tests/test_train.py`` checks their steps on four).
"""

import pytest
import torch

import fastbp
from fastbp.bench import figures
from fastbp.registry import REGISTRY, WORKLOADS, available, check_inference, check_step

fastbp.threads.ensure_policy()
_medians: dict[tuple[str, str], float] = {}


def _cases(task: str) -> list:
    """``pytest.param(key, workload)`` for every entry and workload it runs ``task`` on
    (the ensemble baselines on ensembles alone, a step that takes loss names on those)."""
    return [
        pytest.param(key, name, id=f"{'-'.join(key)}-{name}")
        for key, entry in REGISTRY.items()
        for name, workload in WORKLOADS.items()
        if entry.runs(workload, task)
    ]


TRAIN, INFERENCE = _cases("train"), _cases("inference")


def _record(benchmark, name: str, workload, training=True) -> None:
    stats = getattr(benchmark, "stats", None)
    if stats is None:  # benchmarks disabled: a smoke run, nothing to report
        return
    median = stats.stats.median
    _medians[benchmark.group, name] = median
    eager = _medians.get((benchmark.group, "torch-eager"))
    floor = _medians.get((benchmark.group, "gemm-floor"))
    roofline = _medians.get((benchmark.group, "roofline-floor"))
    found = figures(workload, median, eager, floor, training, roofline)
    benchmark.extra_info.update({k: v for k, v in found.items() if v is not None})


def _skip_unless_runnable(request, name: str, device: str, workload) -> None:
    if not available(device):
        pytest.skip("needs a CUDA GPU; none on this machine")
    if device not in workload.devices:
        pytest.skip(f"{workload.name} is a GPU-sized batch, timed on CUDA only")
    timing = request.config.getoption("benchmark_only", False)
    if "compile" in name and not timing and workload.name != "docs-64x1000x100x10":
        pytest.skip("torch.compile entries are checked on one workload here; all when timed")
    if "compile" in name:
        torch._dynamo.reset()  # fresh caches, as fastbp bench gives each workload


@pytest.mark.parametrize(("key", "workload"), TRAIN)
def test_train_step(benchmark, request, workload, key):
    (name, device), workload = key, WORKLOADS[workload]
    _skip_unless_runnable(request, name, device, workload)
    step = REGISTRY[key].step(workload, device)
    step.run()  # compile outside the timing
    check_step(name, workload, device, step, done=1)
    benchmark.group = f"train {workload.name} {device}"
    benchmark(step.run)
    _record(benchmark, name, workload)


@pytest.mark.parametrize(("key", "workload"), INFERENCE)
def test_inference(benchmark, request, workload, key):
    (name, device), workload = key, WORKLOADS[workload]
    _skip_unless_runnable(request, name, device, workload)
    forward = REGISTRY[key].inference(workload, device)
    check_inference(name, workload, device, forward())
    benchmark.group = f"inference {workload.name} {device}"
    benchmark(forward)
    _record(benchmark, name, workload, training=False)
