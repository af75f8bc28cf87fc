"""The CPU kernels' launchers: check, allocate, launch.

The kernels themselves, and the math they compute, are in ``cpu_jit.py`` (every
jitted function in one file, as numba's on-disk cache needs); this file is plain
Python around them. Contracts (same as ``reference.py``): float32 or float64 arrays,
all of one dtype; x (N, in), W (out, in), b (out,) or None, outputs (N, out). The
launchers check shapes, because numba does not check bounds.

- ``Network``: a network's parameters as the kernels take them, with its forward and
  backward (``mlp_forward`` and ``mlp_backward`` build one per call);
- ``TrainStep``: a whole training step as one kernel call;
- ``Ensemble`` and ``EnsembleStep``: the same for K networks of one shape, their
  parameters stacked, every member in one call;
- ``activate``, ``activation_grad``, ``update``: the element-wise passes and the
  optimizer's update on their own, for the tests and the benchmarks.
"""

from __future__ import annotations

import functools
import math
import threading

import numba
import numpy as np

from .activation_table import MAX_PARAMETERS, parse, split_saved
from .cpu_jit import (  # the kernels and the codes they switch on
    _NO_BIAS,
    CHEAP_CODES,
    CROSS_ENTROPY,
    DTYPES,
    GIVEN_GRADIENT,
    HELD_GEMM_PRODUCTS,
    IDENTITY,
    MEAN,
    MOMENTUM,
    NESTING_LAYERS,
    PARALLEL_MIN_AFTER_BLAS,
    PARALLEL_MIN_ELEMENTS,
    PARALLEL_MIN_ELEMENTS_COSTLY,
    ROW_BLOCK_MIN_BATCH,
    SGD,
    SPLIT_MIN_PRODUCT,
    _activate,
    _delta_and_bias_grad,
    _ensemble_backward,
    _ensemble_backward_parallel,
    _ensemble_forward,
    _ensemble_forward_parallel,
    _ensemble_step_in_blocks,
    _ensemble_train_step,
    _mlp_backward,
    _mlp_forward,
    _prepare_launch,
    _train_step,
    _update,
    blas_threads_address,
    start_thread_pool,
    thread_count_functions,
)
from .reference import LOSSES, OPTIMIZERS, REDUCTIONS
from .utils import check_choice, check_one_per_layer


def _matrix(name: str, array: np.ndarray, dtype: np.dtype, shape: tuple, index=None):
    """A C-contiguous view of ``array`` after checking dtype and shape (None matches any).

    ``index`` names a list entry, as in ``weights[1]``; the name is only built for
    the error message, since launchers check every array on every call.
    """
    if array.dtype != dtype:
        raise TypeError(f"{_entry(name, index)} must have dtype {dtype}, got {array.dtype}")
    if array.ndim != len(shape):
        _wrong_shape(_entry(name, index), array, shape)
    for got, want in zip(array.shape, shape, strict=True):
        if want is not None and got != want:
            _wrong_shape(_entry(name, index), array, shape)
    return array if array.flags.c_contiguous else np.ascontiguousarray(array)


def _entry(name: str, index) -> str:
    return name if index is None else f"{name}[{index}]"


def _wrong_shape(name: str, array: np.ndarray, shape: tuple):
    want = ", ".join("*" if n is None else str(n) for n in shape)
    raise ValueError(f"{name} must have shape ({want}), got {tuple(array.shape)}")


def _dtype_of(x: np.ndarray, name: str = "x") -> np.dtype:
    if x.dtype not in DTYPES:
        raise TypeError(f"{name} must be float32 or float64, got {x.dtype}")
    return x.dtype


@functools.lru_cache(maxsize=256)
def _activation_rows(activations: tuple[str, ...]) -> np.ndarray:
    """The kernels' (L, 3) float64 rows (code, p₀, p₁) of a network's activation specs,
    shared between calls (the kernels only read them; a read-only flag would change
    their numba type)."""
    rows = np.array([parse(a).row for a in activations], dtype=np.float64)
    return rows.reshape(-1, 1 + MAX_PARAMETERS)


class Network:
    """A chain of dense layers checked once, then run many times.

    Holds each layer's weight (out, in), bias (out,) or None, and activation, all of
    one dtype. Arrays that are C-contiguous are held as given, so in-place updates
    of them show in the next call; others are held as contiguous copies, named in
    ``copies`` (``holds_originals`` when there are none). ``forward`` and ``backward`` check only
    what a call brings (x, g, the saved outputs): numba does not check bounds.

    ``split_gemms``: a ``TrainStep`` of it splits its large GEMMs among numba's threads
    (``cpu_jit._gemm_split``), as many as the thread count; False keeps them whole, on the
    BLAS's own threads, where results must not follow the thread count.
    """

    def __init__(self, weights, biases, activations, in_features: int | None = None,
                 split_gemms: bool = True) -> None:  # fmt: skip
        check_one_per_layer(weights, biases, activations)
        self.dtype = dtype = _dtype_of(weights[0], "weights[0]")
        width = in_features
        checked_weights, checked_biases, widths, self.copies = [], [], [width], []
        for layer, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
            checked = _matrix("weights", weight, dtype, (None, width), layer)
            width = checked.shape[0]
            checked_weights.append(checked)
            widths.append(width)
            if checked is not weight:
                self.copies.append(f"weights[{layer}]")
            if bias is None:
                checked_biases.append(_NO_BIAS[dtype])
                continue
            checked_biases.append(_matrix("biases", bias, dtype, (width,), layer))
            if checked_biases[-1] is not bias:
                self.copies.append(f"biases[{layer}]")
        self.weights, self.biases = tuple(checked_weights), tuple(checked_biases)
        self.widths = (self.weights[0].shape[1], *widths[1:])
        self.has_bias = tuple(bias is not None for bias in biases)
        self.activations = _activation_rows(tuple(activations))
        # where backward reads z, forward keeps it: after every output, in layer order
        self.keeps = tuple(parse(a).activation.reads_input for a in activations)
        self.holds_originals = not self.copies
        self._widest = max(self.widths[1:])  # what the workspaces hold: layer outputs
        # the batch from which forward and backward reach numba's pool (see parallel)
        self.parallel_rows = _parallel_rows(self.widths, self.activations)
        self._largest = max(w.size for w in self.weights)
        self.split_gemms = split_gemms
        self._workspaces = threading.local()
        self._blas_threads = 0  # _bound_blas_threads' once known
        self._no_grad_x = np.empty((0, self.widths[0]), dtype)  # "∂L/∂x not needed"
        self._no_z = np.empty((0, 0), dtype)  # the z slot of a layer that keeps none
        # every slot empty: what most networks pass, built once (a small network's
        # call costs about as much as its Python)
        self._no_slots = None if any(self.keeps) else (self._no_z,) * len(self.keeps)

    def _bound_blas_threads(self) -> int:
        """The bound BLAS's thread-local count setter (``blas_threads_address``), kept
        after the first launch: the binding is settled once a process, before its first
        kernel (``threads.ensure_policy``). 0 where the BLAS has none, asked again."""
        self._blas_threads = blas_threads_address()
        return self._blas_threads

    def parallel(self, batch: int, updates: bool = False) -> bool:
        """Whether a call on ``batch`` rows reaches numba's thread pool: an element-wise
        pass large enough to split (``parallel_rows``), or (``updates``, a ``TrainStep``) an
        update of a parameter of ``PARALLEL_MIN_ELEMENTS`` or more, or a GEMM it splits
        (``splits``). Below, numba's thread count does not matter."""
        if batch >= self.parallel_rows:
            return True
        return updates and (self._largest >= PARALLEL_MIN_ELEMENTS or self.splits(batch))

    def splits(self, batch: int) -> bool:
        """Whether a training step on ``batch`` rows splits a GEMM among numba's threads:
        the largest layer's, of batch × its weight's size multiply-adds, is large enough."""
        return self.split_gemms and batch * self._largest >= SPLIT_MIN_PRODUCT

    def _input(self, x: np.ndarray) -> np.ndarray:
        if x.dtype != self.dtype:
            raise TypeError(f"x must have dtype {self.dtype}, got {x.dtype}")
        if x.ndim == 2 and x.shape[1] == self.widths[0] and x.flags.c_contiguous:
            return x  # the common case, checked first
        return _matrix("x", x, self.dtype, (None, self.widths[0]))

    def _spaces(self, batch: int) -> list[np.ndarray]:
        """Two workspaces for ``batch`` rows, kept per thread between calls: a fresh one
        of 100s of KB costs more than a small network's whole step."""
        kept = getattr(self._workspaces, "arrays", None)
        if kept is None or kept[0].shape[0] < batch * self._widest:
            kept = self._workspaces.arrays = [np.empty(batch * self._widest, self.dtype)] * 2
            kept[1] = np.empty_like(kept[0])
        return kept

    def forward(self, x: np.ndarray, keep: bool = True) -> list[np.ndarray]:
        """Outputs ``[a₁, …, a_L]`` of every layer in one kernel call, followed by the
        pre-activation z of each layer that ``keeps`` it (what backward reads); without
        ``keep`` (inference), the outputs alone."""
        if not (x.dtype == self.dtype and x.ndim == 2 and x.shape[1] == self.widths[0]
                and x.flags.c_contiguous):  # fmt: skip
            x = self._input(x)  # the common case inline: a small network's call is its Python
        batch, dtype = x.shape[0], self.dtype
        outputs, slots = self.new_outputs(batch, keep)
        gemm = _prepare_launch(dtype)
        scratch = self._spaces(batch)[0]
        slots_after = (*outputs, *slots)
        # one task: the drop-in's GEMMs run on the BLAS's threads, as torch's around it
        # do, but for the small ones, on one (cpu_jit._gemm_small_held)
        _mlp_forward(gemm, x, self.weights, self.biases, self.activations, slots_after, scratch,
                     1, self._blas_threads or self._bound_blas_threads())  # fmt: skip
        if self._no_slots or not keep:
            return outputs
        return outputs + [z for z, keeps in zip(slots, self.keeps, strict=True) if keeps]

    def new_outputs(self, batch: int, keep: bool = True) -> tuple[list, list | tuple]:
        """``(every layer's output, every layer's z slot)`` for ``batch`` rows, new: what
        ``_mlp_forward`` writes (without ``keep``, every slot empty: z passes through the
        scratch workspace)."""
        outputs = []
        for width in self.widths[1:]:  # a loop, not a comprehension: one frame fewer
            outputs.append(np.empty((batch, width), self.dtype))
        if self._no_slots or not keep:
            return outputs, self._no_slots or (self._no_z,) * len(outputs)
        return outputs, self._z_slots(batch, [None] * len(outputs))

    def _saved(self, saved, batch: int) -> tuple:
        """What forward returned, checked, as the kernels take it: every layer's output,
        then every layer's z slot."""
        if self._no_slots is not None and len(saved) == len(self.keeps):
            # no layer keeps z: one loop over the outputs, the common case
            for a, width in zip(saved, self.widths[1:], strict=True):
                if not (a.dtype == self.dtype and a.shape == (batch, width)
                        and a.flags.c_contiguous):  # fmt: skip
                    break
            else:
                return (*saved, *self._no_slots)
        layers = split_saved(saved, list(self.keeps))
        checked = [
            (_exactly("outputs", a, self.dtype, (batch, w), layer),
             None if z is None else _exactly("z", z, self.dtype, (batch, w), layer))
            for layer, ((a, z), w) in enumerate(zip(layers, self.widths[1:], strict=True))
        ]  # fmt: skip
        slots = self._no_slots or self._z_slots(batch, [z for _, z in checked])
        return (*(a for a, _ in checked), *slots)

    def _z_slots(self, batch: int, kept: list) -> list[np.ndarray]:
        """Each layer's z slot: ``kept``'s array, a new one where None, for a layer that
        keeps z; the shared empty one for the others."""
        pairs = zip(kept, self.keeps, self.widths[1:], strict=True)
        return [
            (np.empty((batch, w), self.dtype) if z is None else z) if keeps else self._no_z
            for z, keeps, w in pairs
        ]

    def backward(self, g, x, outputs, needs_input_grad: bool = True):
        """``(∂L/∂x or None, [∂L/∂Wₗ], [∂L/∂bₗ or None])`` from ``g = ∂L/∂a_L`` and the
        ``outputs`` forward returned for ``x``, in one kernel call."""
        if not (x.dtype == self.dtype and x.ndim == 2 and x.shape[1] == self.widths[0]
                and x.flags.c_contiguous):  # fmt: skip
            x = self._input(x)  # as in forward, the common case inline
        batch, dtype = x.shape[0], self.dtype
        outputs = self._saved(outputs, batch)
        g = _exactly("g", g, dtype, (batch, self.widths[-1]))
        grad_weights, grad_biases = [], []  # loops, not comprehensions: fewer frames
        for w, b in zip(self.weights, self.biases, strict=True):
            grad_weights.append(np.empty(w.shape, dtype))
            # a layer without bias passes its shared empty one, which the kernel leaves alone
            grad_biases.append(np.empty(b.shape, dtype) if b.size else b)
        grad_x = np.empty((batch, self.widths[0]), dtype) if needs_input_grad else self._no_grad_x
        _mlp_backward(
            _prepare_launch(dtype),
            g,
            x,
            self.weights,
            self.activations,
            outputs,
            tuple(grad_weights),
            tuple(grad_biases),
            grad_x,
            *self._spaces(batch),
            self._blas_threads or self._bound_blas_threads(),
        )
        for layer, has in enumerate(self.has_bias):
            if not has:
                grad_biases[layer] = None
        return grad_x if needs_input_grad else None, grad_weights, grad_biases


def _exactly(name: str, array: np.ndarray, dtype: np.dtype, shape: tuple, index=None):
    """``_matrix`` for a fully known shape, with the common case (already right) first."""
    if array.dtype == dtype and array.shape == shape and array.flags.c_contiguous:
        return array
    return _matrix(name, array, dtype, shape, index)


def mlp_forward(x, weights, biases, activations) -> list[np.ndarray]:
    """Outputs ``[a₁, …, a_L]`` of every layer in one kernel call (``reference.mlp_forward``),
    then the z of each layer whose activation's derivative reads it (``Network.forward``)."""
    return Network(weights, biases, activations, _width(x)).forward(x)


def mlp_backward(
    g, x, weights, biases, activations, outputs, needs_input_grad=True
) -> tuple[np.ndarray | None, list[np.ndarray], list[np.ndarray | None]]:
    """``(∂L/∂x, [∂L/∂Wₗ], [∂L/∂bₗ])`` in one kernel call (see ``reference.mlp_backward``).

    ``biases`` says which layers have one (an array or None); their values are not read.
    ``outputs`` is what ``mlp_forward`` returned.
    """
    network = Network(weights, biases, activations, _width(x))
    return network.backward(g, x, outputs, needs_input_grad)


def _width(x: np.ndarray) -> int:
    """x's features, after checking what the layers are then checked against."""
    _dtype_of(x)
    return _matrix("x", x, x.dtype, (None, None)).shape[1]


def linear_act_forward(x, weight, bias, activation) -> np.ndarray:
    """``act(x Wᵀ + b)`` (see ``reference.linear_act_forward``)."""
    return mlp_forward(x, [weight], [bias], [activation])[0]


def linear_act_backward(
    g, x, weight, a, activation, has_bias=True, needs_input_grad=True, z=None
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray | None]:
    """``(∂L/∂x, ∂L/∂W, ∂L/∂b)`` of one layer (see ``reference.linear_act_backward``);
    ``z`` is needed where the activation's derivative reads it."""
    bias = np.empty(weight.shape[0], weight.dtype) if has_bias else None
    saved = [a] if z is None else [a, z]
    grad_x, (grad_weight,), (grad_bias,) = mlp_backward(
        g, x, [weight], [bias], [activation], saved, needs_input_grad
    )
    return grad_x, grad_weight, grad_bias


def activate(z: np.ndarray, activation: str) -> np.ndarray:
    """``act(z)`` element by element, into a new array: the forward pass's element step."""
    dtype = _dtype_of(z, "z")
    z = np.ascontiguousarray(z)
    out = np.empty_like(z)
    _prepare_launch(dtype)
    _activate(z, _activation_rows((activation,))[0], out)
    return out


def activation_grad(g: np.ndarray, a: np.ndarray, activation: str, z=None) -> np.ndarray:
    """``δ = g ⊙ act'(z)``, element by element: the backward pass's element step, for
    2-D ``g``, ``a = act(z)`` and (where the derivative reads it) ``z`` of one shape."""
    dtype = _dtype_of(g, "g")
    g = _matrix("g", g, dtype, (None, None))
    a = _matrix("a", a, dtype, g.shape)
    if parse(activation).activation.reads_input:
        if z is None:
            raise ValueError(f"the derivative of {activation} needs z, the pre-activation")
        a_or_z = _matrix("z", z, dtype, g.shape)
    else:
        a_or_z = a
    delta = np.empty_like(g)
    _prepare_launch(dtype)
    row = _activation_rows((activation,))[0]
    _delta_and_bias_grad(g, a, a_or_z, row, delta, _NO_BIAS[dtype])
    return delta


def _code(name: str, value: str, options: tuple[str, ...]) -> int:
    return options.index(check_choice(name, value, options))


def hyperparameters(lr, momentum=0.0, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8):
    """One parameter's ``hyper`` row (LR, MOMENTUM, …), after the checks torch.optim makes."""
    checks = [("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("eps", eps)]
    for name, value in checks:
        if not (isinstance(value, (int, float)) and value >= 0 and np.isfinite(value)):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if not (len(betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in betas)):
        raise ValueError(f"betas must be two numbers in [0, 1), got {betas!r}")
    return np.array([lr, momentum, weight_decay, betas[0], betas[1], eps], np.float64)


def _state(name: str, array: np.ndarray, dtype: np.dtype, size: int) -> np.ndarray:
    """A state array the kernels update in place: the given memory itself, never a copy."""
    if array.dtype != dtype or array.ndim != 1 or array.shape[0] not in (0, size):
        raise ValueError(
            f"{name} must be an empty or {size}-element array of {dtype}, got {array.shape} "
            f"{array.dtype}"
        )
    if not (array.flags.c_contiguous and array.flags.writeable):
        raise ValueError(f"{name} must be a writeable C-contiguous array, updated in place")
    return array


def _uses(rule: int, momentum: float) -> int:
    """How many state arrays a parameter's update reads: Adam's 2, SGD's 1 with momentum."""
    return 2 if rule != SGD else int(momentum != 0)


def update(param, grad, state, optimizer, hyper, step=1, fresh=False, scale=1.0) -> None:
    """``torch.optim``'s update of one parameter from ``scale·grad``, in place
    (``reference.SGD``/``Adam``/``AdamW``).

    ``param``, ``grad`` and every array of ``state`` are flat arrays of one dtype and
    size; ``state`` is ``()``, ``(momentum_buffer,)`` or ``(exp_avg, exp_avg_sq)``;
    ``hyper`` comes from ``hyperparameters``; ``step`` is Adam's count, from 1;
    ``fresh``, SGD's first step with this momentum buffer (torch sets buf = d).
    """
    rule = _code("optimizer", optimizer, OPTIMIZERS)
    wanted = _uses(rule, hyper[MOMENTUM])
    if len(state) != wanted:
        raise ValueError(f"state must hold {wanted} arrays for {optimizer}, got {len(state)}")
    dtype = _dtype_of(param, "param")
    param = _state("param", param, dtype, param.size)
    grad = _matrix("grad", grad, dtype, param.shape)
    empty = np.empty(0, dtype)
    state_a, state_b = [_state("state", a, dtype, param.size) for a in (*state, empty, empty)[:2]]
    _prepare_launch(dtype)
    _update(param, grad, state_a, state_b, rule, hyper, float(step), bool(fresh), float(scale))


def _parallel_rows(widths, activations) -> int:
    """The batch from which a network's element-wise passes reach numba's pool: from
    ``PARALLEL_MIN_ELEMENTS`` elements in its widest layer, from
    ``PARALLEL_MIN_ELEMENTS_COSTLY`` in a layer whose activation is not among
    ``CHEAP_CODES`` (``cpu_jit._activate``), and from ``PARALLEL_MIN_AFTER_BLAS`` after
    a GEMM that runs on the BLAS's threads (``cpu_jit._activate_after_blas``)."""
    rows = -(-PARALLEL_MIN_ELEMENTS // max(widths[1:]))
    for inputs, width, row in zip(widths[:-1], widths[1:], activations, strict=True):
        code = int(row[0])
        if code == IDENTITY:
            continue  # no activation pass
        cheap = code in CHEAP_CODES
        if not cheap:
            rows = min(rows, -(-PARALLEL_MIN_ELEMENTS_COSTLY // width))
        least = PARALLEL_MIN_AFTER_BLAS[0 if cheap else 1]
        on_blas_threads = -(-HELD_GEMM_PRODUCTS[1] // (inputs * width))
        rows = min(rows, max(on_blas_threads, -(-least // width)))
    return rows


class TrainStep:
    """A whole training step of a ``Network`` as one kernel call: forward, the loss
    gradient, backward and the optimizer's update (``reference.train_step``).

    The network must hold its parameters' own memory, which the step updates in place.
    The optimizer's state is not kept here but passed in: ``bind(states, steps)``
    checks arrays that the caller keeps (torch.optim's state tensors, as views), and
    ``__call__`` takes them with each step's ``hyper`` (one row per parameter) and
    ``fresh`` flags. Parameters are ordered as ``nn.Sequential`` orders them: W₁, b₁,
    W₂, … (biases only where a layer has one). Workspaces are kept between steps.

    ``loss=None`` runs a loss computed by the caller: ``forward(x)`` returns the
    network's output (a view of a workspace, valid until the next call), and the step
    then takes ∂L/∂ŷ (scaled as the caller's loss is) in place of ``y``.
    """

    def __init__(self, network: Network, loss="mse", reduction="mean", optimizer="sgd") -> None:
        if not network.holds_originals:
            raise ValueError(f"{network.copies[0]} must be C-contiguous to be updated in place")
        self.network = network
        self.loss = GIVEN_GRADIENT if loss is None else _code("loss", loss, LOSSES)
        self.scale_by_mean = _code("reduction", reduction, REDUCTIONS) == MEAN
        self.rule = _code("optimizer", optimizer, OPTIMIZERS)
        first_param, sizes = [], []
        for weight, bias in zip(network.weights, network.biases, strict=True):
            first_param.append(len(sizes))
            sizes += [weight.size] + ([bias.size] if bias.size else [])
        self._first_param = np.array(first_param, np.int64)
        self.sizes = tuple(sizes)
        self._grad_weights = tuple(np.empty_like(w) for w in network.weights)
        self._grad_biases = tuple(np.empty_like(b) for b in network.biases)
        self._workspaces: tuple = ()
        self._laid_out = None  # what the workspaces were made for (_layout)
        self._forwarded: np.ndarray | None = None  # the x of forward(), for loss=None
        self._checked = None  # what the last step checked, for again()
        self._kept: list = []  # the last step's kernel arguments, for again()
        self._y_slot = 3 if self.loss == CROSS_ENTROPY else 2  # y's place in them

    def bind(self, states, steps) -> tuple:
        """``(states, steps)`` checked for the kernel: two flat arrays per parameter
        (empty where unused) and one 1-element array per parameter (Adam's step)."""
        count, dtype = len(self.sizes), self.network.dtype
        if len(states) != 2 * count or len(steps) != count:
            raise ValueError(
                f"states and steps must hold {2 * count} and {count} arrays, "
                f"got {len(states)} and {len(steps)}"
            )
        states = tuple(
            _state(f"states[{i}]", a, dtype, self.sizes[i // 2]) for i, a in enumerate(states)
        )
        kinds = {a.dtype for a in steps}
        if len(kinds) != 1 or kinds.pop() not in DTYPES:
            raise TypeError("steps must be float32 or float64 arrays, all of one dtype")
        steps = tuple(_state(f"steps[{i}]", a, a.dtype, 1) for i, a in enumerate(steps))
        if any(a.shape[0] != 1 for a in steps):
            raise ValueError("every array of steps must hold one element")
        return states, steps

    def _prepare(self, x) -> np.ndarray:
        """``x`` checked, with workspaces for its batch."""
        network = self.network
        x = network._input(x)
        batch = x.shape[-2]
        if batch == 0:
            raise ValueError("x must hold at least one sample, got a batch of 0")
        layout = self._layout(batch)
        if layout != self._laid_out:
            outputs = tuple(item for part in network.new_outputs(batch) for item in part)
            self._workspaces = (outputs, *self._spaces(layout))
            self._laid_out = layout
        return x

    def _layout(self, batch: int):
        """What the workspaces depend on: the batch."""
        return batch

    def _spaces(self, batch: int) -> list[np.ndarray]:
        """The δ and upstream workspaces for ``batch`` rows of the widest layer; the δ
        one holds every layer's where the step may run in blocks of rows, which keeps
        them all (``cpu_jit._in_row_blocks``, which also reads the task count)."""
        network, widest = self.network, self.network._widest
        every_layer = batch >= ROW_BLOCK_MIN_BATCH and network.splits(batch)
        deltas = sum(network.widths[1:]) if every_layer else widest
        return [np.empty(batch * width, network.dtype) for width in (deltas, widest)]

    def forward(self, x) -> np.ndarray:
        """The network's output at ``x``, kept in the workspaces for the next step of a
        ``loss=None`` TrainStep; a view, valid until the next call."""
        network = self.network
        x = self._prepare(x)
        outputs, delta_space, _ = self._workspaces
        _mlp_forward(
            _prepare_launch(x.dtype),
            x,
            network.weights,
            network.biases,
            network.activations,
            outputs,
            delta_space,
            self._tasks(x.shape[0]),
            blas_threads_address(),
        )
        self._forwarded = x
        return outputs[len(network.weights) - 1]

    def _targets(self, y, batch: int, width: int):
        """``(targets, labels)`` checked against the output, one of them empty."""
        if self.loss == GIVEN_GRADIENT:
            return _exactly("the loss gradient", y, self.network.dtype, (batch, width)), _NO_LABELS
        if self.loss == CROSS_ENTROPY:
            if y.dtype.kind not in "iu":
                raise TypeError(
                    f"y must hold integer class indices for cross_entropy, got {y.dtype}"
                )
            if y.shape != (batch,):
                raise ValueError(f"y must have shape ({batch},) for cross_entropy, got {y.shape}")
            return _NO_TARGETS[self.network.dtype], np.ascontiguousarray(y, np.int64)
        return _exactly("y", y, self.network.dtype, (batch, width)), _NO_LABELS

    def __call__(self, x, y, bound: tuple, hyper, fresh, max_norm: float = 0.0) -> float:
        """One step on batch ``(x, y)``; returns the loss before the update.

        ``bound`` comes from ``bind``; ``hyper`` is (parameters, 6) float64, ``fresh``
        (parameters,) bool; ``max_norm`` > 0 clips the gradients as ``clip_grad_norm_``.
        """
        network, count = self.network, len(self.sizes)
        if self.loss == GIVEN_GRADIENT:
            x = self._forwarded
            if x is None:
                raise ValueError("a loss=None TrainStep needs forward(x) before each step")
            self._forwarded = None
        else:
            x = self._prepare(x)
        batch, width = x.shape[-2], network.widths[-1]
        if hyper.shape != (count, 6) or hyper.dtype != np.float64:
            raise ValueError(f"hyper must be a ({count}, 6) float64 array, got {hyper.shape}")
        if fresh.shape != (count,) or fresh.dtype != np.bool_:
            raise ValueError(f"fresh must be a ({count},) bool array, got {fresh.shape}")
        targets, labels = self._targets(y, batch, width)
        terms = batch if self.loss == CROSS_ENTROPY else batch * width
        scale = 1.0 / terms if self.scale_by_mean else 1.0
        if self.loss != GIVEN_GRADIENT:
            given = labels if self.loss == CROSS_ENTROPY else targets
            self._checked = (x.shape, given.shape, given.dtype, bound, hyper, fresh)
        value, bad = self._launch(x, targets, labels, bound, hyper, fresh, scale, max_norm)
        if bad != -1:
            self._refuse(bad, y)
        return value

    def again(self, x, y, bound: tuple, hyper, fresh, max_norm: float = 0.0) -> float:
        """``self(x, y, bound, hyper, fresh, max_norm)``, without the checks the last call
        made where they would pass alike: x and y C-contiguous, of that call's shapes and
        the dtypes it took them in, with its own bound, hyper and fresh arrays. A caller
        that steps on batch after batch pays for the checks once; anything else runs
        them."""
        checked = self._checked
        if not (
            checked is not None
            and x.__class__ is np.ndarray
            and y.__class__ is np.ndarray
            and x.shape == checked[0]
            and x.dtype == self.network.dtype
            and y.shape == checked[1]
            and y.dtype == checked[2]
            and bound is checked[3]
            and hyper is checked[4]
            and fresh is checked[5]
            and x.flags.c_contiguous
            and y.flags.c_contiguous
        ):
            return self(x, y, bound, hyper, fresh, max_norm)
        arguments = self._kept
        arguments[1], arguments[self._y_slot] = x, y
        value, bad = self._launch_kept(max_norm)
        if bad != -1:
            self._refuse(bad, y)
        return value

    def _refuse(self, bad: int, y) -> None:
        """Raise what the kernel's code ``bad`` (not -1) says: a label outside the classes,
        or a parameter's state arrays of the wrong size."""
        if bad >= 0:
            classes = self.network.widths[-1]
            raise ValueError(f"y holds class index {y.flat[bad]}, outside [0, {classes})")
        used = "2 state arrays" if self.rule != SGD else "a momentum buffer"
        raise ValueError(
            f"parameter {-2 - bad}'s update reads {used} of {self.sizes[-2 - bad]} elements"
            ", which the states passed to bind() do not hold"
        )

    def _launch(self, x, targets, labels, bound, hyper, fresh, scale, max_norm) -> tuple:
        """``(loss, code)`` of the step's kernel (``_train_step``'s). Its arguments are
        kept for ``again``, which puts the next batch in x's and y's places alone."""
        arguments = self._arguments(x, targets, labels, bound, hyper, fresh, scale)
        self._kept = [*arguments, 0.0, 1, blas_threads_address()]
        return self._launch_kept(max_norm)

    def _launch_kept(self, max_norm: float) -> tuple:
        """``_train_step`` on the kept arguments; the batch in them (x, and y as targets
        or labels) is the caller's, and is let go after the call."""
        arguments = self._kept
        arguments[-3] = float(max_norm)
        arguments[-2] = self._tasks(arguments[1].shape[0])
        try:
            return _train_step(*arguments)
        finally:
            arguments[1] = arguments[self._y_slot] = None

    def _tasks(self, batch: int) -> int:
        """How many tasks the step's large GEMMs split among: one per numba thread (the
        count the thread policy sets for a call that reaches its pool) where the network
        splits them (``Network.splits``), else 1. numba's pool has started (the launch
        prepared)."""
        return thread_count_functions()[0]() if self.network.splits(batch) else 1

    def _arguments(self, x, targets, labels, bound, hyper, fresh, scale) -> tuple:
        """What the step's kernel takes before its last argument."""
        network = self.network
        return (_prepare_launch(x.dtype), x, targets, labels, network.weights, network.biases,
                network.activations, *self._workspaces, self._grad_weights, self._grad_biases,
                self._first_param, *bound, hyper, fresh, self.loss, scale, self.rule)  # fmt: skip


# An ensemble's blocks of rows (Ensemble.row_blocks) hold at least this many: a GEMM
# of fewer rows runs far below the rate of a whole member's.
MIN_BLOCK_ROWS = 32


class Ensemble:
    """K networks of one shape, each layer's parameters stacked: weights (K, out, in),
    biases (K, out) or None, one activation per layer for every member; held, checked
    and run as ``Network`` holds its own (``holds_originals``, ``copies``).

    ``forward(x)`` takes ``(K, N, in)``, one batch per member, or ``(N, in)``, one batch
    for all, and returns every layer's ``(K, N, out)`` output (then the kept z's);
    ``backward`` gives ∂L/∂x of x's shape (summed over the members for a shared x) and
    the stacked ∂W, ∂b. Each is one kernel call for every member, the members on
    numba's threads where its threading layer nests parallel regions (``in_parallel``);
    forward and backward run each member in blocks of rows where whole members would
    not divide evenly among the threads (``row_blocks``), unless ``split_rows`` is
    false: BLAS need not round a row alike in GEMMs of different row counts, so blocks
    that follow the thread count make results follow it too.
    """

    def __init__(self, weights, biases, activations, in_features: int | None = None,
                 split_rows: bool = True) -> None:  # fmt: skip
        check_one_per_layer(weights, biases, activations)
        self.dtype = dtype = _dtype_of(weights[0], "weights[0]")
        self.members = _matrix("weights", weights[0], dtype, (None, None, None), 0).shape[0]
        width, checked, self.copies = in_features, [], []
        for layer, (weight, bias) in enumerate(zip(weights, biases, strict=True)):
            weight_ = _matrix("weights", weight, dtype, (self.members, None, width), layer)
            width = weight_.shape[1]
            bias_ = np.empty((self.members, 0), dtype)
            if bias is not None:
                bias_ = _matrix("biases", bias, dtype, (self.members, width), layer)
            self.copies += [f"{name}[{layer}]" for name, given, held in
                            (("weights", weight, weight_), ("biases", bias, bias_))
                            if given is not None and held is not given]  # fmt: skip
            checked.append((weight_, bias_))
        self.weights = tuple(w for w, _ in checked)
        self.biases = tuple(b for _, b in checked)
        self.widths = (self.weights[0].shape[2], *(w.shape[1] for w in self.weights))
        self.has_bias = tuple(bias is not None for bias in biases)
        self.activations = _activation_rows(tuple(activations))
        self.keeps = tuple(parse(a).activation.reads_input for a in activations)
        self.holds_originals = not self.copies
        self._widest = max(self.widths[1:])
        # Members on numba's threads, each member's passes serial in its thread: needs a
        # layer that nests parallel regions (workqueue aborts the process on a nested one)
        self.in_parallel = self.members > 1 and start_thread_pool() in NESTING_LAYERS
        self.split_rows = split_rows
        # as Network's: the batch from which a call reaches numba's pool (every call,
        # with the members in parallel)
        parallel_rows = _parallel_rows(self.widths, self.activations)
        self.parallel_rows = 0 if self.in_parallel else parallel_rows
        self._largest = max(w[0].size for w in self.weights)  # one member's update at a time
        self.split_gemms = False  # a member's GEMMs run whole, each member in its own task
        self._no_z = np.empty((self.members, 0, 0), dtype)

    parallel = Network.parallel
    splits = Network.splits

    def _input(self, x: np.ndarray) -> np.ndarray:
        """x as the kernels take it: ``(K, N, in)``, or ``(1, N, in)`` for a shared one."""
        if x.dtype != self.dtype:
            raise TypeError(f"x must have dtype {self.dtype}, got {x.dtype}")
        if x.ndim == 2:
            return _matrix("x", x, self.dtype, (None, self.widths[0]))[None]
        if x.ndim != 3 or x.shape[0] != self.members or x.shape[2] != self.widths[0]:
            raise ValueError(
                f"x must have shape ({self.members}, batch, {self.widths[0]}) or "
                f"(batch, {self.widths[0]}), got {tuple(x.shape)}"
            )
        return np.ascontiguousarray(x)

    def new_outputs(self, batch: int, keep: bool = True) -> tuple[list, list]:
        """``(every layer's (K, N, out) output, every layer's z slot)``, new (as
        ``Network.new_outputs``)."""
        shapes = [(self.members, batch, width) for width in self.widths[1:]]
        outputs = [np.empty(shape, self.dtype) for shape in shapes]
        slots = [
            np.empty(s, self.dtype) if k and keep else self._no_z
            for s, k in zip(shapes, self.keeps, strict=True)
        ]
        return outputs, slots

    def forward(self, x: np.ndarray, keep: bool = True) -> list[np.ndarray]:
        """Every layer's ``(K, N, out)`` output, then the z of each layer that keeps it
        (without ``keep``, the outputs alone)."""
        x = self._input(x)
        batch = x.shape[1]
        outputs, slots = self.new_outputs(batch, keep)
        blocks = self.row_blocks(batch)
        self.run_forward(x, (*outputs, *slots), self.workspace(batch, blocks), blocks)
        if not keep:
            return outputs
        return outputs + [z for z, keeps in zip(slots, self.keeps, strict=True) if keeps]

    def row_blocks(self, batch: int) -> int:
        """How many blocks of rows each member runs in: 1 where the members run one after
        another or divide evenly among numba's threads, else the fewest that make members
        × blocks divide, each of at least ``MIN_BLOCK_ROWS`` rows (5 members on 2 threads:
        10 half members, 5 a thread, where whole members would idle a thread for a third
        of the call); 1 without ``split_rows``."""
        if not (self.in_parallel and self.split_rows):
            return 1
        threads = numba.get_num_threads()
        blocks = threads // math.gcd(self.members, threads)
        return max(1, min(blocks, batch // MIN_BLOCK_ROWS))

    def run_forward(self, x: np.ndarray, outputs: tuple, scratch: np.ndarray, blocks: int) -> None:
        """The forward kernel, the members in parallel or one after another, each in
        ``blocks`` blocks of rows, on an x ``_input`` made, into ``outputs`` (every
        layer's output, then its z slot), with the ``workspace(batch, blocks)`` scratch."""
        arguments = (_prepare_launch(self.dtype), x, self.weights, self.biases, self.activations,
                     outputs, scratch, blocks)  # fmt: skip
        if self.in_parallel:
            _ensemble_forward_parallel(*arguments, blas_threads_address())
        else:
            _ensemble_forward(*arguments)

    def workspace(self, batch: int, blocks: int = 1, shape: tuple | None = None) -> np.ndarray:
        """A workspace of ``shape`` (default: a block's rows of the widest layer) for each
        task that runs at once: every member's every block of rows, or one."""
        shape = (-(-batch // blocks) * self._widest,) if shape is None else shape
        return np.empty((self.members * blocks if self.in_parallel else 1, *shape), self.dtype)

    def per_task(self, stacks, blocks: int) -> tuple[np.ndarray, ...]:
        """A new ``(K·blocks, …)`` stack for each ``(K, …)`` one of ``stacks``: a slice for
        every member's every block of rows (its partial gradients)."""
        return tuple(np.empty((self.members * blocks, *a.shape[1:]), self.dtype) for a in stacks)

    def backward(self, g, x, outputs, needs_input_grad: bool = True):
        """``(∂L/∂x or None, [∂L/∂Wₗ], [∂L/∂bₗ or None])`` from ``g = ∂L/∂a_L`` (K, N, out)
        and the ``outputs`` forward returned for ``x``, in one kernel call."""
        shared = x.ndim == 2
        x = self._input(x)
        members, batch, dtype = self.members, x.shape[1], self.dtype
        layers = split_saved(list(outputs), list(self.keeps))
        saved, slots = [], []
        for layer, ((a, z), width) in enumerate(zip(layers, self.widths[1:], strict=True)):
            saved.append(_exactly("outputs", a, dtype, (members, batch, width), layer))
            slots.append(self._no_z if z is None else
                         _exactly("z", z, dtype, (members, batch, width), layer))  # fmt: skip
        g = _exactly("g", g, dtype, (members, batch, self.widths[-1]))
        grad_weights = tuple(np.empty(w.shape, dtype) for w in self.weights)
        grad_biases = tuple(np.empty(b.shape, dtype) for b in self.biases)
        # each member's ∂L/∂x; a shared x's is their sum, taken below in member order
        grad_x = np.empty((members, batch if needs_input_grad else 0, self.widths[0]), dtype)
        blocks = self.row_blocks(batch)
        partials = (grad_weights, grad_biases)  # one block: each task writes its member's
        if blocks > 1:
            partials = (self.per_task(self.weights, blocks), self.per_task(self.biases, blocks))
        arguments = (_prepare_launch(dtype), g, x, self.weights, self.activations,
                     (*saved, *slots), grad_weights, grad_biases, grad_x,
                     self.workspace(batch, blocks), self.workspace(batch, blocks), *partials,
                     blocks)  # fmt: skip
        if self.in_parallel:
            _ensemble_backward_parallel(*arguments, blas_threads_address())
        else:
            _ensemble_backward(*arguments)
        grad_weights = list(grad_weights)
        grad_biases = [
            g if has else None for g, has in zip(grad_biases, self.has_bias, strict=True)
        ]
        if not needs_input_grad:
            return None, grad_weights, grad_biases
        return grad_x.sum(axis=0) if shared else grad_x, grad_weights, grad_biases


class EnsembleStep(TrainStep):
    """``TrainStep`` of an ``Ensemble``: one kernel call steps every member, whose losses
    add (a mean is each member's own). Parameters and optimizer states are stacked, as
    ``torch.func.stack_module_state`` stacks them, with one step count per stacked
    parameter. ``x`` is ``(K, N, in)`` or ``(N, in)`` shared; ``y`` is ``(K, N, out)``
    or ``(N, out)`` shared (class labels ``(K, N)`` or ``(N,)``); with ``loss=None``,
    ∂L/∂ŷ is ``(K, N, out)``. No clipping: its global norm would couple the members.

    ``blocks`` is how many blocks of rows each member's step runs in (at most one a
    row): None takes the ensemble's choice at each step (``Ensemble.row_blocks``).
    Blocks also change how ∂W and ∂b are summed over the rows, so results chosen by
    the thread count depend on it, as torch's own CPU sums do; a fixed ``blocks``
    (1: whole members) does not.
    """

    def __init__(self, network: Ensemble, loss="mse", reduction="mean", optimizer="sgd",
                 blocks: int | None = None) -> None:  # fmt: skip
        super().__init__(network, loss, reduction, optimizer)
        if blocks is not None and (type(blocks) is not int or blocks < 1):
            raise ValueError(f"blocks must be None or an integer >= 1, got {blocks!r}")
        self.blocks = blocks

    def row_blocks(self, batch: int) -> int:
        """The blocks of rows a step on ``batch`` rows runs each member in (see the class)."""
        if self.blocks is None:
            return self.network.row_blocks(batch)
        return min(self.blocks, batch)

    def _layout(self, batch: int) -> tuple[int, int]:
        return batch, self.row_blocks(batch)

    def _spaces(self, layout: tuple[int, int]) -> list[np.ndarray]:
        """The δ and upstream workspaces and the gradients: one set per member that runs
        at once, or per block of rows."""
        batch, blocks = layout
        network = self.network
        stacks = network.weights, network.biases
        if blocks == 1:  # each member's gradients are applied before it goes on
            grads = [tuple(network.workspace(0, shape=a.shape[1:]) for a in stack)
                     for stack in stacks]  # fmt: skip
        else:  # each block's, summed once every block has run
            grads = [network.per_task(stack, blocks) for stack in stacks]
        self._grad_weights, self._grad_biases = grads
        return [network.workspace(batch, blocks) for _ in "du"]

    def forward(self, x) -> np.ndarray:
        """Every member's output, ``(K, N, out)``, kept for a ``loss=None`` step."""
        network = self.network
        x = self._prepare(x)
        outputs, delta_space, _ = self._workspaces
        network.run_forward(x, outputs, delta_space, self._laid_out[1])
        self._forwarded = x
        return outputs[len(network.weights) - 1]

    def _targets(self, y, batch: int, width: int):
        members, dtype = self.network.members, self.network.dtype
        if self.loss == GIVEN_GRADIENT:
            gradient = _exactly("the loss gradient", y, dtype, (members, batch, width))
            return gradient, _NO_LABELS[None]
        if self.loss == CROSS_ENTROPY:
            if y.dtype.kind not in "iu":
                raise TypeError(
                    f"y must hold integer class indices for cross_entropy, got {y.dtype}"
                )
            if y.shape not in ((members, batch), (batch,)):
                raise ValueError(
                    f"y must have shape ({members}, {batch}) or ({batch},) for cross_entropy, "
                    f"got {y.shape}"
                )
            return _NO_TARGETS[dtype][None], np.ascontiguousarray(y, np.int64).reshape(-1, batch)
        if y.dtype != dtype or y.shape not in ((members, batch, width), (batch, width)):
            raise ValueError(
                f"y must have shape ({members}, {batch}, {width}) or ({batch}, {width}) and "
                f"dtype {dtype}, got {y.shape} {y.dtype}"
            )
        return np.ascontiguousarray(y).reshape(-1, batch, width), _NO_LABELS[None]

    def again(self, x, y, bound: tuple, hyper, fresh, max_norm: float = 0.0) -> float:
        """``__call__``, every check included: an ensemble's x and y take more forms."""
        return self(x, y, bound, hyper, fresh, max_norm)

    def _launch(self, x, targets, labels, bound, hyper, fresh, scale, max_norm) -> tuple:
        if max_norm:
            raise ValueError("an EnsembleStep does not clip: max_norm must be 0")
        arguments = self._arguments(x, targets, labels, bound, hyper, fresh, scale)
        parallel, blas_threads = self.network.in_parallel, blas_threads_address()
        _, blocks = self._laid_out
        if blocks > 1:
            return _ensemble_step_in_blocks(*arguments, parallel, blas_threads, blocks)
        return _ensemble_train_step(*arguments, parallel, blas_threads)


_NO_TARGETS = {dtype: np.empty((0, 0), dtype) for dtype in DTYPES}
_NO_LABELS = np.empty(0, np.int64)
