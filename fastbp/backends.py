"""The registry of implementations that the tests and the benchmarks iterate over.

Every entry computes the same thing the same way from the outside: the forward
pass of an MLP and, for a given ``grad_output``, the gradients of its input
and parameters. Adding a backend is adding one entry; every accuracy test and
benchmark then covers it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import functional as F
from .kernels import reference

Tensors = list[torch.Tensor]
# (output, ∂L/∂x, [∂L/∂Wₗ], [∂L/∂bₗ or None])
Gradients = tuple[torch.Tensor, torch.Tensor, Tensors, list[torch.Tensor | None]]
Runner = Callable[
    [torch.Tensor, Tensors, Sequence[torch.Tensor | None], Sequence[str], torch.Tensor], Gradients
]


@dataclass(frozen=True)
class Implementation:
    """One way of computing an MLP's forward pass and gradients."""

    name: str
    run: Runner
    description: str


def _with_autograd(forward: Callable[..., torch.Tensor]) -> Runner:
    """A runner that calls ``forward`` on fresh leaves and backpropagates ``grad_output``."""

    def run(x, weights, biases, activations, grad_output) -> Gradients:
        leaf = lambda t: None if t is None else t.detach().clone().requires_grad_()  # noqa: E731
        x, weights, biases = leaf(x), [leaf(w) for w in weights], [leaf(b) for b in biases]
        output = forward(x, weights, biases, activations)
        output.backward(grad_output)
        return (
            output.detach(),
            x.grad,
            [w.grad for w in weights],
            [None if b is None else b.grad for b in biases],
        )

    return run


def _numpy_reference(x, weights, biases, activations, grad_output) -> Gradients:
    as_array = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
    arrays = [as_array(w) for w in weights], [as_array(b) for b in biases]
    outputs = reference.mlp_forward(as_array(x), *arrays, list(activations))
    grad_x, grad_weights, grad_biases = reference.mlp_backward(
        as_array(grad_output), as_array(x), *arrays, list(activations), outputs
    )
    as_tensor = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    return (
        as_tensor(outputs[-1]),
        as_tensor(grad_x),
        [as_tensor(g) for g in grad_weights],
        [as_tensor(g) for g in grad_biases],
    )


def _layer_by_layer(backend: str) -> Callable[..., torch.Tensor]:
    def forward(x, weights, biases, activations):
        for weight, bias, activation in zip(weights, biases, activations, strict=True):
            x = F.linear_act(x, weight, bias, activation, backend=backend)
        return x

    return forward


def _whole_network(backend: str) -> Callable[..., torch.Tensor]:
    def forward(x, weights, biases, activations):
        return F.mlp(x, weights, biases, activations, backend=backend)

    return forward


IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation(
            "numpy", _numpy_reference, "kernels.reference: the hand derivation in plain numpy"
        ),
        Implementation(
            "torch-eager",
            _with_autograd(_layer_by_layer("torch")),
            "native torch ops under torch autograd (the baseline)",
        ),
        Implementation(
            "fastbp-numba",
            _with_autograd(_whole_network("numba")),
            "fastbp.functional.mlp: the network as one autograd node, numba kernels",
        ),
        Implementation(
            "fastbp-numba-layers",
            _with_autograd(_layer_by_layer("numba")),
            "fastbp.functional.linear_act per layer, numba kernels",
        ),
    )
}
