"""Every registered implementation against a float64 reference, judged by torch's own error.

Results are compared with a reference computed in higher precision from the
same inputs (float64 for float32 runs; numpy's extended ``longdouble`` through
``kernels.reference`` for float64 runs); an implementation passes when its
error is at most twice torch's own error in the same dtype on the same case,
plus 4 units in the last place of the largest reference value
(flash-attention's criterion, not a fixed atol).
"""

import numpy as np
import pytest
import torch

from fastbp.kernels import reference
from fastbp.kernels.reference import ACTIVATIONS
from fastbp.registry import REGISTRY, entries

from .conftest import make_network, max_abs_error

NETWORKS = [
    [1, 1],
    [2, 10],
    [10, 1],
    [100, 2],
    [784, 100],
    [1000, 10],
    [3, 33, 1, 17],
    [1000, 100, 10],
    [784, 256, 128, 10],
    [3, 600],  # at batch 127, 76 200 outputs: the parallel passes, in uneven row blocks
]
BATCHES = [1, 3, 64, 127]
# The numpy oracle is validated in test_reference.py; here fastbp's own CPU backends
# are judged (test_triton.py judges the Triton kernels the same way).
UNDER_TEST = [
    entry.name for entry in entries("cpu", "gradients") if entry.name.startswith("fastbp")
]
TORCH = REGISTRY["torch-eager", "cpu"].gradients  # runs wherever its tensors are


def _tensors(result):
    output, grad_x, grad_weights, grad_biases = result
    names = ["output", "grad_x"] + [f"grad_weights[{i}]" for i in range(len(grad_weights))]
    names += [f"grad_biases[{i}]" for i, g in enumerate(grad_biases) if g is not None]
    return dict(
        zip(
            names,
            [output, grad_x, *grad_weights, *(g for g in grad_biases if g is not None)],
            strict=True,
        )
    )


def _higher_precision(x, weights, biases, activations, grad_output):
    """The reference result, computed in a wider float than the inputs."""
    if x.dtype != torch.float64:
        up = lambda t: None if t is None else t.double()  # noqa: E731
        run = TORCH
    else:
        up = lambda t: None if t is None else t.numpy().astype(np.longdouble)  # noqa: E731
        run = _longdouble_reference
    return run(
        up(x), [up(w) for w in weights], [up(b) for b in biases], activations, up(grad_output)
    )


def _longdouble_reference(x, weights, biases, activations, grad_output):
    outputs = reference.mlp_forward(x, weights, biases, activations)
    grad_x, grad_weights, grad_biases = reference.mlp_backward(
        grad_output, x, weights, biases, activations, outputs
    )
    as_tensor = lambda a: None if a is None else torch.from_numpy(a.astype(np.float64))  # noqa: E731
    return (
        as_tensor(outputs[-1]),
        as_tensor(grad_x),
        [as_tensor(g) for g in grad_weights],
        [as_tensor(g) for g in grad_biases],
    )


def assert_as_accurate_as_torch(
    name, sizes, batch, activation, bias, dtype, seed=0, *, device="cpu", entry="cpu", run=None
):
    """Registry entry ``(name, entry)`` (or the runner ``run``, reported as ``name``) has
    at most twice torch's error in ``dtype`` on ``device``, plus a few units in the last
    place. ``entry`` is the entry's device: Triton's ("cuda") also runs on CPU tensors
    in its interpreter.

    The reference is computed on the CPU in a wider float from the same inputs.
    """
    x, weights, biases, grad_output = make_network(sizes, batch, bias, dtype=dtype, seed=seed)
    activations = [activation] * (len(sizes) - 2) + [activation]
    exact = _tensors(_higher_precision(x, weights, biases, activations, grad_output))
    on_device = lambda t: None if t is None else t.to(device)  # noqa: E731
    inputs = (
        on_device(x), [on_device(w) for w in weights], [on_device(b) for b in biases],
        activations, on_device(grad_output),
    )  # fmt: skip
    torchs = _tensors(TORCH(*inputs))
    ours = _tensors((run or REGISTRY[name, entry].gradients)(*inputs))
    tiny = 4 * torch.finfo(dtype).eps
    for key, expected in exact.items():
        assert ours[key].dtype == dtype, key
        assert ours[key].shape == expected.shape, key
        bound = 2 * max_abs_error(torchs[key], expected) + tiny * (1 + expected.abs().max().item())
        error = max_abs_error(ours[key], expected)
        assert error <= bound, f"{name} {key}: error {error:.3g} > bound {bound:.3g}"


@pytest.mark.parametrize("name", UNDER_TEST)
@pytest.mark.parametrize("sizes", NETWORKS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_float32_error_within_twice_torchs(name, sizes, batch, activation, bias):
    assert_as_accurate_as_torch(name, sizes, batch, activation, bias, torch.float32)


@pytest.mark.parametrize("name", UNDER_TEST)
@pytest.mark.parametrize("sizes", [[3, 33, 1, 17], [784, 256, 128, 10]], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float64_error_within_twice_torchs(name, sizes, activation):
    assert_as_accurate_as_torch(name, sizes, 17, activation, True, torch.float64)
