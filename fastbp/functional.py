"""fastbp's layers as PyTorch autograd functions: the one place the kernels meet autograd.

``linear_act`` is one layer, ``mlp`` a whole network as ONE autograd node (one
forward kernel call, one backward kernel call). Both check their inputs at the
boundary, because the kernels below do not check bounds, then dispatch on
``backend``:

- ``"numba"``: fastbp's CPU kernels (``fastbp.kernels.cpu``);
- ``"torch"``: native torch ops under torch's autograd, the baseline;
- ``"auto"``: numba for CPU tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from . import activations as _activations
from . import threads
from .kernels import cpu

BACKENDS = ("auto", "numba", "torch")
CPU_DTYPES = (torch.float32, torch.float64)


# ---------------------------------------------------------------------------
# Input checks: every message names the argument, what it got and what it needs.
# ---------------------------------------------------------------------------
def _describe(tensor: torch.Tensor) -> str:
    return f"shape {tuple(tensor.shape)}, dtype {tensor.dtype}, device {tensor.device}"


def _check_tensor(name: str, value, ndim: int) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        need = "(batch, in_features)" if ndim == 2 else "(out_features,)"
        raise ValueError(f"{name} must be a {ndim}-D tensor {need}, got {_describe(value)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {_describe(value)}")
    return value


def _check_layer(x: torch.Tensor, in_features: int, weight, bias, index: str = "") -> int:
    """Check one layer's parameters against x (dtype, device) and its input width.

    ``index`` is "" for ``linear_act``'s ``weight``/``bias`` and "[l]" for ``mlp``'s
    ``weights[l]``/``biases[l]``.
    """
    weight_name, bias_name = (f"weights{index}", f"biases{index}") if index else ("weight", "bias")
    weight = _check_tensor(weight_name, weight, 2)
    if weight.shape[1] != in_features:
        raise ValueError(
            f"{weight_name} must have shape (out_features, {in_features}) to match its "
            f"{in_features} input features, got {_describe(weight)}"
        )
    if bias is not None:
        bias = _check_tensor(bias_name, bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{bias_name} must have shape ({weight.shape[0]},) to match {weight_name}, "
                f"got {_describe(bias)}"
            )
    for name, tensor in ((weight_name, weight), (bias_name, bias)):
        if tensor is None:
            continue
        if tensor.dtype != x.dtype:
            raise TypeError(
                f"{name} has dtype {tensor.dtype} but x has {x.dtype}; all tensors must share one"
            )
        if tensor.device != x.device:
            raise ValueError(
                f"{name} is on {tensor.device} but x is on {x.device}; "
                "all tensors must be on one device"
            )
    return weight.shape[0]


def check_backend(backend: str) -> str:
    """``backend`` if it is a known name; a ``ValueError`` listing the valid ones otherwise."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _resolve_backend(backend: str, x: torch.Tensor) -> str:
    if check_backend(backend) == "torch":
        return backend
    if x.device.type != "cpu":
        raise ValueError(
            f"backend {backend!r} runs on CPU tensors only, got x on {x.device}; "
            "use backend='torch' for tensors on other devices"
        )
    if x.dtype not in CPU_DTYPES:
        raise TypeError(f"backend 'numba' needs float32 or float64 tensors, got x of {x.dtype}")
    return "numba"


def _check_network(x, weights, biases, activations) -> list[_activations.Activation]:
    x = _check_tensor("x", x, 2)
    if not len(weights) == len(biases) == len(activations):
        raise ValueError(
            "weights, biases and activations must have one entry per layer, got "
            f"{len(weights)}, {len(biases)} and {len(activations)}"
        )
    if len(weights) == 0:
        raise ValueError("weights must hold at least one layer, got none")
    width = x.shape[1]
    for layer, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        width = _check_layer(x, width, weight, bias, f"[{layer}]")
    return [_activations.get(a, "activations") for a in activations]


# ---------------------------------------------------------------------------
# The numba backend as one autograd node
# ---------------------------------------------------------------------------
def _array(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.detach().numpy()


class _NumbaMLP(torch.autograd.Function):
    """The whole network as one node: forward saves each layer's output, nothing else."""

    @staticmethod
    def forward(ctx, x, activations, num_layers, *parameters):
        weights, biases = parameters[:num_layers], parameters[num_layers:]
        threads.ensure_policy()
        outputs = cpu.mlp_forward(
            _array(x), [_array(w) for w in weights], [_array(b) for b in biases], activations
        )
        outputs = [torch.from_numpy(a) for a in outputs]
        ctx.activations = activations
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x, *weights, *outputs)
        return outputs[-1]

    @staticmethod
    def backward(ctx, grad_output):
        if torch.is_grad_enabled():
            # create_graph=True: a backward that is not itself differentiable would
            # silently drop the second-order terms, so refuse instead.
            raise RuntimeError(
                "fastbp's hand-derived backward is not differentiable: double backward "
                "(create_graph=True, higher-order gradients) needs backend='torch'"
            )
        num_layers = len(ctx.activations)
        x, *saved = ctx.saved_tensors
        weights, outputs = saved[:num_layers], saved[num_layers:]
        grad_x, grad_weights, grad_biases = cpu.mlp_backward(
            _array(grad_output),
            _array(x),
            [_array(w) for w in weights],
            [True if has else None for has in ctx.has_bias],
            ctx.activations,
            [_array(a) for a in outputs],
            needs_input_grad=ctx.needs_input_grad[0],
        )
        as_tensor = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
        return (
            as_tensor(grad_x),
            None,
            None,
            *map(as_tensor, grad_weights),
            *map(as_tensor, grad_biases),
        )


# ---------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------
def mlp(
    x: torch.Tensor,
    weights: Sequence[torch.Tensor],
    biases: Sequence[torch.Tensor | None],
    activations: Sequence[str],
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """A whole MLP, ``aₗ = actₗ(aₗ₋₁ Wₗᵀ + bₗ)`` with ``a₀ = x``, as ONE autograd node.

    Args:
        x: input of shape (batch, in_features), any strides.
        weights: one (out, in) tensor per layer, ``nn.Linear``'s layout.
        biases: one (out,) tensor or None per layer.
        activations: one of "identity", "relu", "sigmoid", "tanh" per layer.
        backend: "auto", "numba" or "torch".

    Returns:
        The last layer's output, (batch, out_features of the last layer).
    """
    weights, biases, activations = list(weights), list(biases), list(activations)
    table = _check_network(x, weights, biases, activations)
    if _resolve_backend(backend, x) == "torch":
        for weight, bias, activation in zip(weights, biases, table, strict=True):
            x = activation.function(torch.nn.functional.linear(x, weight, bias))
        return x
    names = tuple(a.name for a in table)
    return _NumbaMLP.apply(x, names, len(weights), *weights, *biases)


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "relu",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """One dense layer, ``act(x Wᵀ + b)``, with fastbp's hand-derived backward.

    ``weight`` is (out_features, in_features) as in ``nn.Linear``; ``bias`` is
    (out_features,) or None. See ``mlp`` for the backends.
    """
    x = _check_tensor("x", x, 2)
    _check_layer(x, x.shape[1], weight, bias)
    act = _activations.get(activation)
    if _resolve_backend(backend, x) == "torch":
        return act.function(torch.nn.functional.linear(x, weight, bias))
    return _NumbaMLP.apply(x, (act.name,), 1, weight, bias)
