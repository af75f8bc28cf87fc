"""pytest-benchmark group "thread-policy": the mixed eager loop against its parts.

The ratio itself, measured in one process with interleaved rounds, and the
same with the policy off, comes from ``python benchmarks/thread_policy.py``.
"""

import pytest

from .workloads import thread_policy_workload

WORKLOAD = thread_policy_workload()


@pytest.mark.parametrize("part", list(WORKLOAD))
def test_thread_policy(benchmark, part):
    benchmark.group = "thread-policy 64x1000x100x10"
    benchmark.extra_info["batch"] = 64
    result = benchmark(WORKLOAD[part])
    if result is not None:  # a loss: the step computed something finite
        assert result.isfinite()
