"""fastbp's layers as PyTorch functions: ``linear_act`` and ``mlp``; ``ensemble_loss``.

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

from .kernels.utils import check_choice
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

    Every call checks the whole network and prepares its kernels again; the modules
    (``fastbp.nn.MLP``) keep what they checked, which costs a small network's call
    several times less.
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


_ELEMENT_LOSSES = {
    "mse": lambda output, y: torch.nn.functional.mse_loss(output, y, reduction="none"),
    "bce_with_logits": lambda output, y: torch.nn.functional.binary_cross_entropy_with_logits(
        output, y, reduction="none"
    ),
}


def ensemble_loss(output, y, loss: str = "mse", reduction: str = "mean") -> torch.Tensor:
    """The loss of an ensemble's ``(K, N, out)`` output: each member's own, as
    ``torch.nn.functional``'s ``loss`` with ``reduction`` computes it on its ``(N, out)``
    output, added over the members (so their gradients stay each member's own).

    ``y`` is ``(K, N, out)``, or ``(N, out)`` shared by every member; for
    "cross_entropy", int64 class indices ``(K, N)`` or ``(N,)``. This is the loss
    ``FusedTrainer`` trains an ``MLPEnsemble`` with.
    """
    check_choice("loss", loss, (*_ELEMENT_LOSSES, "cross_entropy"))
    check_choice("reduction", reduction, ("mean", "sum"))
    members, batch, classes = output.shape
    if loss == "cross_entropy":
        labels = y.expand(members, batch).reshape(-1)
        terms = torch.nn.functional.cross_entropy(
            output.reshape(-1, classes), labels, reduction="none"
        ).reshape(members, batch)
    else:
        terms = _ELEMENT_LOSSES[loss](output, y.expand_as(output)).reshape(members, -1)
    per_member = terms.mean(dim=1) if reduction == "mean" else terms.sum(dim=1)
    return per_member.sum()
