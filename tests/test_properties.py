"""Property tests: random networks, fastbp's kernels against the numpy reference."""

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from fastbp import functional as F
from fastbp.kernels import cpu, reference

from .helpers import ACTIVATIONS, error_scales

# The activations helpers.error_scales models (derivatives of the output); the others
# are judged against torch in test_activations.py.
MODELLED = tuple(ACTIVATIONS)

networks = st.fixed_dictionaries(
    {
        "sizes": st.lists(st.integers(1, 40), min_size=2, max_size=5),
        "batch": st.integers(1, 40),
        "activation": st.sampled_from(MODELLED),
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
    numpy reference's own error in the same dtype, plus 4 ulp of each element's
    error scale (``helpers.error_scales``: what the sums' rounding and the
    activations' derivatives make of the roundoff): a result that cancels to near
    zero is judged by the size of what cancelled, and no more."""
    rng = np.random.default_rng(seed)
    draw = lambda *shape: rng.uniform(-1, 1, shape).astype(dtype)  # noqa: E731
    x = draw(batch, sizes[0])
    weights = [draw(o, i) for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    biases = [draw(o) if bias else None for o in sizes[1:]]
    network = (x, weights, biases, [activation] * len(weights), draw(batch, sizes[-1]))
    wide = lambda a: None if a is None else a.astype(np.longdouble)  # noqa: E731
    x_, weights_, biases_, activations, g = network
    exact = _forward_and_gradients(
        reference,
        wide(x_),
        [wide(w) for w in weights_],
        [wide(b) for b in biases_],
        activations,
        wide(g),
    )
    eps = np.finfo(dtype).eps
    scales = error_scales(
        wide(x_),
        [wide(w) for w in weights_],
        [wide(b) for b in biases_],
        activations,
        wide(g),
        eps,
    )
    ours = _forward_and_gradients(cpu, *network)
    numpys = _forward_and_gradients(reference, *network)
    _assert_within_scales(ours, numpys, exact, scales, eps)


def _assert_within_scales(ours, baselines, exact, scales, eps) -> None:
    """Element by element: error ≤ 2 × the baseline's largest error + 4 ulp of the scale."""
    for index, (mine, theirs, truth, scale) in enumerate(
        zip(ours, baselines, exact, scales, strict=True)
    ):
        mine, theirs, truth = (np.asarray(a, np.longdouble) for a in (mine, theirs, truth))
        baseline = np.abs(theirs - truth).max() if truth.size else 0.0
        error = np.abs(mine - truth)
        bound = 2 * baseline + 4 * eps * np.asarray(scale, np.longdouble)
        worst = np.unravel_index(np.argmax(error - bound), error.shape) if error.size else ()
        assert np.all(error <= bound), (index, worst, float(error[worst]), float(bound[worst]))


# Deep, wide sigmoid and tanh nets, where a scale that ignores the activations'
# derivatives was loose enough to pass a 5% error in the first layer's gradient
DEEP = {"sizes": [40] * 5, "batch": 16, "bias": True, "dtype": np.float32, "seed": 0}


@settings(max_examples=200, deadline=None)
@given(networks)
@example({**DEEP, "activation": "sigmoid"})
@example({**DEEP, "activation": "tanh"})
def test_kernels_equal_the_reference(network):
    _check_against_reference(**network)


@pytest.mark.slow
@settings(max_examples=5000, deadline=None)
@given(networks)
def test_kernels_equal_the_reference_long_run(network):
    _check_against_reference(**network)


# ---------------------------------------------------------------------------
# Through fastbp.functional.mlp: per-layer activations and biases, wide layers
# and the strided tensors autograd hands over (transposed, sliced, expanded).
# ---------------------------------------------------------------------------
LAYOUTS = ("contiguous", "transposed", "sliced")
torch_networks = st.fixed_dictionaries(
    {
        "sizes": st.lists(st.integers(1, 300), min_size=2, max_size=6),
        "batch": st.integers(1, 300),
        "activations": st.lists(st.sampled_from(MODELLED), min_size=5, max_size=5),
        "bias": st.lists(st.booleans(), min_size=5, max_size=5),
        # float32 only: a float64 result needs a truth wider than torch has
        # (the kernel-level properties above cover float64 against longdouble)
        "dtype": st.just(torch.float32),
        "x_layout": st.sampled_from(LAYOUTS),
        "weight_layout": st.sampled_from(LAYOUTS),
        "expanded_grad": st.booleans(),
        "seed": st.integers(0, 2**31 - 1),
    }
)


def _laid_out(tensor: torch.Tensor, layout: str) -> torch.Tensor:
    """The same values in another memory layout."""
    if layout == "transposed":
        return tensor.T.contiguous().T
    if layout == "sliced":
        wide = torch.zeros(tensor.shape[0], 2 * tensor.shape[1], dtype=tensor.dtype)
        wide[:, ::2] = tensor
        return wide[:, ::2]
    return tensor


def _torch_gradients(x, weights, biases, activations, grad_output, backend):
    leaves = [t.detach().requires_grad_() for t in (x, *weights)]
    bias_leaves = [None if b is None else b.detach().requires_grad_() for b in biases]
    output = F.mlp(leaves[0], leaves[1:], bias_leaves, activations, backend=backend)
    output.backward(grad_output)
    return [
        output.detach(),
        *(t.grad for t in leaves),
        *(b.grad for b in bias_leaves if b is not None),
    ]


def _check_through_functional(
    sizes, batch, activations, bias, dtype, x_layout, weight_layout, expanded_grad, seed
):
    layers = len(sizes) - 1
    activations, bias = activations[:layers], bias[:layers]
    generator = torch.Generator().manual_seed(seed)
    draw = lambda *shape: torch.rand(*shape, generator=generator, dtype=torch.float64) * 2 - 1  # noqa: E731
    x = draw(batch, sizes[0])
    weights = [draw(o, i) / i**0.5 for i, o in zip(sizes[:-1], sizes[1:], strict=True)]
    biases = [draw(o) if b else None for o, b in zip(sizes[1:], bias, strict=True)]
    # .sum().backward() hands over a grad_output with stride 0
    grad = draw(1, sizes[-1]).expand(batch, -1) if expanded_grad else draw(batch, sizes[-1])
    exact = _torch_gradients(x, weights, biases, activations, grad, "torch")
    numpy = lambda t: None if t is None else t.numpy()  # noqa: E731
    eps = torch.finfo(dtype).eps
    scales = error_scales(
        x.numpy(),
        [w.numpy() for w in weights],
        [numpy(b) for b in biases],
        activations,
        grad.numpy(),
        eps,
    )
    # _torch_gradients gives the last output only; error_scales gives every layer's
    scales = [scales[layers - 1], *scales[layers:]]
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    ours = _torch_gradients(
        _laid_out(cast(x), x_layout),
        [_laid_out(cast(w), weight_layout) for w in weights],
        [cast(b) for b in biases],
        activations,
        cast(grad),
        "numba",
    )
    torchs = _torch_gradients(
        cast(x),
        [cast(w) for w in weights],
        [cast(b) for b in biases],
        activations,
        cast(grad),
        "torch",
    )
    as_numpy = lambda tensors: [t.detach().double().numpy() for t in tensors]  # noqa: E731
    _assert_within_scales(as_numpy(ours), as_numpy(torchs), as_numpy(exact), scales, eps)


@settings(max_examples=150, deadline=None)
@given(torch_networks)
def test_functional_mlp_equals_a_float64_reference(network):
    _check_through_functional(**network)


@pytest.mark.slow
@settings(max_examples=3000, deadline=None)
@given(torch_networks)
def test_functional_mlp_equals_a_float64_reference_long_run(network):
    _check_through_functional(**network)
