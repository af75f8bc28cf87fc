r"""A whole training step on the GPU: the loss gradient and the optimizer update in Triton.

Around ``gpu.py``'s forward and layered backward, two kernels finish a step, so
that an L-layer network trains in 2L + 2 launches (L + 3 with the fused forward)
and the host never waits on the device (the step can be captured in a CUDA
graph). With ŷ the network's output (M, C), y the targets and D the reduction's
divisor (the number of terms for "mean", 1 for "sum"), the loss kernel writes,
as ``reference.loss_and_grad``::

    mse              L = Σ (ŷ − y)² / D                      g = 2 (ŷ − y) / D
    cross_entropy    L = Σᵢ (logsumexp ŷᵢ − ŷᵢ,yᵢ) / D        g = (softmax ŷᵢ − onehot yᵢ) / D
    bce_with_logits  L = Σ ((1 − y) ŷ − log σ(ŷ)) / D         g = (σ(ŷ) − y) / D

each program summing its rows' terms; a class index outside [0, C) raises a flag
on the device instead of a host-side check. The backward leaves each layer's
[∂W | ∂b] as rows of partial sums (``gpu.layered_backward``); the update kernel
adds them in a fixed order, so results are deterministic, and applies
``torch.optim``'s rule to every parameter in one launch (``reference.SGD``,
``Adam``, ``AdamW``), with d the gradient::

    SGD    d += λ p;   buf = d on its first step, else μ·buf + d;   p −= lr·buf  (d if μ = 0)
    Adam   t += 1;  d += λ p (Adam) or p ·= 1 − lr·λ (AdamW)
           m += (1 − β₁)(d − m);   v = β₂ v + (1 − β₂) d²
           p −= lr / (1 − β₁ᵗ) · m / (√v / √(1 − β₂ᵗ) + ε)

The hyperparameters are read from a device tensor (one row per parameter) and
Adam's step counts are the optimizer state's own tensors on the device, so a
captured step replays with the values of the moment. The update changes nothing
while the flag is up; its first program also sums the loss terms.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import gpu
from .activation_table import split_saved
from .reference import LOSSES, OPTIMIZERS
from .utils import cdiv, next_power_of_2

MSE, CROSS_ENTROPY, BCE_WITH_LOGITS = map(tl.constexpr, range(len(LOSSES)))
SGD, ADAM, ADAMW = map(tl.constexpr, range(len(OPTIMIZERS)))
# Columns of the hyperparameter rows: cpu_jit's six, then SGD's first-step flag.
LR, MOMENTUM, WEIGHT_DECAY, BETA1, BETA2, EPS, FRESH = map(tl.constexpr, range(7))
HYPER_COLUMNS = 8
HYPER_ROW = tl.constexpr(HYPER_COLUMNS)  # the same, as a kernel may read a global
WIDEST_OUTPUT = 8192  # the loss kernel holds a row of the output in one tile
UPDATE_BLOCK = 1024
LOSS_TILE = 4096  # output elements per loss program


@triton.jit
def _divide(a, b):
    """a / b correctly rounded, as torch divides: Triton's float32 "/" is approximate."""
    if a.dtype == tl.float64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(a):
    """√a correctly rounded, as torch takes it: Triton's float32 sqrt is approximate."""
    if a.dtype == tl.float64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def _loss_grad_kernel(
    out_ptr,                # (M, C) contiguous network output ŷ
    y_ptr,                  # (M, C) contiguous targets, or (M,) int64 class indices
    g_ptr,                  # (M, C) contiguous ∂L/∂ŷ, written in ŷ's dtype
    terms_ptr,              # (programs,) each program's Σ of its loss terms, in ACC
    flag_ptr,               # (2,) int64: set to [1, a class index] for one outside [0, C)
    steps,                  # tuple of Adam's step-count tensors (STEPS of them)
    steps_in_ptr,           # (STEPS,) where program 0 copies them, for the update to read
    M, C,
    divisor: tl.float64,    # the reduction's: the number of terms ("mean") or 1 ("sum")
    LOSS: tl.constexpr,     # MSE, CROSS_ENTROPY or BCE_WITH_LOGITS
    STEPS: tl.constexpr,    # step counts to copy: 0 for SGD
    ACC: tl.constexpr,      # compute dtype: float32, or float64 for float64
    BM: tl.constexpr,       # rows per program
    BC: tl.constexpr,       # C padded to a power of 2
):  # fmt: skip
    """g = ∂L/∂ŷ for BM rows, and the sum of their loss terms."""
    pid = tl.program_id(0)
    rows = pid * BM + tl.arange(0, BM)
    cols = tl.arange(0, BC)
    inside = (rows[:, None] < M) & (cols[None, :] < C)
    offsets = rows[:, None] * C + cols[None, :]
    if LOSS == CROSS_ENTROPY:
        o = tl.load(out_ptr + offsets, mask=inside, other=float("-inf")).to(ACC)
        o = tl.where(rows[:, None] < M, o, 0.0)  # rows past M: finite, never stored
        labels = tl.load(y_ptr + rows, mask=rows < M, other=0)
        bad = (rows < M) & ((labels < 0) | (labels >= C))
        if tl.max(bad.to(tl.int32), axis=0) > 0:
            first = tl.min(tl.where(bad, rows, M), axis=0)
            tl.store(flag_ptr + 1, tl.sum(tl.where(rows == first, labels, 0), axis=0))
            tl.store(flag_ptr, 1)
        # log_softmax as torch forms it: ŷ − max, minus the log of the sum of exps
        shifted = o - tl.max(o, axis=1)[:, None]
        log_p = shifted - tl.log(tl.sum(tl.exp(shifted), axis=1))[:, None]
        hit = cols[None, :] == labels[:, None]
        term = tl.where(inside & hit, -log_p, 0.0)
        g = tl.exp(log_p) - tl.where(hit, 1.0, 0.0)
    else:
        o = tl.load(out_ptr + offsets, mask=inside, other=0.0).to(ACC)
        y = tl.load(y_ptr + offsets, mask=inside, other=0.0).to(ACC)
        if LOSS == MSE:
            difference = o - y
            term = difference * difference
            g = 2.0 * difference
        else:
            # −log σ(ŷ) = log(1 + e^{−|ŷ|}) − min(ŷ, 0): no overflow for any ŷ
            log_sigmoid = tl.minimum(o, 0.0) - gpu.log1p(tl.exp(-tl.abs(o)))
            term = (1.0 - y) * o - log_sigmoid
            g = gpu.sigmoid(o) - y
    g = _divide(g, gpu.float64_argument(divisor, g))
    tl.store(g_ptr + offsets, g.to(g_ptr.dtype.element_ty), mask=inside)
    tl.store(terms_ptr + pid, tl.sum(tl.sum(tl.where(inside, term, 0.0), axis=1), axis=0))
    if pid == 0:
        for i in tl.static_range(STEPS):
            tl.store(steps_in_ptr + i, tl.load(steps[i]).to(steps_in_ptr.dtype.element_ty))


@triton.jit
def _update_slice(
    param_ptr, a_ptr, b_ptr, index, mask, d, hyper_ptr, t,
    RULE: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """torch.optim's update of ``param[index]`` where ``mask``, from the gradient d;
    ``a_ptr``/``b_ptr``: the momentum buffer, or Adam's m and v; t, Adam's step
    count after this step; ``hyper_ptr``, the parameter's row of hyperparameters."""
    lr = tl.load(hyper_ptr + LR)
    decay = tl.load(hyper_ptr + WEIGHT_DECAY)
    p = tl.load(param_ptr + index, mask=mask, other=0.0).to(ACC)
    if RULE == SGD:
        if decay != 0:  # 0·inf would be NaN
            d += decay.to(ACC) * p
        momentum = tl.load(hyper_ptr + MOMENTUM)
        if momentum != 0:
            buffer = tl.load(a_ptr + index, mask=mask, other=0.0).to(ACC)
            d = tl.where(tl.load(hyper_ptr + FRESH) != 0, d, momentum.to(ACC) * buffer + d)
            tl.store(a_ptr + index, d.to(a_ptr.dtype.element_ty), mask=mask)
        p -= lr.to(ACC) * d
    else:
        # Coefficients formed in float64 and rounded once, as torch.optim forms them.
        beta1 = tl.load(hyper_ptr + BETA1)
        beta2 = tl.load(hyper_ptr + BETA2)
        step_size = (lr / (1.0 - tl.exp(t * tl.log(beta1)))).to(ACC)
        correction = tl.sqrt(1.0 - tl.exp(t * tl.log(beta2))).to(ACC)
        if decay != 0:
            if RULE == ADAMW:
                p *= (1.0 - lr * decay).to(ACC)
            else:
                d += decay.to(ACC) * p
        m = tl.load(a_ptr + index, mask=mask, other=0.0).to(ACC)
        v = tl.load(b_ptr + index, mask=mask, other=0.0).to(ACC)
        m += (1.0 - beta1).to(ACC) * (d - m)
        v = beta2.to(ACC) * v + (1.0 - beta2).to(ACC) * d * d
        tl.store(a_ptr + index, m.to(a_ptr.dtype.element_ty), mask=mask)
        tl.store(b_ptr + index, v.to(b_ptr.dtype.element_ty), mask=mask)
        denominator = _divide(_sqrt(v), correction) + tl.load(hyper_ptr + EPS).to(ACC)
        p -= step_size * _divide(m, denominator)
    tl.store(param_ptr + index, p.to(param_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _update_kernel(
    partials_ptr,           # flat ACC workspace: layer l's partial [∂W | ∂b] rows at bases[l]
    parameters,             # tuple of 2L: W₁, b₁, W₂, …; a layer without bias repeats its W
    state_a,                # tuple of 2L: SGD's momentum buffers or Adam's m (else params)
    state_b,                # tuple of 2L: Adam's v (else params)
    hyper_ptr,              # (2L, HYPER_COLUMNS) float64: each parameter's hyperparameters
    steps,                  # tuple of 2L: Adam's step counts, advanced here (else dummies)
    steps_in_ptr,           # (2L,) the step counts as this step began (the loss kernel's copy)
    flag_ptr,               # (2,) int64: nonzero first element: change nothing
    terms_ptr,              # (term_programs,) the loss kernel's partial sums
    loss_ptr,               # 0-dim loss, written in the output's dtype
    term_programs,
    divisor: tl.float64,    # the loss's reduction divisor
    widths,                 # (K₀, N₀, …, N_{L-1})
    bases,                  # where layer l's rows start in partials
    rows,                   # how many partial rows layer l has
    L: tl.constexpr,
    BIASES: tl.constexpr,   # bit l: layer l has a bias
    RULE: tl.constexpr,     # SGD, ADAM or ADAMW
    ACC: tl.constexpr,      # compute dtype: float32, or float64 for float64
    BLOCK: tl.constexpr,    # gradient elements per program
):  # fmt: skip
    """Program (i, l) sums block i of layer l's [∂W | ∂b] over its partial rows, in
    order, and updates those elements of Wₗ and bₗ; program (0, 0) sums the loss."""
    block = tl.program_id(0)
    which = tl.program_id(1)
    if (block == 0) & (which == 0):
        total = tl.load(terms_ptr)
        for p in range(1, term_programs):
            total += tl.load(terms_ptr + p)
        loss = _divide(total, gpu.float64_argument(divisor, total))
        tl.store(loss_ptr, loss.to(loss_ptr.dtype.element_ty))
    if tl.load(flag_ptr) == 0:
        index = block * BLOCK + tl.arange(0, BLOCK)
        for layer in tl.static_range(L):
            if which == layer:
                weights = widths[layer] * widths[layer + 1]
                size = weights + widths[layer + 1]
                d = tl.zeros((BLOCK,), ACC)
                for r in range(0, rows[layer]):
                    d += tl.load(partials_ptr + bases[layer] + r * size + index, mask=index < size)
                # slot indices spelled out: a tuple entry needs a constexpr index
                t_w = tl.load(steps_in_ptr + 2 * layer).to(tl.float64) + 1.0
                _update_slice(
                    parameters[2 * layer], state_a[2 * layer], state_b[2 * layer], index,
                    index < weights, d, hyper_ptr + 2 * layer * HYPER_ROW, t_w, RULE, ACC,
                )  # fmt: skip
                if RULE != SGD:  # one program per parameter advances its step count
                    step_w = steps[2 * layer]
                    tl.store(step_w, t_w.to(step_w.dtype.element_ty), mask=block == 0)
                if (BIASES >> layer) & 1:
                    t_b = tl.load(steps_in_ptr + 2 * layer + 1).to(tl.float64) + 1.0
                    in_bias = (index >= weights) & (index < size)
                    _update_slice(
                        parameters[2 * layer + 1], state_a[2 * layer + 1],
                        state_b[2 * layer + 1], index - weights, in_bias, d,
                        hyper_ptr + (2 * layer + 1) * HYPER_ROW, t_b, RULE, ACC,
                    )  # fmt: skip
                    if RULE != SGD:
                        step_b = steps[2 * layer + 1]
                        tl.store(step_b, t_b.to(step_b.dtype.element_ty), mask=block == 0)


# ---------------------------------------------------------------------------
# Launcher
# ---------------------------------------------------------------------------
class OptimizerState(NamedTuple):
    """What the update kernel reads and writes of the optimizer, per parameter slot
    W₁, b₁, W₂, … (2L slots; a layer without bias fills its b slot with its W)."""

    rule: str  # "sgd", "adam" or "adamw"
    state_a: tuple  # momentum buffers or Adam's m, else the parameters
    state_b: tuple  # Adam's v, else the parameters
    steps: tuple  # Adam's step-count tensors on the device, else dummies
    hyper: torch.Tensor  # (2L, HYPER_COLUMNS) float64 on the device
    flag: torch.Tensor  # (2,) int64: [1, a class index] once one fell outside [0, C)


def supports(output_width: int) -> bool:
    """Whether the loss kernel takes a network with this many outputs."""
    return output_width <= WIDEST_OUTPUT


def train_step(x, y, weights, biases, activations, state: OptimizerState, loss: str, mean: bool,
               *, tf32: bool = False) -> torch.Tensor:  # fmt: skip
    """One step: forward, the loss gradient, backward and the update of ``weights``
    and ``biases`` (and ``state``) in place; returns the 0-dim loss before the update.

    2L + 2 launches (L + 3 where the forward is fused), no host sync and no torch
    compute op. ``x`` (M, K₀) and ``y`` must be checked by the caller (see
    ``FusedTrainer``), M ≥ 1; the parameters and the state must be contiguous, since
    the update writes them in place.
    """
    weights, biases, parsed = gpu.checked(x, weights, biases, activations)
    acc, precision = gpu.accumulator_dtype(x.dtype), gpu.precision_of(x.dtype, tf32)
    with gpu.device_guard(x.device):
        saved = gpu.checked_forward(x, weights, biases, activations, parsed, tf32=tf32)
        output = saved[len(weights) - 1]
        g = torch.empty_like(output)
        terms, steps_in, divisor = _loss_grad(output, y, g, state, loss, mean, acc)
        shapes = gpu.layered_workspaces(x, weights)
        flat, partials, bases = _partials(x, shapes)
        layers = split_saved(saved, [p.activation.reads_input for p in parsed])
        gpu.layered_backward(g, x, weights, parsed, layers, None, acc, precision, partials)
        loss_value = output.new_empty(())
        _update(weights, biases, state, flat, bases, shapes, steps_in, terms, loss_value,
                divisor, x, acc)  # fmt: skip
    return loss_value


def _loss_grad(output, y, g, state: OptimizerState, loss: str, mean: bool, acc):
    M, C = output.shape
    BC = max(2, next_power_of_2(C))
    BM = max(1, min(next_power_of_2(M), LOSS_TILE // BC))
    programs = cdiv(M, BM)
    terms = output.new_empty(programs, dtype=_acc_dtype(output.dtype))
    adam = state.rule != "sgd"
    steps_in = output.new_empty(len(state.steps), dtype=torch.float64)
    divisor = float((M if loss == "cross_entropy" else M * C) if mean else 1)
    _loss_grad_kernel[(programs,)](
        output,
        y,
        g,
        terms,
        state.flag,
        state.steps,
        steps_in,
        M,
        C,
        divisor,
        LOSS=LOSSES.index(loss),
        STEPS=len(state.steps) if adam else 0,
        ACC=acc,
        BM=BM,
        BC=BC,
        num_warps=4,
        enable_fp_fusion=gpu.FP_FUSION,
    )
    return terms, steps_in, divisor


def _partials(x, shapes) -> tuple[torch.Tensor, list[torch.Tensor], tuple[int, ...]]:
    """One flat workspace for every layer's partial sums, its view per layer, and where
    each layer's starts."""
    bases, size = [], 0
    for rows, width in shapes:
        bases.append(size)
        size += rows * width
    gpu.check_offsets("the training step's gradient workspace", size)
    flat = x.new_empty(size, dtype=_acc_dtype(x.dtype))
    views = [
        flat[base : base + rows * width].view(rows, width)
        for base, (rows, width) in zip(bases, shapes, strict=True)
    ]
    return flat, views, tuple(bases)


def _update(weights, biases, state, flat, bases, shapes, steps_in, terms, loss_value,
            divisor, x, acc) -> None:  # fmt: skip
    pairs = zip(weights, biases, strict=True)
    params = tuple(p for w, b in pairs for p in (w, w if b is None else b))
    widths = (x.shape[1], *(w.shape[0] for w in weights))
    largest = max(width for _, width in shapes)
    _update_kernel[(cdiv(largest, UPDATE_BLOCK), len(weights))](
        flat,
        params,
        state.state_a,
        state.state_b,
        state.hyper,
        state.steps,
        steps_in,
        state.flag,
        terms,
        loss_value,
        terms.shape[0],
        divisor,
        widths,
        bases,
        tuple(rows for rows, _ in shapes),
        L=len(weights),
        BIASES=gpu.packed((b is not None for b in biases), 1),
        RULE=OPTIMIZERS.index(state.rule),
        ACC=acc,
        BLOCK=UPDATE_BLOCK,
        num_warps=4,
        enable_fp_fusion=gpu.FP_FUSION,
    )


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32
