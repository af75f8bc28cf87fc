"""pytest-benchmark group "thread-policy": the mixed eager loop against its parts.

The ratio itself, measured in one process with interleaved rounds, and the
same with the policy off, comes from ``python -m benchmarks.thread_policy``.
"""

import pytest

from .workloads import check_thread_policy_workload, thread_policy_workload

PARTS, _ = thread_policy_workload()


def test_every_part_computes_what_torch_computes():
    check_thread_policy_workload()


@pytest.mark.parametrize("part", list(PARTS))
def test_thread_policy(benchmark, part):
    benchmark.group = "thread-policy 64x1000x100x10"
    benchmark.extra_info["batch"] = 64
    benchmark(PARTS[part])
