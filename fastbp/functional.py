"""fastbp's layers as PyTorch functions: ``linear_act`` and ``mlp``.

``linear_act`` is one layer, ``mlp`` a whole network as ONE autograd node (one
forward kernel call, one backward kernel call). Both check their inputs at the
boundary, because the kernels below do not check bounds, then dispatch on
``backend``:

- ``"numba"``: fastbp's CPU kernels (``fastbp.kernels.cpu``);
- ``"triton"``: fastbp's GPU kernels (``fastbp.kernels.gpu``), for CUDA tensors
  (CPU tensors only under ``TRITON_INTERPRET=1``); needs the ``gpu`` extra;
- ``"torch"``: native torch ops under torch's autograd, the baseline;
- ``"auto"``: numba for float32/float64 CPU tensors, triton for float32,
  float16 and bfloat16 CUDA tensors when Triton is installed, torch for the rest,
  so a model moved with ``.cuda()`` or ``.to(torch.bfloat16)`` keeps working.

Eager calls run a ``fastbp.plans.Plan`` (the network checked once) through one
``autograd.Function``; torch.compile, torch.export and torch.func see the custom
ops and functorch Functions of ``fastbp.traced``. Inputs are ``(*, in_features)``,
as for ``nn.Linear``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .plans import Plan, check_network, plan, resolve_backend
from .traced import traced_mlp, tracing


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
        x: input of shape (*, in_features), any strides; leading dimensions are batch.
        weights: one (out, in) tensor per layer, ``nn.Linear``'s layout.
        biases: one (out,) tensor or None per layer.
        activations: one per layer: a name ("relu", "gelu", …), a spec with parameters
            ("leaky_relu(negative_slope=0.2)") or a torch activation module instance
            (see ``fastbp.kernels.activation_table``).
        backend: "auto", "numba", "triton" or "torch" (see the module docstring).

    Returns:
        The last layer's output, (*, out_features of the last layer).
    """
    if tracing():
        return traced_mlp(x, list(weights), list(biases), activations, backend)
    return plan(x, weights, biases, activations, backend)(x)


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "relu",
    *,
    backend: str = "auto",
) -> torch.Tensor:
    """One dense layer, ``act(x Wᵀ + b)``, with fastbp's hand-derived backward.

    ``x`` is (*, in_features); ``weight`` is (out_features, in_features) as in
    ``nn.Linear``; ``bias`` is (out_features,) or None. See ``mlp`` for the backends.
    """
    names = check_network(x, [weight], [bias], [activation], indexed=False)
    if tracing():
        return traced_mlp(x, [weight], [bias], names, backend)
    return Plan([weight], [bias], names, resolve_backend(backend, x))(x)
