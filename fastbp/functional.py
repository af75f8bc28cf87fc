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
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
from collections.abc import Sequence
from typing import NamedTuple

import torch

from . import activations as _activations
from . import threads
from .kernels import cpu

BACKENDS = ("auto", "numba", "triton", "torch")
CPU_DTYPES = (torch.float32, torch.float64)
# float64 runs on CUDA too with backend="triton" (gradcheck), but cuBLAS is the faster choice
CUDA_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


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
# The numba backend: the kernels on tensors, then wired two ways below
# ---------------------------------------------------------------------------
def _array(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.detach().numpy()


def _numba_forward(x, weights, biases, activations) -> list[torch.Tensor]:
    """Every layer's output ``[a₁, …, a_L]``, one kernel call."""
    threads.ensure_policy()
    outputs = cpu.mlp_forward(
        _array(x), [_array(w) for w in weights], [_array(b) for b in biases], list(activations)
    )
    return [torch.from_numpy(a) for a in outputs]


def _refuse_double_backward() -> None:
    if torch.is_grad_enabled():
        # create_graph=True: a backward that is not itself differentiable would
        # silently drop the second-order terms, so refuse instead.
        raise RuntimeError(
            "fastbp's hand-derived backward is not differentiable: double backward "
            "(create_graph=True) and higher-order gradients need backend='torch'"
        )


def _numba_backward(grad_output, x, weights, has_bias, activations, outputs, needs_input_grad):
    """``(∂L/∂x or None, [∂L/∂Wₗ], [∂L/∂bₗ or None])``, one kernel call."""
    threads.ensure_policy()
    grad_x, grad_weights, grad_biases = cpu.mlp_backward(
        _array(grad_output),
        _array(x),
        [_array(w) for w in weights],
        [True if has else None for has in has_bias],
        list(activations),
        [_array(a) for a in outputs],
        needs_input_grad=needs_input_grad,
    )
    as_tensor = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    return as_tensor(grad_x), [*map(as_tensor, grad_weights)], [*map(as_tensor, grad_biases)]


def _torch_forward(x, weights, biases, activations) -> list[torch.Tensor]:
    """Every layer's output in native torch ops (the "torch" backend, under autograd
    or not; ``FusedTrainer``'s torch step uses it too)."""
    outputs = []
    for weight, bias, name in zip(weights, biases, activations, strict=True):
        x = _activations.get(name).function(torch.nn.functional.linear(x, weight, bias))
        outputs.append(x)
    return outputs


def _tf32() -> bool:
    """Whether float32 matmuls may use TF32, as torch's own CUDA matmuls decide."""
    return torch.backends.cuda.matmul.allow_tf32


def _triton_forward(x, weights, biases, activations) -> list[torch.Tensor]:
    """Every layer's output ``[a₁, …, a_L]``: one launch for a narrow network."""
    return _gpu().mlp_forward(x, weights, biases, list(activations), tf32=_tf32())


def _triton_backward(grad_output, x, weights, has_bias, activations, outputs, needs_input_grad):
    """``(∂L/∂x or None, [∂L/∂Wₗ], [∂L/∂bₗ or None])``: one launch for a narrow network."""
    return _gpu().mlp_backward(
        grad_output, x, weights, [True if has else None for has in has_bias], list(activations),
        outputs, needs_input_grad, tf32=_tf32(),
    )  # fmt: skip


class _Kernels(NamedTuple):
    forward: object  # (x, weights, biases, activations) -> every layer's output
    backward: object  # (g, x, weights, has_bias, activations, outputs, needs_input_grad)


KERNELS = {
    "numba": _Kernels(_numba_forward, _numba_backward),
    "triton": _Kernels(_triton_forward, _triton_backward),
}


def _saved(ctx) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``(x, weights, every layer's output)``, as both wirings below save them."""
    num_layers = len(ctx.has_bias)
    x, *saved = ctx.saved_tensors
    return x, saved[:num_layers], saved[num_layers:]


class _KernelMLP(torch.autograd.Function):
    """The whole network as one eager autograd node: the lowest per-call overhead.

    Forward saves each layer's output, nothing else; ``kernels`` is a ``KERNELS`` entry.
    """

    @staticmethod
    def forward(ctx, x, kernels, activations, num_layers, *parameters):
        # Old-style forward (ctx first, one output): ~30 µs cheaper per call than
        # setup_context with every layer's output returned. torch.func transforms
        # would need setup_context, but cannot use this backward anyway (see below).
        weights, biases = parameters[:num_layers], parameters[num_layers:]
        outputs = kernels.forward(x, weights, biases, activations)
        ctx.kernels, ctx.activations = kernels, activations
        ctx.has_bias = [b is not None for b in biases]
        ctx.save_for_backward(x, *weights, *outputs)
        return outputs[-1]

    @staticmethod
    def backward(ctx, grad_output):
        _refuse_double_backward()
        x, weights, outputs = _saved(ctx)
        grad_x, grad_weights, grad_biases = ctx.kernels.backward(
            grad_output, x, weights, ctx.has_bias, ctx.activations, outputs,
            ctx.needs_input_grad[0],
        )  # fmt: skip
        return grad_x, None, None, None, *grad_weights, *grad_biases


# The same kernels as torch.library custom ops: opaque to torch.compile and
# torch.export (which trace them through their fake implementations instead of
# breaking the graph on numpy or Triton launches), at a few µs more dispatch per
# call than the autograd.Function above. The device picks the kernels: numba on
# CPU (also for backend="triton" in the interpreter), Triton on CUDA.
_OP_DEVICES = ("cpu", "cuda")


def _op_kernels(x: torch.Tensor) -> _Kernels:
    return KERNELS["numba" if x.device.type == "cpu" else "triton"]


@torch.library.custom_op("fastbp::mlp_forward", mutates_args=(), device_types=_OP_DEVICES)
def mlp_forward_op(
    x: torch.Tensor,
    weights: list[torch.Tensor],
    biases: list[torch.Tensor],
    has_bias: list[bool],
    activations: str,
) -> list[torch.Tensor]:
    """Every layer's output ``[a₁, …, a_L]``; gradients flow from ``a_L`` only.

    ``biases`` holds the biases of the layers whose ``has_bias`` is true (torch's
    op autograd drops gradients of a tensor list holding None), and
    ``activations`` is comma-separated, "relu,identity" (a schema has no list of str).
    """
    kernels = _op_kernels(x)
    return kernels.forward(x, weights, _with_nones(biases, has_bias), activations.split(","))


def _with_nones(present: Sequence[torch.Tensor], has_bias: Sequence[bool]) -> list:
    present = iter(present)
    return [next(present) if has else None for has in has_bias]


@mlp_forward_op.register_fake
def _(x, weights, biases, has_bias, activations):
    return [x.new_empty(x.shape[0], w.shape[0]) for w in weights]


@torch.library.custom_op("fastbp::mlp_backward", mutates_args=(), device_types=_OP_DEVICES)
def mlp_backward_op(
    grad_output: torch.Tensor,
    x: torch.Tensor,
    weights: list[torch.Tensor],
    has_bias: list[bool],
    activations: str,
    outputs: list[torch.Tensor],
    needs_input_grad: bool,
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """``(∂L/∂x, [∂L/∂Wₗ], [∂L/∂bₗ of the layers with a bias])``;
    ``∂L/∂x`` is empty unless ``needs_input_grad``."""
    grad_x, grad_weights, grad_biases = _op_kernels(x).backward(
        grad_output, x, weights, has_bias, activations.split(","), outputs, needs_input_grad
    )
    if grad_x is None:
        grad_x = x.new_empty(0)
    return grad_x, grad_weights, [g for g in grad_biases if g is not None]


@mlp_backward_op.register_fake
def _(grad_output, x, weights, has_bias, activations, outputs, needs_input_grad):
    grad_x = torch.empty_like(x) if needs_input_grad else x.new_empty(0)
    grad_biases = [w.new_empty(w.shape[0]) for w, has in zip(weights, has_bias, strict=True) if has]
    return grad_x, [torch.empty_like(w) for w in weights], grad_biases


def _setup_mlp_context(ctx, inputs, output):
    x, weights, _, has_bias, activations = inputs
    ctx.activations, ctx.has_bias = activations, has_bias
    ctx.mark_non_differentiable(*output[:-1])
    ctx.save_for_backward(x, *weights, *output)


def _mlp_forward_op_backward(ctx, grad_outputs):
    _refuse_double_backward()
    x, weights, outputs = _saved(ctx)
    grad_x, grad_weights, grad_biases = mlp_backward_op(
        grad_outputs[-1], x, weights, ctx.has_bias, ctx.activations, outputs,
        ctx.needs_input_grad[0],
    )  # fmt: skip
    return grad_x if ctx.needs_input_grad[0] else None, grad_weights, grad_biases, None, None


mlp_forward_op.register_autograd(_mlp_forward_op_backward, setup_context=_setup_mlp_context)


def _functorch_active() -> bool:
    # private, hence the getattr: without it, torch's own (less clear) error stands
    return getattr(torch._C, "_are_functorch_transforms_active", lambda: False)()


def _kernel_mlp(x, weights, biases, names: tuple[str, ...], backend: str) -> torch.Tensor:
    """The autograd.Function in eager mode (about 100 µs less per forward+backward,
    ``benchmarks/dispatch_overhead.py``); the custom op where torch.compile or
    torch.export traces, since they cannot trace into numpy or a Triton launcher."""
    if _functorch_active():
        raise RuntimeError(
            f"torch.func transforms (grad, vjp, jacrev, vmap) cannot run fastbp's {backend} "
            "kernels: use backend='torch' for them (torch.func.functional_call works)"
        )
    if backend == "triton":
        x, weights, biases = _autocast(x, weights, biases)
    if torch.compiler.is_compiling():
        return _custom_op_mlp(x, weights, biases, names)
    if not _needs_graph(x, weights, biases):  # inference: no autograd node to build
        return KERNELS[backend].forward(x, weights, biases, names)[-1]
    return _KernelMLP.apply(x, KERNELS[backend], names, len(weights), *weights, *biases)


def _needs_graph(x, weights, biases) -> bool:
    if not torch.is_grad_enabled():
        return False
    return x.requires_grad or any(t is not None and t.requires_grad for t in (*weights, *biases))


def _autocast(x, weights, biases):
    """Under ``torch.autocast``, the inputs cast to its dtype, as ``F.linear`` casts them:
    autocast casts the inputs of its listed ops only, not of a custom Function."""
    if not torch.is_autocast_enabled(x.device.type):
        return x, weights, biases
    dtype = torch.get_autocast_dtype(x.device.type)
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return cast(x), [cast(w) for w in weights], [cast(b) for b in biases]


def _custom_op_mlp(x, weights, biases, names: Sequence[str]) -> torch.Tensor:
    """The last layer's output through ``fastbp::mlp_forward``; ``biases`` may hold None."""
    has_bias = [b is not None for b in biases]
    present = [b for b in biases if b is not None]
    return mlp_forward_op(x, weights, present, has_bias, ",".join(names))[-1]


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
        backend: "auto", "numba", "triton" or "torch" (see the module docstring).

    Returns:
        The last layer's output, (batch, out_features of the last layer).
    """
    weights, biases, activations = list(weights), list(biases), list(activations)
    table = _check_network(x, weights, biases, activations)
    backend = _resolve_backend(backend, x)
    if backend == "torch":
        return _torch_forward(x, weights, biases, [a.name for a in table])[-1]
    return _kernel_mlp(x, weights, biases, tuple(a.name for a in table), backend)


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
    backend = _resolve_backend(backend, x)
    if backend == "torch":
        return act.function(torch.nn.functional.linear(x, weight, bias))
    return _kernel_mlp(x, [weight], [bias], (act.name,), backend)
