"""The numpy reference, oracle of every other test, against torch autograd in float64."""

import numpy as np
import pytest
import torch

from fastbp.kernels import reference
from fastbp.registry import REGISTRY

from .helpers import make_network, max_abs_error

SHAPES = [[1, 1], [3, 5], [7, 4, 2], [20, 13, 8, 3]]


@pytest.mark.parametrize("sizes", SHAPES, ids=str)
@pytest.mark.parametrize("activation", reference.ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("batch", [1, 6])
def test_reference_equals_torch_autograd_in_float64(sizes, activation, bias, batch):
    x, weights, biases, grad_output = make_network(sizes, batch, bias)
    activations = [activation] * (len(sizes) - 1)
    ours = REGISTRY["numpy", "cpu"].gradients(x, weights, biases, activations, grad_output)
    torchs = REGISTRY["torch-eager", "cpu"].gradients(x, weights, biases, activations, grad_output)
    for mine, theirs in zip(_flatten(ours), _flatten(torchs), strict=True):
        assert max_abs_error(mine, theirs) <= 1e-12


def _flatten(result):
    output, grad_x, grad_weights, grad_biases = result
    return [output, grad_x, *grad_weights, *(g for g in grad_biases if g is not None)]


def test_unknown_activation_is_rejected():
    with pytest.raises(ValueError, match="activation must be one of"):
        reference.activate(np.zeros(2), "swish")


def test_relu_keeps_nan_and_its_derivative_selects():
    z = np.array([np.nan, -1.0, 2.0])
    assert np.isnan(reference.activate(z, "relu")[0])
    g = np.array([1.0, np.nan, 3.0])
    np.testing.assert_array_equal(
        reference.activation_grad(g, reference.activate(z, "relu"), "relu"),
        torch.ops.aten.threshold_backward(
            torch.from_numpy(g), torch.relu(torch.from_numpy(z)), 0
        ).numpy(),
    )
