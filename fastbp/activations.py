"""The activations fastbp knows: one table for every backend.

Each entry ties a name to the code the kernels switch on, the native torch
function (the "torch" backend), its derivative in torch ops taken from the
saved output as ``fastbp.kernels.reference`` derives it (``δ = grad(g, a)``,
for the hand-written torch training step) and the ``torch.nn`` module that
stands for it in an ``nn.Sequential`` (for ``MLP.from_torch`` / ``to_torch``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .kernels.cpu import ACTIVATION_CODES
from .kernels.utils import check_choice


@dataclass(frozen=True)
class Activation:
    name: str
    code: int
    function: Callable[[torch.Tensor], torch.Tensor]
    grad: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    module: type[nn.Module] | None  # None: no module (identity)


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("identity", ACTIVATION_CODES["identity"], lambda z: z, lambda g, a: g, None),
        Activation(
            "relu",
            ACTIVATION_CODES["relu"],
            torch.relu,
            lambda g, a: torch.ops.aten.threshold_backward(g, a, 0),
            nn.ReLU,
        ),
        Activation(
            "sigmoid",
            ACTIVATION_CODES["sigmoid"],
            torch.sigmoid,
            lambda g, a: g * (1 - a) * a,
            nn.Sigmoid,
        ),
        Activation(
            "tanh", ACTIVATION_CODES["tanh"], torch.tanh, lambda g, a: g * (1 - a * a), nn.Tanh
        ),
    )
}


def get(name: str, argument: str = "activation") -> Activation:
    """The table entry for ``name``; a ``ValueError`` listing the valid names otherwise."""
    return ACTIVATIONS[check_choice(argument, name, tuple(ACTIVATIONS))]


def from_module(module: nn.Module) -> Activation | None:
    """The activation an ``nn.Module`` computes, or None if it is not one fastbp knows."""
    for activation in ACTIVATIONS.values():
        if activation.module is not None and type(module) is activation.module:
            return activation
    if type(module) is nn.Identity:
        return ACTIVATIONS["identity"]
    return None
