"""A network checked once, and run eagerly: the one place the kernels meet autograd.

A ``Plan`` holds a network's parameters checked for one backend, with what its
kernels prepared (numba: a ``cpu.Network`` of numpy views; Triton: the checks done,
``gpu.Prepared``). Build one with ``plan(x, weights, biases, activations, backend)``,
after every check, and run it with ``plan(x)``: one ``autograd.Function`` node for the
whole network, or the kernels alone when nothing needs a gradient. ``fastbp.nn.MLP``
keeps its plan between calls and asks ``Plan.current`` (a few attribute reads) whether
its parameters are still the tensors it checked.

Here too: the input checks, whose messages name the argument, what it got and what
it needs; the backends and their kernel sets (``Kernels``); and how the three wirings
(this Function, ``fastbp.traced``'s custom ops and functorch Functions) pass
parameters: weights, then the biases that exist (``split_biases``).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import operator
from collections.abc import Sequence
from typing import Protocol

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


def numpy_view(x: torch.Tensor):
    """``x``'s memory as a numpy array (a CPU tensor; detached if it requires grad)."""
    return (x.detach() if x.requires_grad else x).numpy()


class Kernels(Protocol):
    """What a backend's kernel set does for a ``Plan``; ``saved`` is whatever its forward
    keeps for backward (numba: numpy arrays; Triton: tensors)."""

    @staticmethod
    def prepare(plan: Plan) -> object:
        """What the kernels keep per plan (``plan.prepared``)."""

    @staticmethod
    def forward(plan: Plan, x: torch.Tensor) -> tuple[torch.Tensor, object]:
        """``(the last layer's output, saved)``."""

    @staticmethod
    def infer(plan: Plan, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output alone."""

    @staticmethod
    def saved(x: torch.Tensor, outputs: Sequence[torch.Tensor]) -> object:
        """``saved`` from the forward's input and every layer's output tensors."""

    @staticmethod
    def outputs(saved) -> list[torch.Tensor]:
        """Every layer's output (then the kept z's), from ``saved``."""

    @staticmethod
    def backward(plan: Plan, saved, grad_output: torch.Tensor, needs_input_grad: bool) -> tuple:
        """``(∂L/∂x or None, [∂L/∂Wₗ], [∂L/∂bₗ or None])``."""


class NumbaKernels:
    """The CPU kernels: the plan holds a ``cpu.Network`` of numpy views of its parameters."""

    @staticmethod
    def prepare(plan: Plan) -> cpu.Network:
        threads.ensure_policy()  # binds the GEMM before the first kernel of the process
        arrays = [_array(w) for w in plan.weights], [_array(b) for b in plan.biases]
        # GEMMs whole where results must not follow the thread count
        return cpu.Network(*arrays, plan.activations, split_gemms=not threads.reproducible())

    @staticmethod
    def forward(plan: Plan, x: torch.Tensor):
        """``(the last layer's output, what backward needs)``: every layer's output, kept
        as arrays, since no one but backward sees the hidden ones."""
        x, network = (x.detach() if x.requires_grad else x).numpy(), plan.prepared
        outputs = threads.call(network.forward, x, parallel=x.shape[-2] >= network.parallel_rows)
        return torch.from_numpy(outputs[len(plan.weights) - 1]), (x, outputs)

    @staticmethod
    def infer(plan: Plan, x: torch.Tensor) -> torch.Tensor:
        """The last layer's output alone (forward's lines, not a call of it: a small
        network's call costs what its Python does), with no z kept for a backward that
        will not come (keep=False)."""
        x, network = (x.detach() if x.requires_grad else x).numpy(), plan.prepared
        outputs = threads.call(
            network.forward, x, False, parallel=x.shape[-2] >= network.parallel_rows
        )
        return torch.from_numpy(outputs[len(plan.weights) - 1])

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
            network.backward,
            grad_output.numpy(),
            x,
            outputs,
            needs_input_grad,
            parallel=x.shape[-2] >= network.parallel_rows,
        )
        from_numpy = torch.from_numpy
        for layer, (w, b) in enumerate(zip(grad_weights, grad_biases, strict=True)):
            grad_weights[layer] = from_numpy(w)
            if b is not None:
                grad_biases[layer] = from_numpy(b)
        return None if grad_x is None else from_numpy(grad_x), grad_weights, grad_biases


def tf32() -> bool:
    """Whether float32 matmuls may use TF32, as torch's own CUDA matmuls decide."""
    return torch.backends.cuda.matmul.allow_tf32


class TritonKernels:
    """The GPU kernels, launched on the plan's tensors, checked once per plan."""

    @staticmethod
    def prepare(plan: Plan):
        stand_in = plan.weights[0].new_empty(0, plan.in_features)  # x as the plan takes it
        return _gpu().prepare(stand_in, plan.weights, plan.biases, plan.activations)

    @staticmethod
    def forward(plan: Plan, x: torch.Tensor):
        outputs = _gpu().prepared_forward(
            x, plan.weights, plan.biases, plan.activations, plan.prepared, tf32=tf32()
        )
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
        return _gpu().prepared_backward(
            grad_output,
            x,
            plan.weights,
            plan.biases,
            plan.activations,
            outputs,
            needs_input_grad,
            plan.prepared,
            tf32=tf32(),
        )


class EnsembleKernels(NumbaKernels):
    """The CPU kernels of an ensemble: the plan holds a ``cpu.Ensemble`` of numpy views
    of its stacked parameters; forward and backward are NumbaKernels', on (K, N, ·)."""

    @staticmethod
    def prepare(plan: Plan) -> cpu.Ensemble:
        threads.ensure_policy()
        arrays = [_array(w) for w in plan.weights], [_array(b) for b in plan.biases]
        # whole members where results must not follow the thread count
        return cpu.Ensemble(*arrays, plan.activations, split_rows=not threads.reproducible())


KERNELS: dict[str, type[Kernels]] = {"numba": NumbaKernels, "triton": TritonKernels}
ENSEMBLE_KERNELS: dict[str, type[Kernels]] = {"numba": EnsembleKernels}


# ---------------------------------------------------------------------------
# Parameters as the three wirings pass them: weights, then the present biases
# ---------------------------------------------------------------------------
def split_biases(biases: Sequence[torch.Tensor | None]) -> tuple[list, tuple[bool, ...]]:
    """``(the biases that exist, which layers have one)``: how the custom ops and the
    functorch Functions take biases (a tensor list cannot hold None), and ``Plan.params``
    orders them (weights first)."""
    return [b for b in biases if b is not None], tuple(b is not None for b in biases)


def with_nones(present: Sequence[torch.Tensor], has_bias: Sequence[bool]) -> list:
    present = iter(present)
    return [next(present) if has else None for has in has_bias]


def unread_biases(weights, has_bias) -> list:
    """Bias placeholders for a plan that runs backward only, which reads no bias."""
    pairs = zip(weights, has_bias, strict=True)
    return [w.new_empty(w.shape[:-1]) if has else None for w, has in pairs]


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

    kernel_sets = KERNELS

    def __init__(self, weights, biases, activations, backend: str) -> None:
        self.weights, self.biases = tuple(weights), tuple(biases)
        self.activations = tuple(activations)
        self.backend = backend
        self.kernels: type[Kernels] | None = self.kernel_sets.get(backend)  # None: torch's ops
        self.params = (*self.weights, *split_biases(self.biases)[0])
        self._pointers = list(map(torch.Tensor.data_ptr, self.params))
        self._strides = list(map(torch.Tensor.stride, self.params))
        first = self.weights[0]
        self.dtype, self.device = first.dtype, first.device
        self.in_features, self.out_features = first.shape[-1], self.weights[-1].shape[-2]
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
            and self.same_memory(self.params)
        )

    def same_memory(self, params) -> bool:
        """Whether ``params`` (the first of ``self.params``, in that order) still have the
        memory and strides this plan was built on."""
        count = len(params)
        return (
            list(map(torch.Tensor.data_ptr, params)) == self._pointers[:count]
            and list(map(torch.Tensor.stride, params)) == self._strides[:count]
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
# Ensembles: K networks of one shape, parameters stacked (K, out, in) and (K, out)
# ---------------------------------------------------------------------------
def check_ensemble(x, weights, biases, activations) -> list[str]:
    """Check ``x`` (``(K, batch, in)`` or ``(batch, in)``) against an ensemble's stacked
    layers; their activation names."""
    check_one_per_layer(weights, biases, activations)
    members = check_tensor("weights[0]", weights[0], 3).shape[0]
    x = check_tensor("x", x, None)
    if x.dim() not in (2, 3) or (x.dim() == 3 and x.shape[0] != members):
        raise ValueError(
            f"x must have shape ({members}, batch, in_features), one batch per member, or "
            f"(batch, in_features), one batch for all {members}, got {describe(x)}"
        )
    width = x.shape[-1]
    for layer, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
        weight = check_tensor(f"weights[{layer}]", weight, 3)
        if weight.shape[0] != members or weight.shape[2] != width:
            raise ValueError(
                f"weights[{layer}] must have shape ({members}, out_features, {width}), "
                f"got {describe(weight)}"
            )
        if bias is not None and (
            check_tensor(f"biases[{layer}]", bias, 2).shape != (members, weight.shape[1])
        ):
            raise ValueError(
                f"biases[{layer}] must have shape ({members}, {weight.shape[1]}), "
                f"got {describe(bias)}"
            )
        _check_layer(x, width, weight[0], None if bias is None else bias[0], f"[{layer}]")
        width = weight.shape[1]
    return [_activations.get(a, "activations").name for a in activations]


def resolve_ensemble_backend(backend: str, x: torch.Tensor) -> str:
    """The backend that runs an ensemble on ``x``: numba's kernels on CPU, torch's
    batched matmuls elsewhere ("auto" on CUDA: Triton has no ensemble kernel yet)."""
    if check_backend(backend) == "triton":
        raise ValueError(
            "backend 'triton' has no ensemble kernel yet: use 'auto' (torch's batched "
            "matmuls on CUDA) or 'torch'"
        )
    resolved = resolve_backend(backend, x)
    return "torch" if resolved == "triton" else resolved


def torch_ensemble_forward(x, weights, biases, activations) -> list[torch.Tensor]:
    """Every layer's ``(K, N, out)`` output in torch ops, as a user writes an ensemble by
    hand: ``baddbmm`` on the stacked weights (x ``(N, in)`` is every member's)."""
    outputs = []
    if x.dim() == 2:
        x = x.expand(weights[0].shape[0], *x.shape)
    for weight, bias, name in zip(weights, biases, activations, strict=True):
        transposed = weight.transpose(1, 2)
        z = (
            torch.bmm(x, transposed)
            if bias is None
            else torch.baddbmm(bias[:, None], x, transposed)
        )
        x = _activations.get(name).function(z)
        outputs.append(x)
    return outputs


class EnsemblePlan(Plan):
    """A ``Plan`` of an ensemble: stacked parameters, inputs ``(K, N, in)`` or
    ``(N, in)``, outputs ``(K, N, out)``; numba's kernels, or torch's ops."""

    kernel_sets = ENSEMBLE_KERNELS

    def fits(self, x) -> bool:
        return (
            isinstance(x, torch.Tensor)
            and x.dtype == self.dtype
            and x.device == self.device
            and x.shape[-1] == self.in_features
            and (x.dim() == 2 or (x.dim() == 3 and x.shape[0] == self.weights[0].shape[0]))
        )

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not self.fits(x):
            check_ensemble(x, self.weights, self.biases, self.activations)
            resolve_ensemble_backend(self.backend, x)
        if self.kernels is None:
            return torch_ensemble_forward(x, self.weights, self.biases, self.activations)[-1]
        return _run_kernels(self, x)


def ensemble_plan(x, weights, biases, activations, backend: str = "auto") -> EnsemblePlan:
    """An ``EnsemblePlan`` for the stacked layers and inputs like ``x``, after every check."""
    weights, biases = list(weights), list(biases)
    names = check_ensemble(x, weights, biases, list(activations))
    return EnsemblePlan(weights, biases, names, resolve_ensemble_backend(backend, x))


# ---------------------------------------------------------------------------
# Autograd: the eager Function (torch.compile, torch.export and torch.func: traced.py)
# ---------------------------------------------------------------------------
def refuse_double_backward(always: bool = False) -> None:
    if always or torch.is_grad_enabled():
        # create_graph=True: a backward that is not itself differentiable would
        # silently drop the second-order terms, so refuse instead.
        raise RuntimeError(
            "fastbp's hand-derived backward is not differentiable: double backward "
            "(create_graph=True) and higher-order gradients need backend='torch'"
        )


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
        if torch.is_grad_enabled():
            refuse_double_backward(always=True)
        ctx.saved_tensors  # noqa: B018 - raises if a saved tensor was changed in place
        plan = ctx.plan
        grad_x, grads, grad_biases = plan.kernels.backward(
            plan, ctx.saved, grad_output, ctx.needs_input_grad[0]
        )
        for grad in grad_biases:  # the params' order (weights, then present biases), inline
            if grad is not None:
                grads.append(grad)
        return grad_x, None, *grads


# _KernelMLP.apply without Function.apply's Python wrapper, whose functorch bookkeeping
# took 6 µs of a 16 µs call: torch.func transforms never get here (see tracing()).
# ``kernel_node(x, plan, *plan.params)``: the network's output, one autograd node.
kernel_node = super(torch.autograd.Function, _KernelMLP).apply


def _run_kernels(plan: Plan, x: torch.Tensor) -> torch.Tensor:
    """The autograd.Function, or the kernels alone when nothing needs a gradient."""
    if plan.backend == "triton" and torch.is_autocast_enabled(x.device.type):
        plan, x = _autocast(plan, x)
    if not _needs_graph(x, plan.params):  # inference: no autograd node to build
        return plan.kernels.infer(plan, x)
    return kernel_node(x, plan, *plan.params)


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
