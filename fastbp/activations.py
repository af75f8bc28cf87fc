"""The activations in torch: each entry of ``fastbp.kernels.activation_table``' table as
torch computes it.

Per activation: the native torch function (the "torch" backend), its derivative in
torch ops as ``fastbp.kernels.reference`` derives it (``δ = grad(g, a, z)``, for the
hand-written torch training step), and the ``torch.nn`` module that stands for it
in an ``nn.Sequential`` (for ``MLP.from_torch`` / ``to_torch``), with how to read
its parameters from an instance and build one.

``get`` turns what a user passes as an activation (a spec string such as
``"leaky_relu(negative_slope=0.2)"``, or a module instance such as
``nn.LeakyReLU(0.2)``) into a ``Bound`` activation: the entry with its parameter
values, whose ``name`` is the canonical spec every layer stores.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from .kernels import activation_table as table

_SQRT_2_OVER_PI, _GELU_CUBIC = math.sqrt(2 / math.pi), 0.044715


def _gelu_tanh_grad(g, z):
    t = torch.tanh(_SQRT_2_OVER_PI * (z + _GELU_CUBIC * z**3))
    inner = _SQRT_2_OVER_PI * (1 + 3 * _GELU_CUBIC * z * z)
    return g * ((1 + t) / 2 + z / 2 * (1 - t * t) * inner)


def _gelu_grad(g, z):
    cdf = (1 + torch.erf(z / math.sqrt(2))) / 2
    return g * (cdf + z * torch.exp(-z * z / 2) / math.sqrt(2 * math.pi))


def _silu_grad(g, z):
    s = torch.sigmoid(z)
    return g * s * (1 + z * (1 - s))


@dataclass(frozen=True)
class TorchActivation:
    """One table entry in torch: ``function(z, *values)``, ``grad(g, a, z, *values)``,
    the module class, ``read(module)`` (its parameter values, or None where the
    instance computes something else) and ``build(*values)`` (a module instance)."""

    function: Callable[..., torch.Tensor]
    grad: Callable[..., torch.Tensor]
    module: type[nn.Module] | None
    read: Callable[[nn.Module], tuple | None] = lambda module: ()
    build: Callable[..., nn.Module | None] | None = None


IN_TORCH: dict[str, TorchActivation] = {
    "identity": TorchActivation(lambda z: z, lambda g, a, z: g, nn.Identity, build=lambda: None),
    "relu": TorchActivation(
        torch.relu, lambda g, a, z: torch.ops.aten.threshold_backward(g, a, 0), nn.ReLU
    ),
    "sigmoid": TorchActivation(torch.sigmoid, lambda g, a, z: g * (1 - a) * a, nn.Sigmoid),
    "tanh": TorchActivation(torch.tanh, lambda g, a, z: g * (1 - a * a), nn.Tanh),
    "leaky_relu": TorchActivation(
        F.leaky_relu,
        lambda g, a, z, slope: torch.where(z > 0, g, g * slope),
        nn.LeakyReLU,
        lambda m: (m.negative_slope,),
    ),
    "gelu": TorchActivation(
        F.gelu,
        lambda g, a, z: _gelu_grad(g, z),
        nn.GELU,
        lambda m: () if m.approximate == "none" else None,
    ),
    "gelu_tanh": TorchActivation(
        lambda z: F.gelu(z, approximate="tanh"),
        lambda g, a, z: _gelu_tanh_grad(g, z),
        nn.GELU,
        lambda m: () if m.approximate == "tanh" else None,
        lambda: nn.GELU(approximate="tanh"),
    ),
    "silu": TorchActivation(F.silu, lambda g, a, z: _silu_grad(g, z), nn.SiLU),
    "softplus": TorchActivation(
        F.softplus,
        lambda g, a, z, beta, threshold: torch.where(
            z * beta > threshold, g, g * torch.sigmoid(z * beta)
        ),
        nn.Softplus,
        lambda m: (float(m.beta), float(m.threshold)),
    ),
    "elu": TorchActivation(
        F.elu,
        lambda g, a, z, alpha: torch.where(z > 0, g, g * alpha * torch.exp(z)),
        nn.ELU,
        lambda m: (m.alpha,),
    ),
}
assert set(IN_TORCH) == set(table.NAMES), "every activation of the table, in torch"


@dataclass(frozen=True)
class Bound:
    """An activation with its parameter values; ``name`` is its canonical spec."""

    parsed: table.Parsed

    @property
    def name(self) -> str:
        return self.parsed.spec

    @property
    def kind(self) -> str:
        """The table entry's name, without parameters."""
        return self.parsed.activation.name

    @property
    def reads_input(self) -> bool:
        return self.parsed.activation.reads_input

    def function(self, z: torch.Tensor) -> torch.Tensor:
        return IN_TORCH[self.kind].function(z, *self.parsed.values)

    def grad(self, g: torch.Tensor, a: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
        """``δ = g ⊙ act'``, from ``a`` or, where the derivative reads it, ``z``."""
        return IN_TORCH[self.kind].grad(g, a, z, *self.parsed.values)

    def module(self) -> nn.Module | None:
        """A new ``torch.nn`` module computing it; None for the identity."""
        entry = IN_TORCH[self.kind]
        return (entry.build or entry.module)(*self.parsed.values)


def get(activation, argument: str = "activation") -> Bound:
    """``activation`` (a spec string or a torch activation module instance) checked; a
    ``ValueError`` naming ``argument`` and listing what is supported otherwise."""
    if isinstance(activation, Bound):
        return activation
    if isinstance(activation, nn.Module):
        bound = from_module(activation)
        if bound is None:
            raise ValueError(
                f"{argument} {activation!r} is not an activation fastbp runs; supported: "
                f"{supported_modules()}"
            )
        return bound
    return Bound(table.parse(activation, argument))


def from_module(module: nn.Module) -> Bound | None:
    """The activation an ``nn.Module`` computes, or None if it is not one fastbp knows."""
    for name, entry in IN_TORCH.items():
        if type(module) is entry.module:
            values = entry.read(module)
            if values is not None:
                return Bound(table.parse(table.canonical(name, values)))
    return None


# The attributes that hold a module's parameters: the table's parameter names, which
# are torch's; nn.GELU's approximate picks between two entries.
_SETTINGS = {
    entry.module: tuple(name for name, _ in table.BY_NAME[kind].parameters)
    for kind, entry in IN_TORCH.items()
    if table.BY_NAME[kind].parameters
} | {nn.GELU: ("approximate",)}


def settings(module: nn.Module) -> tuple:
    """What an activation module is set to (its parameters' values; () for the others),
    so that a change to one is seen: ``fastbp.nn.MLP`` keys its layout on it."""
    names = _SETTINGS.get(type(module))  # None for most children: checked every call
    return () if names is None else tuple(getattr(module, name) for name in names)


def supported_modules() -> str:
    """The torch modules ``from_module`` knows, for error messages."""
    modules = dict.fromkeys(e.module.__name__ for e in IN_TORCH.values())
    return ", ".join(f"nn.{m}" for m in modules) + " (nn.GELU exact or approximate='tanh')"
