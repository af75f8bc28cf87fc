"""fastbp's layers as PyTorch autograd functions: the one place the kernels meet autograd.

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

A ``Plan`` is a network checked once: ``mlp`` makes one per call, while
``fastbp.nn.MLP`` keeps its plan between calls and asks ``Plan.current`` (a few
attribute reads) whether its parameters are still the tensors it checked. Inputs
are ``(*, in_features)``, as for ``nn.Linear``.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import operator
import weakref
from collections.abc import Sequence

import torch

from . import activations as _activations
from . import threads
from .kernels import cpu
from .kernels.activation_table import split_saved
from .kernels.utils import check_choice, check_one_per_layer

BACKENDS = ("auto", "numba", "triton", "torch")
CPU_DTYPES = (torch.float32, torch.float64)
# float64 runs on CUDA too with backend="triton" (gradcheck), but cuBLAS is the faster choice
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


# ---------------------------------------------------------------------------
# Input checks: every message names the argument, what it got and what it needs.
# ---------------------------------------------------------------------------
def describe(tensor: torch.Tensor) -> str:
    """``shape (…), dtype …, device …``: how every error message shows a tensor."""
    return f"shape {tuple(tensor.shape)}, dtype {tensor.dtype}, device {tensor.device}"


_SHAPES = {1: "(out_features,)", 2: "(out_features, in_features)"}


def check_tensor(name: str, value, ndim: int | None) -> torch.Tensor:
    """``value`` if it is a floating-point tensor of ``ndim`` dimensions (None: at least one)."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is None and value.dim() == 0:
        raise ValueError(f"{name} must have shape (*, in_features), got {describe(value)}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor {_SHAPES[ndim]}, got {describe(value)}")
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {describe(value)}")
    return value


def _check_layer(x: torch.Tensor, in_features: int, weight, bias, index: str = "") -> int:
    """Check one layer's parameters against x (dtype, device) and its input width.

    ``index`` is "" for ``linear_act``'s ``weight``/``bias`` and "[l]" for ``mlp``'s
    ``weights[l]``/``biases[l]``.
    """
    weight_name, bias_name = (f"weights{index}", f"biases{index}") if index else ("weight", "bias")
    weight = check_tensor(weight_name, weight, 2)
    if weight.shape[1] != in_features:
        raise ValueError(
            f"{weight_name} must have shape (out_features, {in_features}) to match its "
            f"{in_features} input features, got {describe(weight)}"
        )
    if bias is not None:
        bias = check_tensor(bias_name, bias, 1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(
                f"{bias_name} must have shape ({weight.shape[0]},) to match {weight_name}, "
                f"got {describe(bias)}"
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


def check_network(x, weights, biases, activations, indexed: bool = True) -> list[str]:
    """Check ``x`` (``(*, in_features)``) against a chain of layers; their activation names.

    ``indexed`` names the parameters as ``mlp`` takes them (``weights[l]``), else as
    ``linear_act`` does (``weight``).
    """
    x = check_tensor("x", x, None)
    check_one_per_layer(weights, biases, activations)
    width = x.shape[-1]
    for layer, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        width = _check_layer(x, width, weight, bias, f"[{layer}]" if indexed else "")
    argument = "activations" if indexed else "activation"
    return [_activations.get(a, argument).name for a in activations]


def check_backend(backend: str) -> str:
    """``backend`` if it is a known name; a ``ValueError`` listing the valid ones otherwise."""
    check_choice("backend", backend, BACKENDS)
    return backend


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """The backend that runs ``x``: "auto" falls back to torch where fastbp's kernels cannot."""
    if check_backend(backend) == "auto":
        if x.device.type == "cpu":
            return "numba" if x.dtype in CPU_DTYPES else "torch"
        if x.device.type == "cuda" and x.dtype in CUDA_DTYPES and _triton_installed():
            return "triton"
        return "torch"
    if backend == "numba":
        if x.device.type != "cpu":
            raise ValueError(
                f"backend 'numba' runs on CPU tensors only, got x on {x.device}; "
                "use backend='triton' or 'torch' for CUDA tensors"
            )
        if x.dtype not in CPU_DTYPES:
            raise TypeError(f"backend 'numba' needs float32 or float64 tensors, got x of {x.dtype}")
    if backend == "triton":
        interpreting = _gpu().INTERPRETING  # _gpu(): a clear error when Triton is missing
        if x.device.type != "cuda" and not (x.device.type == "cpu" and interpreting):
            raise ValueError(
                f"backend 'triton' runs on CUDA tensors, got x on {x.device} (CPU tensors "
                "run only in Triton's interpreter: TRITON_INTERPRET=1, set before triton "
                "is imported)"
            )
        if x.dtype not in (*CUDA_DTYPES, torch.float64):
            raise TypeError(
                "backend 'triton' needs float32, float16, bfloat16 or float64 tensors, "
                f"got x of {x.dtype}"
            )
    return backend


@functools.cache
def _triton_installed() -> bool:
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _gpu():
    """``fastbp.kernels.gpu``, imported on first use: Triton is an optional extra."""
    if not _triton_installed():
        raise RuntimeError(
            "backend 'triton' needs Triton, which is not installed: "
            "pip install 'fastbp[gpu]' (Linux with an NVIDIA GPU)"
        )
    return importlib.import_module("fastbp.kernels.gpu")


# ---------------------------------------------------------------------------
# The kernel sets, each on a Plan: numba's on numpy views, Triton's on tensors
# ---------------------------------------------------------------------------
def torch_forward(x, weights, biases, activations, keep=False) -> list[torch.Tensor]:
    """Every layer's output in native torch ops (the "torch" backend, under autograd
    or not; ``FusedTrainer``'s torch step uses it too); with ``keep``, followed by the
    z of each layer whose activation's derivative reads it, as the kernels save them
    (see ``saved_layers``)."""
    outputs, kept = [], []
    for weight, bias, name in zip(weights, biases, activations, strict=True):
        activation = _activations.get(name)
        z = torch.nn.functional.linear(x, weight, bias)
        x = activation.function(z)
        outputs.append(x)
        if keep and activation.reads_input:
            kept.append(z)
    return outputs + kept


def saved_layers(saved: Sequence, activations: Sequence[str]) -> list[tuple]:
    """``[(aₗ, zₗ or None)]`` per layer from what a forward saved: every layer's output
    ``a``, then the z of each layer whose activation's derivative reads it."""
    return split_saved(saved, [_activations.get(a).reads_input for a in activations])


def _array(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.detach().numpy()


def _tensor(array):
    return None if array is None else torch.from_numpy(array)


def numpy_view(x: torch.Tensor):
    """``x``'s memory as a numpy array (a CPU tensor; detached if it requires grad)."""
    return (x.detach() if x.requires_grad else x).numpy()


class NumbaKernels:
    """The CPU kernels: the plan holds a ``cpu.Network`` of numpy views of its parameters."""

    @staticmethod
    def prepare(plan: Plan) -> cpu.Network:
        threads.ensure_policy()  # binds the GEMM before the first kernel of the process
        arrays = [_array(w) for w in plan.weights], [_array(b) for b in plan.biases]
        return cpu.Network(*arrays, plan.activations)

    @staticmethod
    def forward(plan: Plan, x: torch.Tensor):
        """``(the last layer's output, what backward needs)``: every layer's output, kept
        as arrays, since no one but backward sees the hidden ones."""
        x, network = numpy_view(x), plan.prepared
        outputs = threads.call(network.forward, x, parallel=network.parallel(x.shape[0]))
        return torch.from_numpy(outputs[len(plan.weights) - 1]), (x, outputs)

    @staticmethod
    def infer(plan: Plan, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output alone."""
        return NumbaKernels.forward(plan, x)[0]

    @staticmethod
    def saved(x: torch.Tensor, outputs) -> tuple:
        """What backward needs, from the forward's input and output tensors."""
        return x.numpy(), [a.numpy() for a in outputs]

    @staticmethod
    def outputs(saved) -> list[torch.Tensor]:
        """Every layer's output, from what forward saved."""
        return [torch.from_numpy(a) for a in saved[1]]

    @staticmethod
    def backward(plan: Plan, saved, grad_output: torch.Tensor, needs_input_grad: bool):
        """``(∂L/∂x or None, [∂L/∂Wₗ], [∂L/∂bₗ or None])``."""
        x, outputs = saved
        network = plan.prepared
        grad_x, grad_weights, grad_biases = threads.call(
            network.backward, grad_output.numpy(), x, outputs, needs_input_grad,
            parallel=network.parallel(x.shape[0]),
        )  # fmt: skip
        return _tensor(grad_x), [*map(_tensor, grad_weights)], [*map(_tensor, grad_biases)]


def _tf32() -> bool:
    """Whether float32 matmuls may use TF32, as torch's own CUDA matmuls decide."""
    return torch.backends.cuda.matmul.allow_tf32


class TritonKernels:
    """The GPU kernels, launched on the plan's tensors."""

    @staticmethod
    def prepare(plan: Plan) -> None:
        return None

    @staticmethod
    def forward(plan: Plan, x: torch.Tensor):
        outputs = _gpu().mlp_forward(x, plan.weights, plan.biases, plan.activations, tf32=_tf32())
        # Backward gets a detached alias of the output: the output itself in ctx would
        # make a cycle (node → ctx → output → node) that kept every step's autograd
        # graph and activations alive until Python's gc ran, and, in a CUDA graph
        # capture, the warm-up's AccumulateGrad nodes with them.
        top = len(plan.weights) - 1
        saved = [*outputs[:top], outputs[top].detach(), *outputs[top + 1 :]]
        return outputs[top], (x, saved)

    @staticmethod
    def infer(plan: Plan, x: torch.Tensor) -> torch.Tensor:
        return TritonKernels.forward(plan, x)[0]

    @staticmethod
    def saved(x: torch.Tensor, outputs) -> tuple:
        return x, outputs

    @staticmethod
    def outputs(saved) -> list[torch.Tensor]:
        return saved[1]

    @staticmethod
    def backward(plan: Plan, saved, grad_output: torch.Tensor, needs_input_grad: bool):
        x, outputs = saved
        return _gpu().mlp_backward(
            grad_output, x, plan.weights, plan.biases, plan.activations, outputs,
            needs_input_grad, tf32=_tf32(),
        )  # fmt: skip


KERNELS = {"numba": NumbaKernels, "triton": TritonKernels}


# ---------------------------------------------------------------------------
# Plans: a network checked once, then run
# ---------------------------------------------------------------------------
class Plan:
    """A network's parameters checked for one backend, with what its kernels prepared.

    Build one with ``plan(x, weights, biases, activations, backend)`` (every check) and
    run it with ``plan(x)``, which checks only ``x``. ``current(weights, biases)`` says
    whether the given parameters are still the tensors checked, with the same memory,
    shape and strides: then the plan may run again.
    """

    def __init__(self, weights, biases, activations, backend: str) -> None:
        self.weights, self.biases = tuple(weights), tuple(biases)
        self.activations = tuple(activations)
        self.backend = backend
        self.kernels = KERNELS.get(backend)  # None: torch's own ops
        self.params = (*self.weights, *(b for b in self.biases if b is not None))
        self._pointers = list(map(torch.Tensor.data_ptr, self.params))
        self._strides = list(map(torch.Tensor.stride, self.params))
        first = self.weights[0]
        self.dtype, self.device = first.dtype, first.device
        self.in_features, self.out_features = first.shape[1], self.weights[-1].shape[0]
        self.prepared = None if self.kernels is None else self.kernels.prepare(self)
        # A plan whose kernels hold copies of the parameters (non-contiguous ones)
        # would not see their updates: it runs once.
        self.reusable = getattr(self.prepared, "holds_originals", True)

    def current(self, weights, biases) -> bool:
        """Whether ``weights`` and ``biases`` are still the tensors this plan checked."""
        return (
            self.reusable
            and len(weights) == len(self.weights)
            and all(map(operator.is_, weights, self.weights))
            and all(map(operator.is_, biases, self.biases))
            # .data assignment (model.to(), .cuda(), user code) keeps the Parameter
            # object but not its memory: the numpy views would read stale values.
            and list(map(torch.Tensor.data_ptr, self.params)) == self._pointers
            and list(map(torch.Tensor.stride, self.params)) == self._strides
        )

    def fits(self, x) -> bool:
        """Whether ``x`` can run as is: a tensor of the plan's dtype and device whose last
        dimension is the network's input width (otherwise ``check_network`` says why not)."""
        return (
            isinstance(x, torch.Tensor)
            and x.dtype == self.dtype
            and x.device == self.device
            and x.dim() > 0
            and x.shape[-1] == self.in_features
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The network's output for ``x`` of shape ``(*, in_features)``."""
        if not self.fits(x):
            check_network(x, self.weights, self.biases, self.activations)
            resolve_backend(self.backend, x)
        rows = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if self.kernels is None:
            output = torch_forward(rows, self.weights, self.biases, self.activations)[-1]
        else:
            output = _run_kernels(self, rows)
        if x.dim() == 2:
            return output
        return output.reshape(*x.shape[:-1], self.out_features)


def plan(x, weights, biases, activations, backend: str = "auto") -> Plan:
    """A ``Plan`` for the network (``weights``, ``biases``, ``activations``) and inputs
    like ``x``, after every check; ``activations`` are names."""
    weights, biases = list(weights), list(biases)
    names = check_network(x, weights, biases, list(activations))
    return Plan(weights, biases, names, resolve_backend(backend, x))


# ---------------------------------------------------------------------------
# Autograd: one eager Function, and custom ops for torch.compile and torch.export
# ---------------------------------------------------------------------------
def _refuse_double_backward(always: bool = False) -> None:
    if always or torch.is_grad_enabled():
        # create_graph=True: a backward that is not itself differentiable would
        # silently drop the second-order terms, so refuse instead.
        raise RuntimeError(
            "fastbp's hand-derived backward is not differentiable: double backward "
            "(create_graph=True) and higher-order gradients need backend='torch'"
        )


def _in_params_order(grad_weights, grad_biases) -> list:
    """The gradients in the order of ``Plan.params``: weights, then present biases."""
    return [*grad_weights, *(g for g in grad_biases if g is not None)]


class _KernelMLP(torch.autograd.Function):
    """The whole network as one eager autograd node: the lowest per-call overhead.

    ``apply(x, plan, *plan.params)``. Forward saves each layer's output and the
    weights (so that autograd reports an in-place change before backward), and keeps
    what the kernels need in ``ctx``.
    """

    @staticmethod
    def forward(ctx, x, plan, *params):
        # Old-style forward (ctx first, one output): 4x cheaper per call than
        # setup_context with every layer's output returned.
        output, saved = plan.kernels.forward(plan, x)
        ctx.plan, ctx.saved = plan, saved
        # Saved for autograd's in-place checks; the hidden outputs, which no one else
        # sees, stay in ctx.saved.
        ctx.save_for_backward(x, *plan.weights, output)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        _refuse_double_backward()
        ctx.saved_tensors  # noqa: B018 - raises if a saved tensor was changed in place
        plan = ctx.plan
        grad_x, grad_weights, grad_biases = plan.kernels.backward(
            plan, ctx.saved, grad_output, ctx.needs_input_grad[0]
        )
        return grad_x, None, *_in_params_order(grad_weights, grad_biases)


# _KernelMLP.apply without Function.apply's Python wrapper, whose functorch bookkeeping
# took 6 µs of a 16 µs call: torch.func transforms never get here (see tracing()).
_apply = super(torch.autograd.Function, _KernelMLP).apply


# The same kernels as torch.library custom ops: opaque to torch.compile and
# torch.export (which trace them through their fake implementations instead of
# breaking the graph on numpy or Triton launches), at a few µs more dispatch per
# call than the autograd.Function above. The device picks the kernels: numba on
# CPU (also for backend="triton" in the interpreter), Triton on CUDA.
# joins the activation specs in the ops' str argument (a spec may hold commas)
SPEC_SEPARATOR = ";"


# The ops' recent plans: a compiled model calls them with its own parameters every
# time, and building a plan costs as much as a small network's forward. Bounded, and
# holding the parameters weakly: a plan runs on detached aliases of them (the same
# memory), so that a deleted model's weights are freed, on the GPU too.
class _OpPlan:
    """A cached plan and weak references to the parameters it was built for; the entry
    leaves ``_OP_PLANS`` when one of them is freed."""

    def __init__(self, key: tuple, plan: Plan, weights, biases) -> None:
        forget = lambda _: _OP_PLANS.pop(key, None) if _OP_PLANS.get(key) is self else None  # noqa: E731
        self.plan = plan
        self.weights = tuple(weakref.ref(w, forget) for w in weights)
        self.biases = tuple(None if b is None else weakref.ref(b, forget) for b in biases)

    def holds(self, weights, biases) -> bool:
        """Whether the plan runs ``weights`` and ``biases`` (None: backward, which reads
        no bias) as they are now: the same tensors, memory and strides."""
        plan = self.plan
        if not plan.reusable or len(weights) != len(self.weights):
            return False
        if any(ref() is not w for ref, w in zip(self.weights, weights, strict=True)):
            return False
        params = list(weights)
        if biases is not None:
            for ref, bias in zip(self.biases, biases, strict=True):
                if (ref is None) != (bias is None) or (ref is not None and ref() is not bias):
                    return False
            params += [b for b in biases if b is not None]
        count = len(params)
        return (
            list(map(torch.Tensor.data_ptr, params)) == plan._pointers[:count]
            and list(map(torch.Tensor.stride, params)) == plan._strides[:count]
        )


_OP_PLANS: dict[tuple, _OpPlan] = {}
OP_PLANS_KEPT = 8


def _op_plan(x, weights, has_bias, activations: str, biases=None) -> Plan:
    """A plan for tensors the op machinery has already checked against the fakes.

    ``biases`` are the layers' own (None where ``has_bias`` is false); backward passes
    none, as it reads no bias, and takes the forward's plan when it still holds.
    """
    backend = "numba" if x.device.type == "cpu" else "triton"
    key = (backend, activations, *map(id, weights), *has_bias)
    entry = _OP_PLANS.get(key)
    if entry is not None and entry.holds(weights, biases):
        return entry.plan
    known = [None] * len(weights) if biases is None else biases  # placeholders: not kept
    if biases is None:
        biases = _unread_biases(weights, has_bias)
    alias = lambda t: None if t is None else t.detach()  # noqa: E731
    aliases = [alias(w) for w in weights], [alias(b) for b in biases]
    plan = Plan(*aliases, activations.split(SPEC_SEPARATOR), backend)
    if plan.reusable:
        _OP_PLANS.pop(key, None)
        while len(_OP_PLANS) >= OP_PLANS_KEPT:
            _OP_PLANS.pop(next(iter(_OP_PLANS)))
        _OP_PLANS[key] = _OpPlan(key, plan, weights, known)
    return plan


def _unread_biases(weights, has_bias) -> list:
    """Bias placeholders for a plan that runs backward only, which reads no bias."""
    pairs = zip(weights, has_bias, strict=True)
    return [w.new_empty(w.shape[0]) if has else None for w, has in pairs]


def _mlp_forward_impl(x, weights, biases, has_bias, activations):
    """``fastbp::mlp_forward``: every layer's output ``[a₁, …, a_L]``, then the z of each
    layer whose activation's derivative reads it; gradients flow from ``a_L`` only.
    ``biases`` holds the biases of the layers whose ``has_bias`` is true (op autograd
    drops gradients of a tensor list holding None), and ``activations`` holds the specs
    joined by ``SPEC_SEPARATOR``, "relu;identity" (a schema has no list of str)."""
    op_plan = _op_plan(x, weights, has_bias, activations, _with_nones(biases, has_bias))
    kernels = op_plan.kernels
    return kernels.outputs(kernels.forward(op_plan, x)[1])


def _with_nones(present: Sequence[torch.Tensor], has_bias: Sequence[bool]) -> list:
    present = iter(present)
    return [next(present) if has else None for has in has_bias]


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


def _setup_mlp_context(ctx, inputs, output):
    x, weights, _, has_bias, activations = inputs
    ctx.activations, ctx.has_bias = activations, has_bias
    _only_the_output_differentiable(ctx, output, len(weights))
    ctx.save_for_backward(x, *weights, *output)


def _mlp_forward_op_backward(ctx, grad_outputs):
    _refuse_double_backward()
    x, *saved = ctx.saved_tensors
    weights, outputs = saved[: len(ctx.has_bias)], saved[len(ctx.has_bias) :]
    grad_x, grad_weights, grad_biases = torch.ops.fastbp.mlp_backward(
        grad_outputs[len(weights) - 1], x, weights, ctx.has_bias, ctx.activations, outputs,
        ctx.needs_input_grad[0],
    )  # fmt: skip
    return grad_x if ctx.needs_input_grad[0] else None, grad_weights, grad_biases, None, None


# Defined through torch.library.Library rather than @custom_op: the same schema, fake
# and autograd, at a quarter of the per-call cost (8 µs against 30 for an empty op).
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
torch.library.register_fake("fastbp::mlp_forward", _mlp_forward_fake, lib=_LIBRARY)
torch.library.register_fake("fastbp::mlp_backward", _mlp_backward_fake, lib=_LIBRARY)
torch.library.register_autograd(
    "fastbp::mlp_forward", _mlp_forward_op_backward, setup_context=_setup_mlp_context,
    lib=_LIBRARY,
)  # fmt: skip


def custom_op_mlp(x, weights, biases, activations: Sequence[str]) -> torch.Tensor:
    """The last layer's output through ``fastbp::mlp_forward`` (what torch.compile and
    torch.export trace); ``biases`` may hold None."""
    has_bias = [b is not None for b in biases]
    present = [b for b in biases if b is not None]
    outputs = torch.ops.fastbp.mlp_forward(
        x, list(weights), present, has_bias, SPEC_SEPARATOR.join(activations)
    )
    return outputs[len(weights) - 1]


def _functorch_active() -> bool:
    # private, hence the getattr: without it, torch's own (less clear) error stands
    return getattr(torch._C, "_are_functorch_transforms_active", lambda: False)()


# ---------------------------------------------------------------------------
# torch.func: the same kernels as Functions in the functorch-compatible form
# ---------------------------------------------------------------------------
# torch.func.grad and vjp need forward and setup_context apart; vmap needs a rule, as
# the kernels take plain tensors. Both Functions take ``(spec, *tensors)`` with
# ``spec = (backend, activations, has_bias, needs_input_grad)`` and the tensors flat.
def _split(spec, tensors):
    """``weights, biases (None where a layer has none)`` from the flat parameters."""
    has_bias = spec[2]
    weights, present = tensors[: len(has_bias)], tensors[len(has_bias) :]
    return list(weights), _with_nones(present, has_bias)


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
        checked = plan(x, weights, biases, spec[1], spec[0])
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
        if any(d is not None for d in in_dims[2:]):  # a batch of networks: one by one
            return _each_of_the_batch(_FuncMLP, info, in_dims[1:], spec, (x, *parameters))
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
        checked = plan(x, weights, _unread_biases(weights, has_bias), activations, backend)
        kernels = checked.kernels
        grad_x, grad_weights, grad_biases = kernels.backward(
            checked, kernels.saved(x.contiguous(), [a.contiguous() for a in outputs]),
            grad_output.contiguous(), needs_input_grad,
        )  # fmt: skip
        grad_x = torch.zeros_like(x) if grad_x is None else grad_x
        return grad_x, *grad_weights, *(g for g in grad_biases if g is not None)

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, *grad_outputs):
        _refuse_double_backward(always=True)

    @staticmethod
    def vmap(info, in_dims, spec, *tensors):  # jacrev: a batch of cotangents, one by one
        return _each_of_the_batch(_FuncMLPBackward, info, in_dims[1:], spec, tensors)


def _func_mlp(x, weights, biases, activations, backend: str) -> torch.Tensor:
    """The last layer's output through ``_FuncMLP``, for torch.func transforms."""
    has_bias = tuple(b is not None for b in biases)
    spec = (backend, tuple(activations), has_bias, True)
    present = [b for b in biases if b is not None]
    return _FuncMLP.apply(spec, x, *weights, *present)[len(weights) - 1]


def _run_kernels(plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """The autograd.Function, or the kernels alone when nothing needs a gradient."""
    if plan.backend == "triton" and torch.is_autocast_enabled(x.device.type):
        plan, x = _autocast(plan, x)
    if not _needs_graph(x, plan.params):  # inference: no autograd node to build
        return plan.kernels.infer(plan, x)
    return _apply(x, plan, *plan.params)


def tracing() -> bool:
    """Whether torch.compile or torch.export traces this call, or a torch.func transform
    runs it: they see tensors without memory, so no ``Plan``: see ``_traced``."""
    return torch.compiler.is_compiling() or _functorch_active()


def _traced(x, weights, biases, activations, backend: str) -> torch.Tensor:
    """The network as tracing sees it: torch's ops; under torch.func, ``_FuncMLP``;
    else fastbp's custom op, which torch.compile and torch.export trace through its
    fake implementation."""
    names = check_network(x, weights, biases, list(activations))
    backend = resolve_backend(backend, x)
    rows = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    if backend == "torch":
        output = torch_forward(rows, weights, biases, names)[-1]
    elif _functorch_active():
        output = _func_mlp(rows, weights, biases, names, backend)
    else:
        output = custom_op_mlp(rows, weights, biases, names)
    return output if x.dim() == 2 else output.reshape(*x.shape[:-1], output.shape[-1])


def _needs_graph(x: torch.Tensor, params) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(p.requires_grad for p in params)


def _autocast(plan: Plan, x: torch.Tensor) -> tuple[Plan, torch.Tensor]:
    """Under ``torch.autocast``, the inputs cast to its dtype, as ``F.linear`` casts them:
    autocast casts the inputs of its listed ops only, not of a custom Function."""
    dtype = torch.get_autocast_dtype(x.device.type)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    weights, biases = [cast(w) for w in plan.weights], [cast(b) for b in plan.biases]
    return Plan(weights, biases, plan.activations, plan.backend), cast(x)


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
        return _traced(x, list(weights), list(biases), activations, backend)
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
        return _traced(x, [weight], [bias], names, backend)
    return Plan([weight], [bias], names, resolve_backend(backend, x))(x)
