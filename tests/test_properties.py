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


def _forward_and_gradients(module, x, weights, biases, activations, g) -> list[np.ndarray]:
    """Every output and gradient of ``module`` (``cpu`` or ``reference``), flattened."""
    outputs = module.mlp_forward(x, weights, biases, activations)
    grad_x, grad_weights, grad_biases = module.mlp_backward(
        g, x, weights, biases, activations, outputs
    )
    return [*outputs, grad_x, *grad_weights, *(b for b in grad_biases if b is not None)]


def _check_against_reference(sizes, batch, activation, bias, dtype, seed):
    """fastbp's error against an extended-precision run is at most twice the
    numpy reference's own error in the same dtype, plus 4 ulp of the sums'
    scale. That scale is the same network run on absolute values with identity
    activations (every sum's Σ|terms|, up to sigmoid's offset): a result that
    cancels to near zero is judged by the size of what cancelled."""
    rng = np.random.default_rng(seed)
    draw = lambda *shape: rng.uniform(-1, 1, shape).astype(dtype)  # noqa: E731
    x = draw(batch, sizes[0])
    weights = [draw(o, i) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    biases = [draw(o) if bias else None for o in sizes[1:]]
    network = (x, weights, biases, [activation] * len(weights), draw(batch, sizes[-1]))
    wide = lambda a: None if a is None else a.astype(np.longdouble)  # noqa: E731
    x_, weights_, biases_, activations, g = network
    exact = _forward_and_gradients(
        reference, wide(x_), [wide(w) for w in weights_], [wide(b) for b in biases_],
        activations, wide(g),
    )  # fmt: skip
    scale = _forward_and_gradients(
        reference, np.abs(wide(x_)), [np.abs(wide(w)) for w in weights_],
        [None if b is None else np.abs(wide(b)) for b in biases_],
        ["identity"] * len(weights_), np.abs(wide(g)),
    )  # fmt: skip
    ours = _forward_and_gradients(cpu, *network)
    numpys = _forward_and_gradients(reference, *network)
    eps = np.finfo(dtype).eps
    for mine, theirs, truth, size in zip(ours, numpys, exact, scale, strict=True):
        our_error, numpy_error = np.abs(mine - truth).max(), np.abs(theirs - truth).max()
        assert our_error <= 2 * numpy_error + 4 * eps * max(size.max(), 1), (
            our_error,
            numpy_error,
        )


@settings(max_examples=200, deadline=None)
@given(networks)
def test_kernels_equal_the_reference(network):
    _check_against_reference(**network)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None)
@given(networks)
def test_kernels_equal_the_reference_long_run(network):
    _check_against_reference(**network)
