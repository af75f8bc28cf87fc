"""Kernels loaded from numba's on-disk cache run like freshly compiled ones.

Each case runs fresh processes that share one cache directory, as a user's
later sessions reuse what the first one compiled.
"""

import os
import subprocess
import sys

import pytest

from fastbp.kernels import activation_table, cpu_jit, reference

RUN_KERNELS = """
import sys
import numpy as np
from fastbp.kernels import cpu, reference
{setup}
sizes = {sizes}
rng = np.random.default_rng(0)
draw = lambda *shape: rng.standard_normal(shape).astype(np.float32)
x, g = draw(5, sizes[0]), draw(5, sizes[-1])
weights = [draw(o, i) for i, o in zip(sizes[:-1], sizes[1:])]
biases = [draw(o) for o in sizes[1:]]
acts = ["relu"] * len(weights)
ours = cpu.mlp_forward(x, weights, biases, acts)
exact = reference.mlp_forward(x, weights, biases, acts)
for mine, theirs in zip(
    [*ours, *cpu.mlp_backward(g, x, weights, biases, acts, ours)[1]],
    [*exact, *reference.mlp_backward(g, x, weights, biases, acts, exact)[1]],
):
    np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)
"""
WITH_POLICY = "import fastbp; fastbp.threads.ensure_policy()"


def _run_kernels(cache_dir, sizes, setup=""):
    """Run forward and backward of a float32 MLP in a fresh process; fail on a bad exit."""
    result = subprocess.run(
        [sys.executable, "-c", RUN_KERNELS.format(setup=setup, sizes=sizes)],
        env={**os.environ, "NUMBA_CACHE_DIR": str(cache_dir)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stderr[-2000:]}"


def test_kernel_compiled_from_cached_parts_loads_again(tmp_path):
    # numba/numba#8578: the second process compiles a one-layer network out of
    # cached layer kernels; the third loaded that and segfaulted, because
    # loading, unlike compiling, did not start numba's thread pool.
    _run_kernels(tmp_path, [3, 5, 2])
    _run_kernels(tmp_path, [3, 5])
    _run_kernels(tmp_path, [3, 5])


@pytest.mark.parametrize("first, then", [(WITH_POLICY, ""), ("", WITH_POLICY)])
def test_cache_is_shared_by_both_gemm_bindings(tmp_path, first, then):
    _run_kernels(tmp_path, [3, 5, 2], first)
    _run_kernels(tmp_path, [3, 5, 2], then)


@pytest.mark.parametrize(
    "kind, names",
    [
        ("activation", activation_table.NAMES),
        ("loss", reference.LOSSES),
        ("reduction", reference.REDUCTIONS),
        ("optimizer", reference.OPTIMIZERS),
    ],
)
def test_the_cached_kernels_codes_are_held_to_the_tables(kind, names):
    """cpu_jit.py's codes are literals (numba's cache sees that file only); a table
    reordered without them must stop the import, not run stale kernels."""
    cpu_jit.check_codes({kind: names})
    reordered = (names[1], names[0], *names[2:])
    with pytest.raises(AssertionError, match=f"{kind} codes .* are not the table's order"):
        cpu_jit.check_codes({kind: reordered})
