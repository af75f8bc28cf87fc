"""fastbp's network as tracing sees it: torch.library custom ops for torch.compile and
torch.export, and Functions in functorch's form for torch.func.

``fastbp.functional`` takes this path when ``tracing()``: those see tensors without
memory (fakes, or functorch's wrappers), so they get no ``Plan`` of their own. The
custom ops ``fastbp::mlp_forward`` and ``fastbp::mlp_backward`` are registered when
this module is imported, which ``import fastbp`` does, so that a saved
``torch.export`` program finds them.
"""

from __future__ import annotations

import operator
import weakref
from collections.abc import Sequence

import torch

from . import activations as _activations
from .plans import (
    Plan,
    check_network,
    ensemble_plan,
    plan,
    refuse_double_backward,
    resolve_backend,
    split_biases,
    torch_forward,
    unread_biases,
    with_nones,
)

# The same kernels as torch.library custom ops: opaque to torch.compile and
# torch.export (which trace them through their fake implementations instead of
# breaking the graph on numpy or Triton launches), at a few µs more dispatch per
# call than plans.py's autograd.Function. The device picks the kernels: numba on
# CPU (also for backend="triton" in the interpreter), Triton on CUDA.
# joins the activation specs in the ops' str argument (a spec may hold commas)
SPEC_SEPARATOR = ";"


# The ops' recent plans: a compiled model calls them with its own parameters every
# time, and building a plan costs as much as a small network's forward. Bounded, and
# holding the parameters weakly: a plan runs on detached aliases of them (the same
# memory), so that a deleted model's weights are freed, on the GPU too.
class _OpPlan:
    """A cached plan and weak references to the parameters it was built for (the
    weights, then the biases that exist); the entry leaves ``_OP_PLANS`` when one of
    them is freed."""

    def __init__(self, key: tuple, plan: Plan, params) -> None:
        forget = lambda _: _OP_PLANS.pop(key, None) if _OP_PLANS.get(key) is self else None  # noqa: E731
        self.plan = plan
        self.refs = tuple(weakref.ref(p, forget) for p in params)

    def holds(self, params) -> bool:
        """Whether the plan runs ``params`` as they are now: the same tensors, memory and
        strides. ``params`` are the weights, then the biases that exist (backward: the
        weights alone, as it reads no bias)."""
        refs = self.refs
        return (
            self.plan.reusable
            and len(params) <= len(refs)
            and all(map(operator.is_, map(_DEREFERENCE, refs), params))
            and self.plan.same_memory(params)
        )


_DEREFERENCE = weakref.ref.__call__  # the referent, called from map without a frame
_OP_PLANS: dict[tuple, _OpPlan] = {}
OP_PLANS_KEPT = 8


def _op_plan(x, weights, has_bias, activations: str, biases=None) -> Plan:
    """A plan for tensors the op machinery has already checked against the fakes.

    ``biases`` are those of the layers whose ``has_bias`` is true; backward passes
    none, as it reads no bias, and takes the forward's plan when it still holds.
    """
    key = (x.device.type, activations, *map(id, weights), *has_bias)
    params = weights if biases is None else [*weights, *biases]
    entry = _OP_PLANS.get(key)
    if entry is not None and entry.holds(params):
        return entry.plan
    biases = unread_biases(weights, has_bias) if biases is None else with_nones(biases, has_bias)
    alias = lambda t: None if t is None else t.detach()  # noqa: E731
    backend = "numba" if x.device.type == "cpu" else "triton"
    plan = Plan([alias(w) for w in weights], [alias(b) for b in biases],
                activations.split(SPEC_SEPARATOR), backend)  # fmt: skip
    if plan.reusable:
        _OP_PLANS.pop(key, None)
        while len(_OP_PLANS) >= OP_PLANS_KEPT:
            _OP_PLANS.pop(next(iter(_OP_PLANS)))
        _OP_PLANS[key] = _OpPlan(key, plan, params)
    return plan


def _mlp_forward_impl(x, weights, biases, has_bias, activations):
    """``fastbp::mlp_forward``: every layer's output ``[a₁, …, a_L]``, then the z of each
    layer whose activation's derivative reads it; gradients flow from ``a_L`` only
    (``_OpMLP``). ``biases`` holds the biases of the layers whose ``has_bias`` is true
    (a tensor list cannot hold None), and ``activations`` holds the specs joined by
    ``SPEC_SEPARATOR``, "relu;identity" (a schema has no list of str)."""
    op_plan = _op_plan(x, weights, has_bias, activations, biases)
    kernels = op_plan.kernels
    return kernels.outputs(kernels.forward(op_plan, x)[1])


def _mlp_forward_fake(x, weights, biases, has_bias, activations):
    reads = [_activations.get(a).reads_input for a in activations.split(SPEC_SEPARATOR)]
    kept = [w for w, r in zip(weights, reads, strict=True) if r]
    return [x.new_empty(x.shape[0], w.shape[0]) for w in [*weights, *kept]]


def _mlp_backward_impl(grad_output, x, weights, has_bias, activations, outputs, needs_input_grad):
    """``fastbp::mlp_backward``: ``(∂L/∂x, [∂L/∂Wₗ], [∂L/∂bₗ of the layers with a bias])``;
    ``∂L/∂x`` is empty unless ``needs_input_grad``."""
    op_plan = _op_plan(x, weights, has_bias, activations)
    kernels = op_plan.kernels
    grad_x, grad_weights, grad_biases = kernels.backward(
        op_plan, kernels.saved(x, outputs), grad_output, needs_input_grad
    )
    if grad_x is None:
        grad_x = x.new_empty(0)
    return grad_x, grad_weights, [g for g in grad_biases if g is not None]


def _mlp_backward_fake(grad_output, x, weights, has_bias, activations, outputs, needs_input_grad):
    grad_x = torch.empty_like(x) if needs_input_grad else x.new_empty(0)
    grad_biases = [w.new_empty(w.shape[0]) for w, has in zip(weights, has_bias, strict=True) if has]
    return grad_x, [torch.empty_like(w) for w in weights], grad_biases


def _only_the_output_differentiable(ctx, saved, layers: int) -> None:
    """Gradients flow from the last layer's output alone: not from the hidden outputs
    or the kept z's that a forward also returns."""
    top = layers - 1
    ctx.mark_non_differentiable(*saved[:top], *saved[top + 1 :])


# Defined through torch.library.Library rather than @custom_op, with autograd falling
# through: the same schema and fakes at a fraction of the per-call cost. An autograd
# kernel (register_autograd) runs Python on every call, no_grad included, and
# flattens the tensor lists through pytree on the way: on the 2-2-2 network an eager
# forward+backward through the ops took 258 µs with one, against 99 for plans.py's
# Function, and 132 with ``_OpMLP``, which gives the gradient from around the forward
# op instead and which torch.compile traces into the same two ops (``python -m
# benchmarks.dispatch_overhead``, in benchmarks/results/2026-12-06-cpu-custom-ops-and-bias-fill).
_LIBRARY = torch.library.Library("fastbp", "DEF")
_LIBRARY.define(
    "mlp_forward(Tensor x, Tensor[] weights, Tensor[] biases, bool[] has_bias, str activations)"
    " -> Tensor[]"
)
_LIBRARY.define(
    "mlp_backward(Tensor grad_output, Tensor x, Tensor[] weights, bool[] has_bias,"
    " str activations, Tensor[] outputs, bool needs_input_grad) -> (Tensor, Tensor[], Tensor[])"
)
for _key in ("CPU", "CUDA"):
    _LIBRARY.impl("mlp_forward", _mlp_forward_impl, _key)
    _LIBRARY.impl("mlp_backward", _mlp_backward_impl, _key)
for _name in ("mlp_forward", "mlp_backward"):  # not differentiable themselves: see _OpMLP
    _LIBRARY.impl(_name, torch.library.fallthrough_kernel, "Autograd")
torch.library.register_fake("fastbp::mlp_forward", _mlp_forward_fake, lib=_LIBRARY)
torch.library.register_fake("fastbp::mlp_backward", _mlp_backward_fake, lib=_LIBRARY)


class _OpMLP(torch.autograd.Function):
    """Every layer's output ``(a₁, …, a_L)`` of ``apply(has_bias, activations, x,
    *weights, *biases)`` through ``fastbp::mlp_forward``; backward through
    ``fastbp::mlp_backward``. ``has_bias`` is a tuple of bools, ``activations`` the
    ops' joined specs, ``biases`` those of the layers that have one."""

    # One star argument after ctx: under no_grad, torch.compile (2.14) calls
    # forward without ctx when the arguments outnumber forward's named parameters by
    # one, which a signature naming has_bias, activations and x meets for a network of
    # two layers without biases.
    @staticmethod
    def forward(ctx, *inputs):
        has_bias, activations, x, *parameters = inputs
        layers = len(has_bias)
        weights, biases = parameters[:layers], parameters[layers:]
        outputs = torch.ops.fastbp.mlp_forward(x, weights, biases, list(has_bias), activations)
        ctx.has_bias, ctx.activations = has_bias, activations
        _only_the_output_differentiable(ctx, outputs, layers)
        ctx.save_for_backward(x, *weights, *outputs)
        return tuple(outputs)

    @staticmethod
    def backward(ctx, *grad_outputs):
        refuse_double_backward()
        layers = len(ctx.has_bias)
        x, *saved = ctx.saved_tensors
        needs_input_grad = ctx.needs_input_grad[2]
        grad_x, grad_weights, grad_biases = torch.ops.fastbp.mlp_backward(
            grad_outputs[layers - 1],
            x,
            saved[:layers],
            list(ctx.has_bias),
            ctx.activations,
            saved[layers:],
            needs_input_grad,
        )
        return None, None, grad_x if needs_input_grad else None, *grad_weights, *grad_biases


def custom_op_mlp(x, weights, biases, activations: Sequence[str]) -> torch.Tensor:
    """The last layer's output through ``fastbp::mlp_forward`` (what torch.compile and
    torch.export trace); ``biases`` may hold None."""
    present, has_bias = split_biases(biases)
    joined = SPEC_SEPARATOR.join(activations)
    return _OpMLP.apply(has_bias, joined, x, *weights, *present)[len(weights) - 1]


# ``functorch_active()``: whether a torch.func transform runs this call. torch's own
# function, called directly (no Python frame: MLP's bound call counts them); private,
# hence the getattr: without it, torch's own (less clear) error stands.
functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)


# ---------------------------------------------------------------------------
# torch.func: the same kernels as Functions in the functorch-compatible form
# ---------------------------------------------------------------------------
# torch.func.grad and vjp need forward and setup_context apart; vmap needs a rule, as
# the kernels take plain tensors. Both Functions take ``(spec, *tensors)`` with
# ``spec = (backend, activations, has_bias, needs_input_grad)`` and the tensors flat.
def _plan_of(x, weights, biases, activations, backend: str) -> Plan:
    """The plan of a network, or of an ensemble where the weights are stacked (K, out, in):
    what the Functions run, and what their vmap rules make of a batch of networks."""
    make = ensemble_plan if weights[0].dim() == 3 else plan
    return make(x, weights, biases, activations, backend)


def _stacked(info, in_dims, spec, tensors, weight: int) -> list | None:
    """``tensors`` of a vmapped batch of networks stacked as one ensemble's: each on
    dim 0, one shared by every member expanded. None where numba's ensemble kernels
    cannot run them: another backend, or networks stacked already (vmap within vmap).
    ``tensors[weight]`` is the first layer's weight, 2-D for one network."""
    if spec[0] != "numba" or tensors[weight].dim() - (in_dims[weight] is not None) != 2:
        return None
    members = info.batch_size
    pairs = zip(tensors, in_dims, strict=True)
    return [t.expand(members, *t.shape) if d is None else t.movedim(d, 0) for t, d in pairs]


def _split(spec, tensors):
    """``weights, biases (None where a layer has none)`` from the flat parameters."""
    has_bias = spec[2]
    weights, present = tensors[: len(has_bias)], tensors[len(has_bias) :]
    return list(weights), with_nones(present, has_bias)


def _each_of_the_batch(function, info, in_dims, spec, tensors) -> tuple:
    """``function.apply`` on every member of a vmapped batch, stacked: the vmap rule
    wherever the batch does not fold into the kernels' rows."""
    results = []
    for member in range(info.batch_size):
        pairs = zip(tensors, in_dims, strict=True)
        selected = [t if d is None else t.select(d, member) for t, d in pairs]
        results.append(function.apply(spec, *selected))
    stacked = tuple(torch.stack(column) for column in zip(*results, strict=True))
    return stacked, (0,) * len(stacked)


class _FuncMLP(torch.autograd.Function):
    """Every layer's output ``(a₁, …, a_L)`` of ``apply(spec, x, *weights, *biases)``."""

    @staticmethod
    def forward(spec, x, *parameters):
        weights, biases = _split(spec, parameters)
        checked = _plan_of(x, weights, biases, spec[1], spec[0])
        kernels = checked.kernels
        return tuple(kernels.outputs(kernels.forward(checked, x.contiguous())[1]))

    @staticmethod
    def setup_context(ctx, inputs, output):
        spec, x, *parameters = inputs
        ctx.spec = spec
        _only_the_output_differentiable(ctx, output, len(spec[2]))
        ctx.save_for_backward(x, *_split(spec, parameters)[0], *output)

    @staticmethod
    def backward(ctx, *grad_outputs):
        backend, activations, has_bias, _ = ctx.spec
        spec = (backend, activations, has_bias, ctx.needs_input_grad[1])
        grads = _FuncMLPBackward.apply(spec, grad_outputs[len(has_bias) - 1], *ctx.saved_tensors)
        grad_x, grad_weights = grads[0], grads[1 : 1 + len(has_bias)]
        return None, grad_x if spec[3] else None, *grad_weights, *grads[1 + len(has_bias) :]

    @staticmethod
    def jvp(ctx, *tangents):
        raise RuntimeError(
            "fastbp's kernels have a hand-derived backward only: forward-mode AD "
            "(torch.func.jvp, jacfwd, hessian) needs backend='torch'"
        )

    @staticmethod
    def vmap(info, in_dims, spec, x, *parameters):
        if any(d is not None for d in in_dims[2:]):  # a batch of networks: an ensemble
            stacked = _stacked(info, in_dims[2:], spec, parameters, 0)
            if stacked is None:  # one by one
                return _each_of_the_batch(_FuncMLP, info, in_dims[1:], spec, (x, *parameters))
            x = x if in_dims[1] is None else x.movedim(in_dims[1], 0)  # shared, or per member
            outputs = _FuncMLP.apply(spec, x, *stacked)
            return outputs, (0,) * len(outputs)
        rows = x.movedim(in_dims[1], 0)  # a batch of inputs is more rows for the kernels
        outputs = _FuncMLP.apply(spec, rows.reshape(-1, rows.shape[-1]), *parameters)
        outputs = tuple(a.reshape(*rows.shape[:-1], a.shape[-1]) for a in outputs)
        return outputs, (0,) * len(outputs)


class _FuncMLPBackward(torch.autograd.Function):
    """``(∂L/∂x, *∂L/∂Wₗ, *∂L/∂bₗ of the layers with a bias)`` of
    ``apply(spec, grad_output, x, *weights, *outputs)``; ∂L/∂x is zeros unless
    ``spec``'s needs_input_grad (a Function returns tensors, not None, under vmap)."""

    @staticmethod
    def forward(spec, grad_output, x, *saved):
        backend, activations, has_bias, needs_input_grad = spec
        weights, outputs = list(saved[: len(has_bias)]), list(saved[len(has_bias) :])
        biases = unread_biases(weights, has_bias)
        checked = _plan_of(x, weights, biases, activations, backend)
        kernels = checked.kernels
        grad_x, grad_weights, grad_biases = kernels.backward(
            checked,
            kernels.saved(x.contiguous(), [a.contiguous() for a in outputs]),
            grad_output.contiguous(),
            needs_input_grad,
        )
        grad_x = torch.zeros_like(x) if grad_x is None else grad_x
        return grad_x, *grad_weights, *(g for g in grad_biases if g is not None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grad_outputs):
        refuse_double_backward(always=True)

    @staticmethod
    def vmap(info, in_dims, spec, *tensors):
        stacked = None
        if any(d is not None for d in in_dims[3 : 3 + len(spec[2])]):  # a batch of networks
            stacked = _stacked(info, in_dims[1:], spec, tensors, 2)
        if stacked is None:  # jacrev's batch of cotangents, or no ensemble kernel: one by one
            return _each_of_the_batch(_FuncMLPBackward, info, in_dims[1:], spec, tensors)
        # x too is stacked, one per member: vmap takes ∂L/∂x per member, and sums it
        # itself where x was shared
        grads = _FuncMLPBackward.apply(spec, *stacked)
        return grads, (0,) * len(grads)


def _func_mlp(x, weights, biases, activations, backend: str) -> torch.Tensor:
    """The last layer's output through ``_FuncMLP``, for torch.func transforms."""
    present, has_bias = split_biases(biases)
    spec = (backend, tuple(activations), has_bias, True)
    return _FuncMLP.apply(spec, x, *weights, *present)[len(weights) - 1]


def tracing() -> bool:
    """Whether torch.compile or torch.export traces this call, or a torch.func transform
    runs it: they see tensors without memory, so no ``Plan``: see ``traced_mlp``."""
    return torch.compiler.is_compiling() or functorch_active()


def traced_mlp(x, weights, biases, activations, backend: str) -> torch.Tensor:
    """The network as tracing sees it: torch's ops; under torch.func, ``_FuncMLP``;
    else fastbp's custom op, which torch.compile and torch.export trace through its
    fake implementation."""
    names = check_network(x, weights, biases, list(activations))
    backend = resolve_backend(backend, x)
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if backend == "torch":
        output = torch_forward(rows, weights, biases, names)[-1]
    elif functorch_active():
        output = _func_mlp(rows, weights, biases, names, backend)
    else:
        output = custom_op_mlp(rows, weights, biases, names)
    return output if x.dim() == 2 else output.reshape(*x.shape[:-1], output.shape[-1])
