"""Modules built on fastbp's kernels, with ``nn.Linear``'s parameter layout.

``MLP`` is a drop-in for ``nn.Sequential(nn.Linear, nn.ReLU, …, nn.Linear)``, and
is one: an ``nn.Sequential`` whose children are that same sequence (``Linear``
layers and the torch activation modules) under the same names, so ``state_dict``
keys, parameter order, initialisation, indexing and iteration match the
``nn.Sequential`` it replaces. Its forward runs the whole network as one fused
autograd node while its children are layers and activations fastbp runs; when
they are not (a child replaced by another module, a hook on a child), it runs
its children one by one, as ``nn.Sequential`` does, so that every edit and hook
takes effect.

``MLPEnsemble`` holds K networks of one shape with their parameters stacked, as
``torch.func.stack_module_state`` stacks them, and runs every member in one call.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.modules import module as _module

from . import activations as _activations
from . import functional, plans, traced

# Bumped whenever a Linear's activation is set: MLP re-reads its layout then.
_activation_edits = itertools.count()
_last_edit = [0]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


class _Planned(nn.Module):
    """Keeps the ``plans.Plan`` of its last forward and reuses it while it holds."""

    def _run(self, x, weights, biases, activations) -> torch.Tensor:
        if traced.tracing():  # torch.compile, torch.export, torch.func: no memory to plan on
            return functional.mlp(x, weights, biases, activations, backend=self.backend)
        plan = self.__dict__.get("_plan")
        if plan is None or plan.activations != activations or not plan.current(weights, biases):
            plan = plans.plan(x, weights, biases, activations, self.backend)
            self.__dict__["_plan"] = plan
        return plan(x)

    def __getstate__(self):
        # A plan holds views of these parameters' memory: a copy must make its own.
        state = dict(super().__getstate__())
        state.pop("_plan", None)
        state.pop("_layout_cache", None)
        state.pop("_bound", None)
        return state


class Linear(_Planned):
    """``act(x Wᵀ + b)`` with fastbp's kernels; parameters and init as ``nn.Linear``'s.

    Args:
        in_features, out_features: sizes; ``weight`` is (out_features, in_features).
        bias: whether the layer has a ``bias`` of shape (out_features,).
        activation: fused into the layer: a name ("relu", "gelu", …), a spec with
            parameters ("leaky_relu(negative_slope=0.2)") or a torch module instance
            (``nn.LeakyReLU(0.2)``); see ``fastbp.kernels.activation_table``.
        backend: "auto", "numba", "triton" or "torch" (see ``fastbp.functional``).

    Inputs are ``(*, in_features)``, as for ``nn.Linear``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str | nn.Module = "identity",
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.in_features = _positive_int("in_features", in_features)
        self.out_features = _positive_int("out_features", out_features)
        self.activation = _activations.get(activation).name
        self.backend = plans.check_backend(backend)
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty((out_features, in_features), **factory))
        bias_ = nn.Parameter(torch.empty(out_features, **factory)) if bias else None
        self.register_parameter("bias", bias_)  # None registered too, as nn.Linear does
        self.reset_parameters()

    # nn.Linear's own initialisation, so the same seed gives the same weights.
    reset_parameters = nn.Linear.reset_parameters

    def __setattr__(self, name: str, value) -> None:
        if name == "activation":  # checked when set, never ignored when run
            value = _activations.get(value).name
            _last_edit[0] = next(_activation_edits)
        elif name == "backend":
            value = plans.check_backend(value)
        super().__setattr__(name, value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parameters = self._parameters
        return self._run(x, (parameters["weight"],), (parameters["bias"],), (self.activation,))

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation={self.activation!r}, "
            f"backend={self.backend!r}"
        )


def _per_layer(name: str, value, count: int) -> list:
    """A per-layer list from one value or a sequence of ``count`` values."""
    if isinstance(value, (str, bool, nn.Module)):
        return [value] * count
    values = list(value)
    if len(values) != count:
        raise ValueError(f"{name} must be one value or {count} values, got {len(values)}")
    return values


def _network_spec(sizes, activation, output_activation, bias) -> tuple[list, list, list]:
    """``(sizes, activation names, bias flags)``, one name and flag per layer, after
    checking ``MLP``'s arguments (``MLPEnsemble`` takes the same)."""
    sizes = [_positive_int(f"sizes[{i}]", s) for i, s in enumerate(sizes)]
    if len(sizes) < 2:
        raise ValueError(f"sizes must list at least [in, out], got {sizes}")
    layers = len(sizes) - 1
    if isinstance(activation, (str, nn.Module)):  # checked even with no hidden layer
        activation = _activations.get(activation).name
    hidden = _per_layer("activation", activation, layers - 1)
    names = [_activations.get(a).name for a in [*hidden, output_activation]]
    return sizes, names, _per_layer("bias", bias, layers)


def _hooked(children) -> bool:
    """Whether calling the children would run hooks (``nn.Module.__call__``'s own test)."""
    if (
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
    ):
        return True
    for child in children:  # _has_hooks inline: FusedTrainer asks at every step
        if (
            child._forward_hooks
            or child._forward_pre_hooks
            or child._backward_hooks
            or child._backward_pre_hooks
        ):
            return True
    return False


def _has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has hooks of its own."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


class MLP(_Planned, nn.Sequential):
    """A dense network whose forward and backward each run as one fastbp kernel call.

    Args:
        sizes: layer widths ``[in, hidden…, out]``, at least two; or, as for
            ``nn.Sequential``, an ``OrderedDict`` of the children themselves.
        activation: activation after each hidden layer, one or one per hidden layer: a
            name, a spec with parameters or a torch module instance (see ``Linear``).
        output_activation: activation after the last layer, the same way.
        bias: whether layers have a bias, one flag or one per layer.
        backend: "auto", "numba", "triton" or "torch" (see ``fastbp.functional``).

    ``MLP([1000, 100, 10])`` has the children, parameter names and initial
    weights (for the same seed) of ``nn.Sequential(nn.Linear(1000, 100),
    nn.ReLU(), nn.Linear(100, 10))``. Inputs are ``(*, in_features)``.

    Editing it is editing an ``nn.Sequential``: while its children are ``Linear``
    layers (fastbp's or ``torch.nn``'s), each followed by at most one activation module
    fastbp knows (``nn.ReLU``, ``nn.GELU``, ``nn.LeakyReLU(0.2)``, …: the table in
    ``fastbp.kernels.activation_table``), with no hooks on them, forward
    runs them as one fused node; otherwise it runs the children one by one, as
    ``nn.Sequential`` does.
    """

    def __init__(
        self,
        sizes: Sequence[int] | OrderedDict,
        activation: str | nn.Module | Sequence[str | nn.Module] = "relu",
        output_activation: str | nn.Module = "identity",
        bias: bool | Sequence[bool] = True,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        nn.Module.__init__(self)
        self.backend = plans.check_backend(backend)
        if isinstance(sizes, OrderedDict):  # nn.Sequential's form: slicing makes one
            for name, child in sizes.items():
                self.add_module(name, child)
            return
        sizes, names, biases = _network_spec(sizes, activation, output_activation, bias)
        for layer, name in enumerate(names):
            linear = Linear(
                sizes[layer],
                sizes[layer + 1],
                biases[layer],
                backend=backend,
                device=device,
                dtype=dtype,
            )
            self.add_module(str(len(self._modules)), linear)
            module = _activations.get(name).module()
            if module is not None:
                self.add_module(str(len(self._modules)), module)

    def __setattr__(self, name: str, value) -> None:
        if name == "backend":
            value = plans.check_backend(value)
            self.__dict__.pop("_plan", None)  # made for the old backend
        super().__setattr__(name, value)

    @property
    def linears(self) -> list[nn.Module]:
        """The ``Linear`` layers, input to output."""
        return [m for m in self._modules.values() if isinstance(m, (Linear, nn.Linear))]

    @property
    def activations(self) -> tuple[str, ...]:
        """The activation after each ``Linear``, as names (``ValueError`` if the children
        are not a network fastbp runs fused)."""
        return _layout(self._modules.values())[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bound = self.__dict__.get("_bound")
        if bound is not None:  # the common call: what the last one checked still holds
            output = bound(self, x)
            if output is not None:
                return output
        fused = self.fused()
        if fused is None:  # runs its children, hooks and all, as nn.Sequential does
            return nn.Sequential.forward(self, x)
        output = self._run(x, *fused)
        plan = self.__dict__.get("_plan")  # from an eager call: tracing makes none
        bindable = plan is not None and plan.kernels is not None and plan.reusable
        if bindable and not traced.tracing():
            self.__dict__["_bound"] = BoundModel(self, plan)
        return output

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``nn.Module.zero_grad``, over the parameters the last forward bound while
        nothing that holds them has changed (torch's walks every module each call)."""
        bound = self.__dict__.get("_bound")
        replica = self.__dict__.get("_is_replica", False)
        if bound is None or replica or not bound.holds_parameters(self):
            return super().zero_grad(set_to_none)  # torch's, with its warning for a replica
        for parameter in bound.plan.params:
            if parameter.grad is None:
                continue
            if set_to_none:
                parameter.grad = None
            else:
                if parameter.grad.grad_fn is not None:
                    parameter.grad.detach_()
                else:
                    parameter.grad.requires_grad_(False)
                parameter.grad.zero_()
        return None

    def fused(self) -> tuple[tuple, tuple, tuple[str, ...]] | None:
        """``(weights, biases, activation names)`` of the network as fastbp runs it, in
        one node; None while it runs its children one by one instead: a child fastbp
        does not fuse, or a hook on one (``nn.Module``'s own or a global one)."""
        children = tuple(self._modules.values())
        if _hooked(children):
            return None
        layout = self._fused_layout(children)
        if layout is None:
            return None
        linears, names = layout
        weights = tuple(linear._parameters["weight"] for linear in linears)
        return weights, tuple(linear._parameters["bias"] for linear in linears), names

    def _fused_layout(self, children):
        """``_layout(children)``, or None where they do not fuse; kept until a child is
        replaced, a Linear's activation is set or an activation child's parameter is
        changed (``model[1].negative_slope = 0.3``)."""
        key = (children, _last_edit[0], tuple(map(_activations.settings, children)))
        cached = self.__dict__.get("_layout_cache")
        if cached is not None and cached[0] == key:
            return cached[1]
        try:
            layout = _layout(children)
        except ValueError:
            layout = None
        self.__dict__["_layout_cache"] = (key, layout)
        return layout

    def __getitem__(self, index):
        if isinstance(index, slice):  # nn.Sequential's slice, as an MLP sharing the children
            return MLP(OrderedDict(list(self._modules.items())[index]), backend=self.backend)
        return super().__getitem__(index)

    @classmethod
    def from_torch(cls, sequential: nn.Sequential, *, backend: str = "auto") -> MLP:
        """An ``MLP`` with a copy of the weights of ``nn.Sequential(Linear, act, …)``.

        Each ``nn.Linear`` may be followed by one activation module fastbp knows, with
        its parameters (``nn.LeakyReLU(0.2)``, ``nn.GELU(approximate="tanh")``, …);
        anything else raises a ``ValueError`` that names it and lists what is supported.
        """
        if not isinstance(sequential, nn.Sequential):
            raise TypeError(f"sequential must be an nn.Sequential, got {type(sequential).__name__}")
        linears, names = _layout(sequential, "sequential")
        sizes = [linears[0].in_features] + [linear.out_features for linear in linears]
        weight = linears[0].weight
        mlp = cls(
            sizes,
            names[:-1],
            names[-1],
            [linear.bias is not None for linear in linears],
            backend=backend,
            device=weight.device,
            dtype=weight.dtype,
        )
        _copy_parameters(linears, mlp.linears)
        return mlp

    def to_torch(self) -> nn.Sequential:
        """The equivalent ``nn.Sequential`` (``nn.Linear`` and activations), weights copied."""
        linears, names = _layout(self._modules.values())
        modules = []
        for layer, name in zip(linears, names, strict=True):
            weight = layer.weight
            modules.append(
                nn.Linear(
                    layer.in_features,
                    layer.out_features,
                    layer.bias is not None,
                    device=weight.device,
                    dtype=weight.dtype,
                )
            )
            module = _activations.get(name).module()
            if module is not None:
                modules.append(module)
        sequential = nn.Sequential(*modules)
        _copy_parameters(linears, [m for m in sequential if isinstance(m, nn.Linear)])
        return sequential


class BoundModel:
    """What an ``MLP``'s forward checked on its full path (``fused``, ``_run``): its
    children, their hooks and settings, its parameters and their memory, with the plan
    they made. ``bound(module, x)`` re-checks all of it in one frame and runs the plan's
    kernels, or returns None where anything changed (the full path then runs and binds
    anew) or ``x`` is not the common case (a 2-D tensor of the plan's dtype and device).
    ``unchanged(module)`` is the check alone (``FusedTrainer`` binds its step so too).
    """

    def __init__(self, module: MLP, plan: plans.Plan) -> None:
        self.plan, self.backend = plan, module.backend
        self.children = tuple(module._modules.values())
        self.edit = _last_edit[0]
        # only activation modules with parameters (LeakyReLU's slope, …) have settings
        self.settings = tuple(
            (child, settings)
            for child in self.children
            if (settings := _activations.settings(child))
        )
        # Each child's dicts of hooks, children and parameters, held: torch registers,
        # replaces and deletes in them and never rebinds them after __init__.
        self.must_be_empty = tuple(_chain(map(_HOOKS_AND_CHILDREN, self.children)))
        self.parameter_dicts = tuple(child._parameters for child in self.children)
        # by identity: == on tensors compares elements. Held, so no new object takes an id.
        self.parameters = tuple(_chain(map(dict.values, self.parameter_dicts)))
        self.parameter_ids = list(map(id, self.parameters))
        # the memory the plan's views read, as the plan checked it just now
        self.pointers = list(map(torch.Tensor.data_ptr, plan.params))
        self.strides = list(map(torch.Tensor.stride, plan.params))

    def holds_parameters(self, module: MLP) -> bool:
        """Whether the module's parameters are still exactly ``plan.params``."""
        return (
            not module._parameters
            and tuple(module._modules.values()) == self.children
            and list(map(id, _chain(map(dict.values, self.parameter_dicts)))) == self.parameter_ids
            and not any(self.must_be_empty)
        )

    def __call__(self, module: MLP, x: torch.Tensor) -> torch.Tensor | None:
        plan = self.plan
        if torch.compiler.is_compiling() or traced.functorch_active():
            return None  # before anything reads memory: tracing sees none
        if not (
            x.__class__ is torch.Tensor
            and x.dtype == plan.dtype
            and x.device == plan.device
            and x.dim() == 2
            and x.shape[1] == plan.in_features
            and self.unchanged(module)
        ):
            return None
        if torch.is_grad_enabled():
            if x.requires_grad:
                return plans.kernel_node(x, plan, *plan.params)
            for parameter in plan.params:
                if parameter.requires_grad:
                    return plans.kernel_node(x, plan, *plan.params)
        if plan.backend == "triton" and torch.is_autocast_enabled(x.device.type):
            return None  # the full path casts
        return plan.kernels.infer(plan, x)

    def unchanged(self, module: MLP) -> bool:
        """Whether everything bound still holds (see the class), in one frame and in
        C-level iterations (``map``, ``itertools.chain``): a frame or a Python loop is
        much of a small network's call."""
        children, params = self.children, self.plan.params
        return (
            module.backend == self.backend
            and _last_edit[0] == self.edit
            and not (
                _module._global_forward_hooks
                or _module._global_forward_pre_hooks
                or _module._global_backward_hooks
                or _module._global_backward_pre_hooks
                or module._parameters
            )
            and tuple(module._modules.values()) == children
            and not any(self.must_be_empty)
            and list(map(id, _chain(map(dict.values, self.parameter_dicts)))) == self.parameter_ids
            and list(map(torch.Tensor.data_ptr, params)) == self.pointers
            and list(map(torch.Tensor.stride, params)) == self.strides
            and (not self.settings or self._settings_hold())
        )

    def _settings_hold(self) -> bool:
        """Whether every activation child with settings is still set as bound."""
        return all(_activations.settings(child) == held for child, held in self.settings)


_chain = itertools.chain.from_iterable
# What a fused child must hold empty: its hooks (nn.Module's own) and children.
_HOOKS_AND_CHILDREN = operator.attrgetter(
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_modules"
)


def _layout(children, name: str = "MLP") -> tuple[list[nn.Module], tuple[str, ...]]:
    """``(linears, activation names)`` of children ``Linear, act, Linear, act, …``;
    a ``ValueError`` naming the first child that does not fit."""
    linears, names = [], []
    for index, module in enumerate(children):
        if isinstance(module, (nn.Linear, Linear)):
            linears.append(module)
            names.append(getattr(module, "activation", "identity"))
            continue
        activation = _activations.from_module(module)
        if activation is None or not linears or names[-1] != "identity":
            raise ValueError(
                f"{name}[{index}] is {module!r}; fastbp.nn.MLP fuses Linear layers, each "
                f"followed by at most one of {_activations.supported_modules()}"
            )
        names[-1] = activation.name
    if not linears:
        raise ValueError(f"{name} must contain at least one nn.Linear")
    return linears, tuple(names)


@torch.no_grad()
def _copy_parameters(sources, targets) -> None:
    for source, target in zip(sources, targets, strict=True):
        target.weight.copy_(source.weight)
        if source.bias is not None:
            target.bias.copy_(source.bias)


# ---------------------------------------------------------------------------
# Ensembles
# ---------------------------------------------------------------------------
class StackedLinear(nn.Module):
    """One layer of an ``MLPEnsemble``: every member's ``nn.Linear`` parameters stacked,
    ``weight`` (members, out_features, in_features) and ``bias`` (members, out_features)
    or None. It holds them; the ensemble runs them (calling it on its own raises)."""

    def __init__(self, members, in_features, out_features, bias=True, *, device=None,
                 dtype=None) -> None:  # fmt: skip
        super().__init__()
        self.members, self.in_features, self.out_features = members, in_features, out_features
        options = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(members, out_features, in_features, **options))
        if bias:
            self.bias = nn.Parameter(torch.empty(members, out_features, **options))
        else:
            self.register_parameter("bias", None)

    @torch.no_grad()
    def reset_member(self, member: int) -> None:
        """Member ``member``'s parameters drawn as ``nn.Linear.reset_parameters`` draws them."""
        nn.init.kaiming_uniform_(self.weight[member], a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_features) if self.in_features > 0 else 0
            nn.init.uniform_(self.bias[member], -bound, bound)

    def forward(self, x):
        raise RuntimeError("a StackedLinear runs inside its MLPEnsemble: call the ensemble")

    def extra_repr(self) -> str:
        return (
            f"members={self.members}, in_features={self.in_features}, "
            f"out_features={self.out_features}, bias={self.bias is not None}"
        )


class MLPEnsemble(nn.Module):
    """K dense networks of one shape, trained side by side, every member in one call.

    Args:
        k: the number of members.
        sizes, activation, output_activation, bias: each member's network, as ``MLP``
            takes them.
        backend: "auto" (numba on CPU; torch's batched matmuls on CUDA, where Triton has
            no ensemble kernel yet), "numba" or "torch".

    Parameters are stacked, as ``torch.func.stack_module_state`` stacks K
    ``nn.Sequential``'s: ``layers[l].weight`` is ``(k, out, in)`` and ``layers[l].bias``
    ``(k, out)`` (state_dict keys ``layers.0.weight``, ``layers.0.bias``, …). Member m
    is drawn as the m-th of K ``nn.Sequential``'s made one after another would be, so
    for one seed ``MLPEnsemble(k, sizes)`` equals ``from_torch`` of those K networks.

    ``forward(x)`` takes ``(k, batch, in)``, one batch per member, or ``(batch, in)``,
    one batch for all, and returns ``(k, batch, out)``. Forward and backward each run
    every member in one kernel call; under torch.compile and torch.func transforms,
    torch's batched matmuls run instead. ``FusedTrainer`` trains it, the members'
    losses added.
    """

    def __init__(
        self,
        k: int,
        sizes: Sequence[int],
        activation: str | nn.Module | Sequence[str | nn.Module] = "relu",
        output_activation: str | nn.Module = "identity",
        bias: bool | Sequence[bool] = True,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        self.backend = backend
        members = _positive_int("k", k)
        sizes, names, biases = _network_spec(sizes, activation, output_activation, bias)
        self._names = tuple(names)
        self.layers = nn.ModuleList(
            StackedLinear(members, i, o, b, device=device, dtype=dtype)
            for i, o, b in zip(sizes[:-1], sizes[1:], biases, strict=True)
        )
        self.reset_parameters()

    def __setattr__(self, name: str, value) -> None:
        if name == "backend":
            value = plans.check_backend(value)
            self.__dict__.pop("_plan", None)  # made for the old backend
        super().__setattr__(name, value)

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_plan", None)  # views of these parameters' memory: a copy makes its own
        return state

    @property
    def members(self) -> int:
        return self.layers[0].members

    @property
    def activations(self) -> tuple[str, ...]:
        """The activation after each layer, as names."""
        return self._names

    def reset_parameters(self) -> None:
        """Every member drawn anew, member by member, as K ``nn.Sequential``'s would be."""
        for member in range(self.members):
            for layer in self.layers:
                layer.reset_member(member)

    def stacked(self) -> tuple[tuple, tuple]:
        """``(weights, biases)``: each layer's stacked parameters, None for no bias."""
        layers = self.layers._modules.values()
        return (
            tuple(layer._parameters["weight"] for layer in layers),
            tuple(layer._parameters["bias"] for layer in layers),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if any(map(_has_hooks, self.layers._modules.values())):
            raise RuntimeError(
                "MLPEnsemble runs its layers fused, so hooks on them would not fire: "
                "register them on the MLPEnsemble itself"
            )
        weights, biases = self.stacked()
        if traced.tracing():  # no memory to plan on: torch's batched matmuls
            names = plans.check_ensemble(x, weights, biases, self._names)
            return plans.torch_ensemble_forward(x, weights, biases, names)[-1]
        plan = self.__dict__.get("_plan")
        if plan is None or not plan.current(weights, biases):
            plan = plans.ensemble_plan(x, weights, biases, self._names, self.backend)
            self.__dict__["_plan"] = plan
        return plan(x)

    @classmethod
    def from_torch(cls, sequentials: Sequence[nn.Sequential], *, backend: str = "auto"):
        """An ensemble holding copies of the weights of K ``nn.Sequential(Linear, act, …)``
        of one shape (as ``MLP.from_torch`` takes one), member m from ``sequentials[m]``."""
        if isinstance(sequentials, nn.Module) or not len(sequentials):
            raise TypeError(
                f"sequentials must be a non-empty list of nn.Sequential, got {sequentials!r}"
            )
        layouts = []
        for index, sequential in enumerate(sequentials):
            if not isinstance(sequential, nn.Sequential):
                raise TypeError(
                    f"sequentials[{index}] must be an nn.Sequential, "
                    f"got {type(sequential).__name__}"
                )
            linears, names = _layout(sequential, f"sequentials[{index}]")
            shape = [(m.in_features, m.out_features, m.bias is not None) for m in linears]
            layouts.append((linears, names, shape, linears[0].weight))
            first = layouts[0]
            if (names, shape) != first[1:3]:
                raise ValueError(
                    f"sequentials[{index}] is not the shape of sequentials[0]: layers "
                    f"(in, out, bias) {shape} with activations {names}, against "
                    f"{first[2]} with {first[1]}"
                )
        linears, names, shape, weight = layouts[0]
        ensemble = cls(
            len(sequentials),
            [shape[0][0]] + [out for _, out, _ in shape],
            names[:-1],
            names[-1],
            [has for _, _, has in shape],
            backend=backend,
            device=weight.device,
            dtype=weight.dtype,
        )
        with torch.no_grad():
            for member, (linears, *_) in enumerate(layouts):
                for layer, linear in zip(ensemble.layers, linears, strict=True):
                    layer.weight[member].copy_(linear.weight)
                    if linear.bias is not None:
                        layer.bias[member].copy_(linear.bias)
        return ensemble

    def to_torch(self) -> list[nn.Sequential]:
        """The K equivalent ``nn.Sequential``'s, member m's weights copied into the m-th."""
        members = []
        for member in range(self.members):
            modules = []
            for layer, name in zip(self.layers, self._names, strict=True):
                weight = layer.weight
                linear = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None,
                                   device=weight.device, dtype=weight.dtype)  # fmt: skip
                with torch.no_grad():
                    linear.weight.copy_(weight[member])
                    if layer.bias is not None:
                        linear.bias.copy_(layer.bias[member])
                modules.append(linear)
                module = _activations.get(name).module()
                if module is not None:
                    modules.append(module)
            members.append(nn.Sequential(*modules))
        return members

    def extra_repr(self) -> str:
        return f"members={self.members}, activations={self._names}, backend={self.backend!r}"
