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

   For identity, relu, sigmoid and tanh the derivative is a function of the
   *output*, so backward needs ``a`` but not ``z``::

       identity  a = z               act' = 1
       relu      a = max(z, 0)       act' = 0 where a ≤ 0, else 1
       sigmoid   a = 1 / (1 + e⁻ᶻ)   act' = a (1 − a)
       tanh      a = tanh z          act' = 1 − a²

   For the others it is written in terms of ``z`` (as torch computes it), and the
   kernels keep ``z`` from forward for those layers; this oracle recomputes it.
   With σ the sigmoid, Φ the standard normal CDF and φ = Φ' its density::

       leaky_relu  a = z if z > 0 else s·z           act' = 1 if z > 0 else s
       elu         a = z if z > 0 else α(eᶻ − 1)     act' = 1 if z > 0 else α eᶻ
       softplus    a = log(1 + e^{βz})/β             act' = σ(βz)
                   (a = z where βz > threshold)      act' = 1 there
       silu        a = z σ(z)                        act' = σ(z) (1 + z (1 − σ(z)))
       gelu        a = z Φ(z)                        act' = Φ(z) + z φ(z),
                   Φ(z) = (1 + erf(z/√2))/2,          φ(z) = e^{−z²/2}/√(2π)
       gelu_tanh   a = z/2 (1 + t),                  act' = (1 + t)/2
                   t = tanh(k(z + c z³)),              + z/2 (1 − t²) k (1 + 3c z²)
                   k = √(2/π), c = 0.044715

   silu's derivative follows from the product rule and σ' = σ(1 − σ); softplus'
   from d/dz log(1 + e^{βz}) = βe^{βz}/(1 + e^{βz}); gelu_tanh's from the product
   rule and tanh' = 1 − tanh².

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

A training step
===============
The loss turns the network's output ``ŷ = a_L`` into a number and hands
backward its first ``g = ∂L/∂ŷ``. With ``M`` the number of terms the mean
divides by (every entry for MSE and BCE, the batch N for cross-entropy)::

    mse               L = Σ (ŷ − y)²                        g = 2 (ŷ − y)
    cross_entropy     L = Σₙ (log Σⱼ e^ŷₙⱼ − ŷₙ,yₙ)         g = softmax(ŷ) − onehot(y)
    bce_with_logits   L = Σ max(ŷ,0) − ŷ y + log(1 + e^−|ŷ|) g = σ(ŷ) − y

and ``reduction="mean"`` divides L and g by M. The optimizer then moves every
parameter p against its gradient ∂p, as ``torch.optim`` does (``wd`` is the
weight decay, ``t`` the step, counted from 1)::

    sgd    d = ∂p + wd·p;  with momentum μ: buf = d at t = 1, else μ·buf + d; d = buf
           p ← p − lr·d
    adam   d = ∂p + wd·p;  m ← m + (1 − β₁)(d − m);  v ← β₂ v + (1 − β₂) d²
           p ← p − lr/(1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)
    adamw  p ← (1 − lr·wd)·p first, then adam with d = ∂p (the decay decoupled from m, v)

``FusedTrainer`` with ``max_grad_norm`` first scales every ∂p by
``min(1, max_norm / (‖(∂p₁, ∂p₂, …)‖₂ + 10⁻⁶))``, as ``torch.nn.utils.clip_grad_norm_``.

NaN and Inf
===========
Results propagate NaN and Inf as PyTorch does: relu keeps NaN (``max`` would
not, so it is written as a select on ``z < 0``), and relu's derivative is the
select of torch's ``threshold_backward``, ``0 if a <= 0 else g``, not a
product: a NaN in ``g`` where the unit is off gives 0, and where ``a`` is NaN
the gradient passes.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from .activation_table import NAMES, parse
from .utils import check_choice

ACTIVATIONS = NAMES  # every activation's name (specs add parameters: activations.py)
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)
_GELU_CUBIC = 0.044715


def _sigmoid(z: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # e⁻ᶻ overflows to inf for z ≪ 0: σ → 0, as intended
        return 1 / (1 + np.exp(-z))


def _erf(z: np.ndarray) -> np.ndarray:
    """erf in z's dtype; through float64 for longdouble, which scipy's erf does not take."""
    return (
        special.erf(z.astype(np.float64)).astype(z.dtype)
        if z.dtype == np.longdouble
        else special.erf(z)
    )


def activate(z: np.ndarray, activation: str) -> np.ndarray:
    """``act(z)``, element by element; ``activation`` is a spec (see activations.py)."""
    parsed = parse(activation)
    name, values = parsed.activation.name, parsed.values
    if name == "identity":
        return z
    if name == "relu":
        return np.where(z < 0, np.zeros_like(z), z)
    if name == "sigmoid":
        return _sigmoid(z)
    if name == "tanh":
        return np.tanh(z)
    negative = np.minimum(z, 0)  # the branch not taken must not overflow
    with np.errstate(over="ignore", invalid="ignore"):
        if name == "leaky_relu":
            return np.where(z > 0, z, z * z.dtype.type(values[0]))
        if name == "elu":
            return np.where(z > 0, z, z.dtype.type(values[0]) * np.expm1(negative))
        if name == "softplus":
            beta, threshold = values
            scaled = z * z.dtype.type(beta)
            soft = np.log1p(np.exp(np.minimum(scaled, threshold))) / z.dtype.type(beta)
            return np.where(scaled > threshold, z, soft)
        if name == "silu":
            return z * _sigmoid(z)
        if name == "gelu":
            return z * (1 + _erf(z / math.sqrt(2))) / 2
        t = np.tanh(_SQRT_2_OVER_PI * (z + _GELU_CUBIC * z**3))  # gelu_tanh
        return z * (1 + t) / 2


def activation_grad(
    g: np.ndarray, a: np.ndarray, activation: str, z: np.ndarray | None = None
) -> np.ndarray:
    """``δ = g ⊙ act'(z)``, from the output ``a = act(z)`` for identity, relu, sigmoid and
    tanh, from the pre-activation ``z`` for the others."""
    parsed = parse(activation)
    name, values = parsed.activation.name, parsed.values
    if name == "identity":
        return g
    if name == "relu":
        return np.where(a <= 0, np.zeros_like(g), g)
    if name == "sigmoid":
        return g * (1 - a) * a
    if name == "tanh":
        return g * (1 - a * a)
    if z is None:
        raise ValueError(f"the derivative of {name} needs z, the pre-activation")
    with np.errstate(over="ignore", invalid="ignore"):
        if name == "leaky_relu":
            return np.where(z > 0, g, g * values[0])
        if name == "elu":
            # a NaN z gives NaN, as torch's vectorized loop (its scalar tail passes g)
            return np.where(z > 0, g, g * values[0] * np.exp(np.minimum(z, 0)))
        if name == "softplus":
            beta, threshold = values
            return np.where(z * beta > threshold, g, g * _sigmoid(beta * z))
        if name == "silu":
            s = _sigmoid(z)
            return g * s * (1 + z * (1 - s))
        if name == "gelu":
            cdf = (1 + _erf(z / math.sqrt(2))) / 2
            pdf = np.exp(-z * z / 2) / math.sqrt(2 * math.pi)
            return g * (cdf + z * pdf)
        t = np.tanh(_SQRT_2_OVER_PI * (z + _GELU_CUBIC * z**3))  # gelu_tanh
        slope = (1 + t) / 2 + z / 2 * (1 - t * t) * _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * z * z)
        return g * slope


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
    z: np.ndarray | None = None,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """Gradients ``(∂L/∂x, ∂L/∂W, ∂L/∂b)`` of one layer from ``g = ∂L/∂a``.

    ``a`` is the output saved by forward, ``z`` its pre-activation (needed only where
    the derivative reads it); ``∂L/∂x`` is None unless asked for, ``∂L/∂b`` is None for
    a layer without bias.
    """
    delta = activation_grad(g, a, activation, z)
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
    """``(∂L/∂x, [∂L/∂Wₗ], [∂L/∂bₗ])`` from ``g = ∂L/∂a_L`` and the saved ``outputs``.

    Where an activation's derivative reads z, z is recomputed from the layer's input,
    weight and bias (the kernels keep it from forward instead).
    """
    inputs = [x, *outputs[: len(weights) - 1]]
    grad_weights: list[np.ndarray] = [None] * len(weights)  # type: ignore[list-item]
    grad_biases: list[np.ndarray | None] = [None] * len(weights)
    for layer in reversed(range(len(weights))):
        wants_grad_in = layer > 0 or needs_input_grad
        z = None
        if parse(activations[layer]).activation.reads_input:
            z = inputs[layer] @ weights[layer].T
            z = z if biases[layer] is None else z + biases[layer]
        g, grad_weights[layer], grad_biases[layer] = linear_act_backward(
            g,
            inputs[layer],
            weights[layer],
            outputs[layer],
            activations[layer],
            has_bias=biases[layer] is not None,
            needs_input_grad=wants_grad_in,
            z=z,
        )
    return g, grad_weights, grad_biases


LOSSES = ("mse", "cross_entropy", "bce_with_logits")
REDUCTIONS = ("mean", "sum")
OPTIMIZERS = ("sgd", "adam", "adamw")


def loss_and_grad(
    output: np.ndarray, y: np.ndarray, loss: str, reduction: str = "mean"
) -> tuple[float, np.ndarray]:
    """``(L, ∂L/∂ŷ)`` for the network's output ``ŷ``; ``y`` holds int class indices
    (N,) for cross-entropy and targets shaped like ``ŷ`` otherwise."""
    check_choice("loss", loss, LOSSES)
    if loss == "mse":
        difference = output - y
        total, grad, terms = np.sum(difference * difference), 2 * difference, output.size
    elif loss == "cross_entropy":
        shifted = output - output.max(axis=1, keepdims=True)
        log_sum = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        rows = np.arange(len(y))
        total = np.sum(log_sum[:, 0] - shifted[rows, y])
        grad = np.exp(shifted - log_sum)
        grad[rows, y] -= 1
        terms = output.shape[0]
    else:  # bce_with_logits
        total = np.sum(np.maximum(output, 0) - output * y + np.log1p(np.exp(-np.abs(output))))
        grad, terms = activate(output, "sigmoid") - y, output.size
    if reduction == "mean":
        return float(total) / terms, grad / output.dtype.type(terms)
    return float(total), grad


class SGD:
    """``torch.optim.SGD`` (no dampening, no Nesterov) on numpy arrays, updated in place."""

    def __init__(self, lr: float, momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: dict[int, np.ndarray] = {}

    def update(self, index: int, param: np.ndarray, grad: np.ndarray) -> None:
        direction = grad + self.weight_decay * param if self.weight_decay else grad
        if self.momentum:
            previous = self.buffers.get(index)
            direction = direction if previous is None else self.momentum * previous + direction
            self.buffers[index] = direction
        param -= self.lr * direction


class Adam:
    """``torch.optim.Adam`` (L2 weight decay, no AMSGrad) on numpy arrays, updated in place."""

    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0) -> None:
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        self.moments: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}

    decoupled = False  # AdamW's decay moves p apart from m and v

    def update(self, index: int, param: np.ndarray, grad: np.ndarray) -> None:
        beta1, beta2 = self.betas
        fresh = (0, np.zeros_like(param), np.zeros_like(param))
        step, mean, square = self.moments.get(index, fresh)
        step += 1
        if self.decoupled:
            param *= 1 - self.lr * self.weight_decay
            direction = grad
        else:
            direction = grad + self.weight_decay * param if self.weight_decay else grad
        mean += (1 - beta1) * (direction - mean)
        square *= beta2
        square += (1 - beta2) * direction * direction
        denominator = np.sqrt(square) / np.sqrt(1 - beta2**step) + self.eps
        param -= self.lr / (1 - beta1**step) * mean / denominator
        self.moments[index] = (step, mean, square)


class AdamW(Adam):
    """``torch.optim.AdamW`` (decoupled weight decay, no AMSGrad) on numpy arrays."""

    decoupled = True

    def __init__(self, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01) -> None:
        super().__init__(lr, betas, eps, weight_decay)


def train_step(x, y, weights, biases, activations, loss, reduction, optimizer) -> float:
    """One step: forward, ``loss_and_grad``, ``mlp_backward``, then ``optimizer.update``
    on every parameter in ``nn.Sequential``'s order (W₁, b₁, W₂, …), in place.
    Returns the loss of the forward pass, before the update."""
    outputs = mlp_forward(x, weights, biases, activations)
    value, g = loss_and_grad(outputs[-1], y, loss, reduction)
    _, grad_weights, grad_biases = mlp_backward(
        g, x, weights, biases, activations, outputs, needs_input_grad=False
    )
    parameters = zip(weights, biases, grad_weights, grad_biases, strict=True)
    index = 0
    for weight, bias, grad_weight, grad_bias in parameters:
        optimizer.update(index, weight, grad_weight)
        index += 1
        if bias is not None:
            optimizer.update(index, bias, grad_bias)
            index += 1
    return value
