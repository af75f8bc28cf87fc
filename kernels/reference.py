r"""Reference forward and backward pass of dense layers, in plain numpy.

This file is the oracle every other backend is tested against, and the page a
student reads. It favours clarity over speed and works in any float dtype
(float64 for the reference values the tests compare with).

The layer
=========
Weights use ``nn.Linear``'s layout: ``W`` has shape (out, in). For a batch
``x`` of shape (N, in)::

    z = x Wᵀ + b          (N, out)      pre-activation
    a = act(z)            (N, out)      the layer's output

The backward pass
=================
The loss ``L`` reaches the layer through its output only, so backward receives
``g = ∂L/∂a`` (N, out) and must return ``∂L/∂x``, ``∂L/∂W`` and ``∂L/∂b``.

1. Through the activation, element by element (the chain rule for a function
   applied to each entry)::

       δ = ∂L/∂z = g ⊙ act'(z)

   Every activation here has a derivative that is a function of its *output*,
   so backward needs ``a`` but never ``z``, and forward need not keep ``z``:

       identity  a = z               act' = 1
       relu      a = max(z, 0)       act' = 0 where a ≤ 0, else 1
       sigmoid   a = 1 / (1 + e⁻ᶻ)   act' = a (1 − a)
       tanh      a = tanh z          act' = 1 − a²

2. Through the affine map. Entry (n, j) of z is ``z[n,j] = Σ_k x[n,k] W[j,k] + b[j]``,
   so ``∂z[n,j]/∂W[j,k] = x[n,k]``, ``∂z[n,j]/∂b[j] = 1`` and ``∂z[n,j]/∂x[n,k] = W[j,k]``.
   Summing over every z the parameter touches::

       ∂L/∂W[j,k] = Σ_n δ[n,j] x[n,k]      i.e.  ∂L/∂W = δᵀ x     (out, in)
       ∂L/∂b[j]   = Σ_n δ[n,j]             i.e.  ∂L/∂b = Σ_batch δ (out,)
       ∂L/∂x[n,k] = Σ_j δ[n,j] W[j,k]      i.e.  ∂L/∂x = δ W       (N, in)

   ``∂L/∂x`` is the ``g`` of the previous layer; the first layer skips it when
   the input needs no gradient.

A whole network
===============
An MLP is layers chained: ``a₀ = x``, ``aₗ = actₗ(aₗ₋₁ Wₗᵀ + bₗ)``. Backward walks
them in reverse, each layer's ``∂L/∂x`` becoming the ``g`` of the layer below.

NaN and Inf
===========
Results propagate NaN and Inf as PyTorch does: relu keeps NaN (``max`` would
not, so it is written as a select on ``z < 0``), and relu's derivative is the
select of torch's ``threshold_backward``, ``0 if a <= 0 else g``, not a
product: a NaN in ``g`` where the unit is off gives 0, and where ``a`` is NaN
the gradient passes.
"""

from __future__ import annotations

import numpy as np

ACTIVATIONS = ("identity", "relu", "sigmoid", "tanh")


def activate(z: np.ndarray, activation: str) -> np.ndarray:
    """``act(z)``, element by element."""
    if activation == "identity":
        return z
    if activation == "relu":
        return np.where(z < 0, np.zeros_like(z), z)
    if activation == "sigmoid":
        with np.errstate(over="ignore"):  # e⁻ᶻ overflows to inf for z ≪ 0: σ → 0, as intended
            return 1 / (1 + np.exp(-z))
    if activation == "tanh":
        return np.tanh(z)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def activation_grad(g: np.ndarray, a: np.ndarray, activation: str) -> np.ndarray:
    """``δ = g ⊙ act'(z)``, with ``act'`` written in terms of the output ``a = act(z)``."""
    if activation == "identity":
        return g
    if activation == "relu":
        return np.where(a <= 0, np.zeros_like(g), g)
    if activation == "sigmoid":
        return g * (1 - a) * a
    if activation == "tanh":
        return g * (1 - a * a)
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")


def linear_act_forward(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray | None, activation: str
) -> np.ndarray:
    """``a = act(x Wᵀ + b)`` for x (N, in), W (out, in), b (out,) or None."""
    z = x @ weight.T
    if bias is not None:
        z = z + bias
    return activate(z, activation)


def linear_act_backward(
    g: np.ndarray,
    x: np.ndarray,
    weight: np.ndarray,
    a: np.ndarray,
    activation: str,
    has_bias: bool = True,
    needs_input_grad: bool = True,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Gradients ``(∂L/∂x, ∂L/∂W, ∂L/∂b)`` of one layer from ``g = ∂L/∂a``.

    ``a`` is the output saved by forward; ``∂L/∂x`` is None unless asked for,
    ``∂L/∂b`` is None for a layer without bias.
    """
    delta = activation_grad(g, a, activation)
    grad_weight = delta.T @ x
    grad_bias = delta.sum(axis=0) if has_bias else None
    grad_input = delta @ weight if needs_input_grad else None
    return grad_input, grad_weight, grad_bias


def mlp_forward(
    x: np.ndarray,
    weights: list[np.ndarray],
    biases: list[np.ndarray | None],
    activations: list[str],
) -> list[np.ndarray]:
    """Outputs ``[a₁, …, a_L]`` of every layer; the last one is the network's output."""
    outputs = []
    a = x
    for weight, bias, activation in zip(weights, biases, activations, strict=True):
        a = linear_act_forward(a, weight, bias, activation)
        outputs.append(a)
    return outputs


def mlp_backward(
    g: np.ndarray,
    x: np.ndarray,
    weights: list[np.ndarray],
    biases: list[np.ndarray | None],
    activations: list[str],
    outputs: list[np.ndarray],
    needs_input_grad: bool = True,
) -> tuple[np.ndarray | None, list[np.ndarray], list[np.ndarray | None]]:
    """``(∂L/∂x, [∂L/∂Wₗ], [∂L/∂bₗ])`` from ``g = ∂L/∂a_L`` and the saved ``outputs``."""
    inputs = [x, *outputs[:-1]]
    grad_weights: list[np.ndarray] = [None] * len(weights)  # type: ignore[list-item]
    grad_biases: list[np.ndarray | None] = [None] * len(weights)
    for layer in reversed(range(len(weights))):
        wants_grad_in = layer > 0 or needs_input_grad
        g, grad_weights[layer], grad_biases[layer] = linear_act_backward(
            g,
            inputs[layer],
            weights[layer],
            outputs[layer],
            activations[layer],
            has_bias=biases[layer] is not None,
            needs_input_grad=wants_grad_in,
        )
    return g, grad_weights, grad_biases
