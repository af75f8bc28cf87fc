"""Property tests: random networks, fastbp's kernels against the numpy reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastbp.kernels import cpu, reference

networks = st.fixed_dictionaries(
    {
        "sizes": st.lists(st.integers(1, 40), min_size=2, max_size=5),
        "batch": st.integers(1, 40),
        "activation": st.sampled_from(reference.ACTIVATIONS),
        "bias": st.booleans(),
        "dtype": st.sampled_from([np.float32, np.float64]),
        "seed": st.integers(0, 2**31 - 1),
    }
)


def _check_against_reference(sizes, batch, activation, bias, dtype, seed):
    rng = np.random.default_rng(seed)
    draw = lambda *shape: rng.uniform(-1, 1, shape).astype(dtype)  # noqa: E731
    x = draw(batch, sizes[0])
    weights = [draw(o, i) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    biases = [draw(o) if bias else None for o in sizes[1:]]
    activations = [activation] * len(weights)
    g = draw(batch, sizes[-1])
    ours = cpu.mlp_forward(x, weights, biases, activations)
    exact = reference.mlp_forward(x, weights, biases, activations)
    grads = cpu.mlp_backward(g, x, weights, biases, activations, ours)
    exact_grads = reference.mlp_backward(g, x, weights, biases, activations, exact)
    # Both sides round in `dtype`; they may differ by the rounding of sums as long as the widest.
    tolerance = 8 * np.finfo(dtype).eps * max(sizes + [batch])
    flat = lambda r: [r[0], *r[1], *(b for b in r[2] if b is not None)]  # noqa: E731
    for mine, theirs in zip(ours + flat(grads), exact + flat(exact_grads), strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=tolerance, atol=tolerance)


@settings(max_examples=200, deadline=None)
@given(networks)
def test_kernels_equal_the_reference(network):
    _check_against_reference(**network)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None)
@given(networks)
def test_kernels_equal_the_reference_long_run(network):
    _check_against_reference(**network)
