"""Modules built on fastbp's kernels, with ``nn.Linear``'s parameter layout.

``MLP`` is a drop-in for ``nn.Sequential(nn.Linear, nn.ReLU, …, nn.Linear)``:
its children are that same sequence (fastbp ``Linear`` layers and the torch
activation modules) under the same names, so ``state_dict`` keys, parameter
order and initialisation match the ``nn.Sequential`` it replaces, while its
forward runs the whole network as one fused autograd node.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import activations as _activations
from . import functional as F


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class Linear(nn.Module):
    """``act(x Wᵀ + b)`` with fastbp's kernels; parameters and init as ``nn.Linear``'s.

    Args:
        in_features, out_features: sizes; ``weight`` is (out_features, in_features).
        bias: whether the layer has a ``bias`` of shape (out_features,).
        activation: "identity", "relu", "sigmoid" or "tanh", fused into the layer.
        backend: "auto", "numba", "triton" or "torch" (see ``fastbp.functional``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str = "identity",
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self.activation = _activations.get(activation).name
        self.backend = F.check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        self.bias = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.reset_parameters()

    # nn.Linear's own initialisation, so the same seed gives the same weights.
    reset_parameters = nn.Linear.reset_parameters

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear_act(x, self.weight, self.bias, self.activation, backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation={self.activation!r}, "
            f"backend={self.backend!r}"
        )


def _per_layer(name: str, value, count: int) -> list:
    """A per-layer list from one value or a sequence of ``count`` values."""
    if isinstance(value, (str, bool)):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"{name} must be one value or {count} values, got {len(values)}")
    return values


class MLP(nn.Module):
    """A dense network whose forward and backward each run as one fastbp kernel call.

    Args:
        sizes: layer widths ``[in, hidden…, out]``, at least two.
        activation: activation after each hidden layer, one name or one per hidden layer.
        output_activation: activation after the last layer.
        bias: whether layers have a bias, one flag or one per layer.
        backend: "auto", "numba", "triton" or "torch" (see ``fastbp.functional``).

    ``MLP([1000, 100, 10])`` has the children, parameter names and initial
    weights (for the same seed) of ``nn.Sequential(nn.Linear(1000, 100),
    nn.ReLU(), nn.Linear(100, 10))``.
    """

    def __init__(
        self,
        sizes: Sequence[int],
        activation: str | Sequence[str] = "relu",
        output_activation: str = "identity",
        bias: bool | Sequence[bool] = True,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        sizes = [_positive_int(f"sizes[{i}]", s) for i, s in enumerate(sizes)]
        if len(sizes) < 2:
            raise ValueError(f"sizes must list at least [in, out], got {sizes}")
        num_layers = len(sizes) - 1
        hidden = _per_layer("activation", activation, num_layers - 1)
        names = [_activations.get(a).name for a in [*hidden, output_activation]]
        biases = _per_layer("bias", bias, num_layers)
        self.backend = F.check_backend(backend)
        self.activations = tuple(names)
        self._linear_names = []
        for layer, name in enumerate(names):
            linear = Linear(
                sizes[layer], sizes[layer + 1], biases[layer], backend=backend,
                device=device, dtype=dtype,
            )  # fmt: skip
            self._linear_names.append(str(len(self._modules)))
            self.add_module(self._linear_names[-1], linear)
            module = _activations.ACTIVATIONS[name].module
            if module is not None:
                self.add_module(str(len(self._modules)), module())

    @property
    def linears(self) -> list[Linear]:
        """The ``Linear`` layers, input to output."""
        return [self._modules[name] for name in self._linear_names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        layers = self.linears
        return F.mlp(
            x,
            [layer.weight for layer in layers],
            [layer.bias for layer in layers],
            self.activations,
            backend=self.backend,
        )

    @classmethod
    def from_torch(cls, sequential: nn.Sequential, *, backend: str = "auto") -> MLP:
        """An ``MLP`` with a copy of the weights of ``nn.Sequential(Linear, act, …)``.

        Each ``nn.Linear`` may be followed by one of ``nn.ReLU``, ``nn.Sigmoid``,
        ``nn.Tanh`` or ``nn.Identity``; anything else raises ``ValueError``.
        """
        linears, names = _parse_sequential(sequential)
        sizes = [linears[0].in_features] + [linear.out_features for linear in linears]
        weight = linears[0].weight
        mlp = cls(
            sizes, names[:-1], names[-1], [linear.bias is not None for linear in linears],
            backend=backend, device=weight.device, dtype=weight.dtype,
        )  # fmt: skip
        _copy_parameters(linears, mlp.linears)
        return mlp

    def to_torch(self) -> nn.Sequential:
        """The equivalent ``nn.Sequential`` (``nn.Linear`` and activations), weights copied."""
        modules = []
        for layer, name in zip(self.linears, self.activations, strict=True):
            weight = layer.weight
            modules.append(
                nn.Linear(
                    layer.in_features,
                    layer.out_features,
                    layer.bias is not None,
                    device=weight.device,
                    dtype=weight.dtype,
                )  # fmt: skip
            )
            module = _activations.ACTIVATIONS[name].module
            if module is not None:
                modules.append(module())
        sequential = nn.Sequential(*modules)
        _copy_parameters(self.linears, [m for m in sequential if isinstance(m, nn.Linear)])
        return sequential


def _parse_sequential(sequential: nn.Sequential) -> tuple[list[nn.Linear], list[str]]:
    if not isinstance(sequential, nn.Sequential):
        raise TypeError(f"sequential must be an nn.Sequential, got {type(sequential).__name__}")
    linears, names = [], []
    for index, module in enumerate(sequential):
        if isinstance(module, (nn.Linear, Linear)):
            linears.append(module)
            names.append(getattr(module, "activation", "identity"))
            continue
        activation = _activations.from_module(module)
        if activation is None or not linears or names[-1] != "identity":
            raise ValueError(
                f"sequential[{index}] is {module!r}; fastbp.nn.MLP takes Linear layers, each "
                "followed by at most one of nn.ReLU, nn.Sigmoid, nn.Tanh or nn.Identity"
            )
        names[-1] = activation.name
    if not linears:
        raise ValueError("sequential must contain at least one nn.Linear")
    return linears, names


@torch.no_grad()
def _copy_parameters(sources, targets) -> None:
    for source, target in zip(sources, targets, strict=True):
        target.weight.copy_(source.weight)
        if source.bias is not None:
            target.bias.copy_(source.bias)
