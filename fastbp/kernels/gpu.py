r"""GPU kernels: the reference's forward and backward in Triton, with the same contracts.

The math is the one written out in ``reference.py``. Per layer, with W in
``nn.Linear``'s (out, in) layout, x (M, K), W (N, K)::

    forward     a = act(x Wᵀ + b)       one tiled GEMM; bias and activation in its epilogue
    backward    δ = g ⊙ act'(·)         never stored: recomputed where g is loaded, from
                                        a (identity, relu, sigmoid, tanh) or z (the others)
                ∂L/∂x = δ W             a GEMM over N whose loads of g turn into δ
                ∂L/∂W = δᵀ x            a GEMM over the batch M, split over M when the
                ∂L/∂b = Σ_batch δ       layer is small and the batch long; ∂b is summed
                                        from the same δ tiles, no extra pass

Every GEMM accumulates in float32 (float64 for float64 inputs); float16 and
bfloat16 are loaded, stored and fed to ``tl.dot`` in their own dtype. For
float32, ``precision`` is "ieee" or "tf32" (the launcher follows torch's
``torch.backends.cuda.matmul.allow_tf32``); it means nothing to other dtypes.

Two ways to run a network:

- **fused** (every layer output at most ``FUSED_MAX_WIDTH`` wide, as in the
  64×1000×100×10 network): one launch runs the whole forward and one the whole
  backward. Each program owns ``BM`` rows of the batch and keeps its activations
  in registers from layer to layer, the idea of tiny-cuda-nn's fully fused MLP;
  the first layer, whose input may be wide, loops over its input in ``BK``
  chunks. Widths are padded to one power of two ``H``; masks keep the padding
  out of every result. Outputs are still stored, since backward needs them.
- **layered**: two launches per layer, tiled like Triton's matmul tutorial, for
  wider layers: forward, and backward, whose programs split between tiles of ∂W
  (with ∂b) and tiles of ∂x, which read the same δ and need nothing of each other.

Weight gradients are sums over the batch, so programs that own different rows
produce partial sums. Each program accumulates its own slice of a workspace
(rows of ``(programs, parameters)``) and ``_sum_partials`` adds them in a fixed
order: deterministic, no atomics, nothing to zero first. With one program the
kernel writes the gradients straight into their final buffer.

Launch cost: the block sizes, grids and gradient offsets of a shape are
computed once (``functools.lru_cache``); a call does no host sync and no
``.item()``, and every buffer comes from torch's caching allocator, so a
training step of these kernels can be captured in a CUDA graph. Block sizes are
chosen by rule, not autotuned: several autotune configs break the CPU
interpreter, and a launch-bound workload pays the autotuner's per-call lookup.

This module imports torch because Triton launches on torch tensors; it is
imported only when the "triton" backend is asked for. Under ``TRITON_INTERPRET=1``
(set before triton is imported) the same kernels run on CPU tensors, with the
interpreter's block sizes (all ≥ 16: ``tl.dot`` needs that on a GPU even where
the interpreter does not).
"""

from __future__ import annotations

import contextlib
import functools
import os
import warnings
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .activation_table import CODE_BITS, CODES, parse, split_saved
from .utils import cdiv, check_one_per_layer, next_power_of_2

# Globals a kernel reads must be tl.constexpr.
IDENTITY, RELU, SIGMOID, TANH, LEAKY_RELU, GELU, GELU_TANH, SILU, SOFTPLUS, ELU = map(
    tl.constexpr, CODES
)  # the table's order, as fastbp/kernels/activation_table.py names them
# The fused kernels take every layer's activation code packed in one constexpr int:
# as many bits each as the table needs, so that a longer table cannot be misread.
ACT_BITS = CODE_BITS
# The fused kernels run the activations whose derivative reads the output alone and
# that have no parameter; a network with another one takes the layered kernels.
FUSED_ACTIVATIONS = tuple(int(code) for code in (IDENTITY, RELU, SIGMOID, TANH))
DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FUSED_MAX_WIDTH = 128  # widest layer output the fused kernels keep in registers
INTERPRETING = os.environ.get("TRITON_INTERPRET") == "1"
PARAMETERS_AS_FLOATS = tl.constexpr(INTERPRETING)  # see float64_argument
INT32_MAX = 2**31 - 1  # the kernels' offsets are int32: no tensor may span more
# a·b + c as one FMA, one rounding: Triton's default through 3.9, which 3.10 turns
# off; named at every launch so that results do not change with Triton's version.
FP_FUSION = True


# ---------------------------------------------------------------------------
# Element-wise pieces, inlined into the GEMMs' loads and epilogues
# ---------------------------------------------------------------------------
# Activations whose derivative reads z (the table's reads_input): forward keeps z.
@triton.jit
def _reads_z(ACT: tl.constexpr):
    return ACT >= LEAKY_RELU


@triton.jit
def _tanh(z):
    # tanh z = sign(z)(1 − e^{−2|z|}) / (1 + e^{−2|z|}): no overflow for any z, and no
    # libdevice call, which the interpreter cannot run.
    t = tl.exp(-2.0 * tl.abs(z))
    r = (1.0 - t) / (1.0 + t)
    return tl.where(z < 0, -r, r)


@triton.jit
def sigmoid(z):
    return 1.0 / (1.0 + tl.exp(-z))


@triton.jit
def _expm1(z):
    """eᶻ − 1 without the cancellation near 0 (Kahan: (u − 1)·z/log u, u = eᶻ)."""
    u = tl.exp(z)
    ends = (u == 1.0) | (u == 0.0)  # z itself, or −1: where the quotient would be 0/0
    quotient = (u - 1.0) * (z / tl.log(tl.where(ends, 2.0, u)))
    return tl.where(u == 1.0, z, tl.where(u == 0.0, -1.0, quotient))


@triton.jit
def log1p(t):
    """log(1 + t) without the cancellation for small t (Goldberg: log(u)·t/(u − 1))."""
    u = 1.0 + t
    return tl.where(u == 1.0, t, tl.log(u) * (t / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def float64_argument(p, z):
    """An activation parameter (a float64 argument) in z's dtype, as torch takes it. The
    interpreter passes the Python float itself, which tl.cast would round to float32 on
    the way; arithmetic with z keeps it in z's dtype there."""
    if PARAMETERS_AS_FLOATS:
        return p
    else:
        return p.to(z.dtype)


@triton.jit
def _gelu_tanh_t(z):
    return _tanh(0.7978845608028654 * (z + 0.044715 * z * z * z))


@triton.jit
def _activate(z, ACT: tl.constexpr, P0, P1):
    """act(z); P0, P1 are the activation's parameters (the table's order), taken in z's
    dtype as torch takes them (the fused kernels pass none: their branches never read them)."""
    if ACT == RELU:
        return tl.where(z < 0, 0.0, z)  # NaN < 0 is False: NaN stays NaN, as in torch
    elif ACT == SIGMOID:
        return sigmoid(z)
    elif ACT == TANH:
        return _tanh(z)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0, z, z * float64_argument(P0, z))
    # The branch not taken is clamped by tl.where, not tl.minimum, which would turn a
    # NaN into the bound: torch gives NaN there.
    elif ACT == ELU:
        return tl.where(z > 0, z, float64_argument(P0, z) * _expm1(tl.where(z > 0, 0.0, z)))
    elif ACT == SOFTPLUS:
        beta, threshold = float64_argument(P0, z), float64_argument(P1, z)
        scaled = z * beta
        above = scaled > threshold
        return tl.where(above, z, log1p(tl.exp(tl.where(above, threshold, scaled))) / beta)
    elif ACT == SILU:
        return z / (1.0 + tl.exp(-z))
    elif ACT == GELU:
        return z * (1.0 + tl.erf(z * 0.7071067811865476)) * 0.5
    elif ACT == GELU_TANH:
        return z * (1.0 + _gelu_tanh_t(z)) * 0.5
    else:
        return z


@triton.jit
def _delta(g, a, z, ACT: tl.constexpr, P0, P1):
    """δ = g ⊙ act'(z): from the saved output a for relu, sigmoid and tanh, from z else;
    P0, P1 as in ``_activate``."""
    if ACT == RELU:
        return tl.where(a <= 0, 0.0, g)  # a select, as torch's threshold_backward
    elif ACT == SIGMOID:
        return g * (1.0 - a) * a
    elif ACT == TANH:
        return g * (1.0 - a * a)
    elif ACT == LEAKY_RELU:
        return tl.where(z > 0, g, g * float64_argument(P0, z))
    elif ACT == ELU:
        return tl.where(z > 0, g, g * float64_argument(P0, z) * tl.exp(tl.where(z > 0, 0.0, z)))
    elif ACT == SOFTPLUS:
        scaled = z * float64_argument(P0, z)
        return tl.where(scaled > float64_argument(P1, z), g, g * sigmoid(scaled))
    elif ACT == SILU:
        s = sigmoid(z)
        return g * s * (1.0 + z * (1.0 - s))
    elif ACT == GELU:
        cdf = (1.0 + tl.erf(z * 0.7071067811865476)) * 0.5
        return g * (cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z))
    elif ACT == GELU_TANH:
        t = _gelu_tanh_t(z)
        inner = 0.7978845608028654 * (1.0 + 3 * 0.044715 * z * z)
        return g * ((1.0 + t) * 0.5 + z * 0.5 * (1.0 - t * t) * inner)
    else:
        return g


@triton.jit
def _epilogue(acc, b_ptr, cols, n, HAS_BIAS: tl.constexpr, ACT: tl.constexpr, P0, P1):
    """(z, act(z)) of an accumulator tile, with the bias added."""
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < n, other=0.0).to(acc.dtype)[None, :]
    return acc, _activate(acc, ACT, P0, P1)


# ---------------------------------------------------------------------------
# Layered kernels: one layer at a time, any widths
# ---------------------------------------------------------------------------
@triton.jit
def _layer_forward_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, z_ptr, M, N, K, stride_xm, stride_xk,
    P0: tl.float64, P1: tl.float64,
    HAS_BIAS: tl.constexpr, ACT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """out[M, N] = act(x[M, K] W[N, K]ᵀ + b), and z = x Wᵀ + b into z_ptr where act's
    derivative reads it; one (BM, BN) tile of out per program."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    cols = tl.program_id(1) * BN + tl.arange(0, BN)
    ks = tl.arange(0, BK)
    acc = tl.zeros((BM, BN), ACC)
    for k0 in range(0, K, BK):
        k = k0 + ks
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
            mask=(rows[:, None] < M) & (k[None, :] < K),
            other=0.0,
        )
        w_t = tl.load(
            w_ptr + cols[None, :] * K + k[:, None],
            mask=(cols[None, :] < N) & (k[:, None] < K),
            other=0.0,
        )
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION, out_dtype=ACC)
    z, a = _epilogue(acc, b_ptr, cols, N, HAS_BIAS, ACT, P0, P1)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], a.to(out_ptr.dtype.element_ty), mask=mask)
    if _reads_z(ACT):
        tl.store(z_ptr + rows[:, None] * N + cols[None, :], z.to(z_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_delta(
    g_ptr, a_ptr, z_ptr, rows, cols, M, N, stride_gm, stride_gn, P0, P1,
    ACT: tl.constexpr, ACC: tl.constexpr,
):  # fmt: skip
    """A (rows, cols) tile of δ = g ⊙ act'(z), from a or (where act' reads it) z;
    zero outside (M, N)."""
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    g = tl.load(g_ptr + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0)
    # Where act' reads z, a is not read: z stands in for it. Outside (M, N) g is 0, and
    # so is δ, since every act' is finite at 0.
    saved_ptr = z_ptr if _reads_z(ACT) else a_ptr
    saved = tl.load(saved_ptr + rows[:, None] * N + cols[None, :], mask=mask, other=0.0).to(ACC)
    return _delta(g.to(ACC), saved, saved, ACT, P0, P1)


@triton.jit
def _grad_input_tile(
    g_ptr, a_ptr, z_ptr, w_ptr, dx_ptr, tile_m, tile_k, M, N, K, stride_gm, stride_gn, P0, P1,
    ACT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """Tile (tile_m, tile_k) of dx[M, K] = δ[M, N] W[N, K], looping over N."""
    rows = tile_m * BM + tl.arange(0, BM)
    ks = tile_k * BK + tl.arange(0, BK)
    ns = tl.arange(0, BN)
    acc = tl.zeros((BM, BK), ACC)
    for n0 in range(0, N, BN):
        n = n0 + ns
        delta = _load_delta(
            g_ptr, a_ptr, z_ptr, rows, n, M, N, stride_gm, stride_gn, P0, P1, ACT, ACC
        )
        w = tl.load(
            w_ptr + n[:, None] * K + ks[None, :],
            mask=(n[:, None] < N) & (ks[None, :] < K),
            other=0.0,
        )
        acc = tl.dot(delta.to(w.dtype), w, acc, input_precision=PRECISION, out_dtype=ACC)
    mask = (rows[:, None] < M) & (ks[None, :] < K)
    tl.store(dx_ptr + rows[:, None] * K + ks[None, :], acc.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _grad_weight_tile(
    g_ptr, a_ptr, z_ptr, x_ptr, out_ptr, tile_n, tile_k, split, M, N, K,
    stride_gm, stride_gn, stride_xm, stride_xk, rows_per_split, P0, P1,
    ACT: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP: tl.constexpr,
):  # fmt: skip
    """Tile (tile_n, tile_k) of row ``split`` of out (splits, N·K + N) = [δᵀx | Σδ]
    over that split's batch rows; the tiles with tile_k = 0 also store ∂b, summed
    from the same δ tiles."""
    cols = tile_n * BN + tl.arange(0, BN)
    ks = tile_k * BK + tl.arange(0, BK)
    acc = tl.zeros((BN, BK), ACC)
    bias_acc = tl.zeros((BN,), ACC)
    start = split * rows_per_split
    stop = tl.minimum(start + rows_per_split, M)
    # Blocked summation: each group of GROUP row blocks is summed into a fresh
    # accumulator, then added to acc, so float32 rounding grows with GROUP·BM plus the
    # number of groups, not with the split's rows. One chain over 2048 rows was 3.2x
    # less accurate than cuBLAS at batch 4096 on an H200; 64-row chains matched it.
    # (acc += tl.dot(..., zeros) would not do: Triton folds it into tl.dot(..., acc).)
    for group in range(start, stop, GROUP * BM):
        part = tl.zeros((BN, BK), ACC)
        bias_part = tl.zeros((BN,), ACC)
        for m0 in range(group, tl.minimum(group + GROUP * BM, stop), BM):
            rows = m0 + tl.arange(0, BM)
            delta = _load_delta(
                g_ptr, a_ptr, z_ptr, rows, cols, M, N, stride_gm, stride_gn, P0, P1, ACT, ACC
            )
            x = tl.load(
                x_ptr + rows[:, None] * stride_xm + ks[None, :] * stride_xk,
                mask=(rows[:, None] < M) & (ks[None, :] < K),
                other=0.0,
            )
            part = tl.dot(
                tl.trans(delta.to(x.dtype)), x, part, input_precision=PRECISION, out_dtype=ACC
            )
            bias_part += tl.sum(delta, axis=0)
        acc += part
        bias_acc += bias_part
    out = out_ptr + split * (N * K + N)
    mask = (cols[:, None] < N) & (ks[None, :] < K)
    tl.store(out + cols[:, None] * K + ks[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)
    bias_columns = tl.where(tile_k == 0, N, 0)  # ∂b from the first K tile only
    tl.store(out + N * K + cols, bias_acc.to(out_ptr.dtype.element_ty), mask=cols < bias_columns)


@triton.jit
def _layer_backward_kernel(
    g_ptr,                  # (M, N) ∂L/∂a of this layer's output, strides stride_g*
    a_ptr,                  # (M, N) contiguous saved output a (δ = g ⊙ act'(a))
    z_ptr,                  # (M, N) contiguous saved z where act' reads it, else a_ptr
    w_ptr,                  # (N, K) contiguous weight
    x_ptr,                  # (M, K) this layer's input, strides stride_x*
    dx_ptr,                 # (M, K) contiguous ∂L/∂x, written by the ∂x programs
    out_ptr,                # (splits, N·K + N) partial [∂W | ∂b], one row per split
    M, N, K,
    stride_gm, stride_gn,
    stride_xm, stride_xk,
    rows_per_split,         # batch rows each split sums, a multiple of BM
    weight_programs,        # the first programs, which compute ∂W: the rest compute ∂x
    P0: tl.float64,         # the activation's parameters: as given, in float64 (a
    P1: tl.float64,         # float argument is float32 otherwise); used in acc's dtype
    ACT: tl.constexpr,      # activation code
    ACC: tl.constexpr,      # accumulation dtype: float32, or float64 for float64
    PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" or "tf32"
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,  # tiles: (BN, BK) of ∂W, (BM, BK) of dx
    GROUP: tl.constexpr,    # row blocks per fresh accumulator (blocked summation)
):  # fmt: skip
    """One layer's backward in one launch: both products read the same δ and neither
    needs the other, so the programs split between them.

    Programs [0, weight_programs) each own a (BN, BK) tile of one split's partial
    [∂W | ∂b]; the programs after them each own a (BM, BK) tile of dx.
    """
    pid = tl.program_id(0)
    k_tiles = tl.cdiv(K, BK)
    if pid < weight_programs:
        tiles = tl.cdiv(N, BN) * k_tiles
        tile = pid % tiles
        _grad_weight_tile(
            g_ptr, a_ptr, z_ptr, x_ptr, out_ptr, tile // k_tiles, tile % k_tiles, pid // tiles,
            M, N, K, stride_gm, stride_gn, stride_xm, stride_xk, rows_per_split, P0, P1,
            ACT, ACC, PRECISION, BM, BN, BK, GROUP,
        )  # fmt: skip
    else:
        tile = pid - weight_programs
        _grad_input_tile(
            g_ptr, a_ptr, z_ptr, w_ptr, dx_ptr, tile // k_tiles, tile % k_tiles, M, N, K,
            stride_gm, stride_gn, P0, P1, ACT, ACC, PRECISION, BM, BN, BK,
        )  # fmt: skip


@triton.jit
def _sum_partials_kernel(partials_ptr, out_ptr, P, T, BLOCK: tl.constexpr):
    """out[t] = Σ_p partials[p, t], in a fixed order."""
    t = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    acc = tl.zeros((BLOCK,), partials_ptr.dtype.element_ty)
    for p in range(0, P):
        acc += tl.load(partials_ptr + p * T + t, mask=t < T, other=0.0)
    tl.store(out_ptr + t, acc.to(out_ptr.dtype.element_ty), mask=t < T)


# ---------------------------------------------------------------------------
# Fused kernels: the whole narrow network, one launch forward and one backward
# ---------------------------------------------------------------------------
@triton.jit
def _mlp_forward_kernel(
    x_ptr,                  # (M, K₀) input, strides stride_x*
    weights,                # tuple of L contiguous (Nₗ, Kₗ) weights
    biases,                 # tuple of L (Nₗ,) biases (a layer without one: any pointer)
    outputs,                # tuple of L contiguous (M, Nₗ) outputs, written
    widths,                 # (K₀, N₀, …, N_{L-1})
    M,                      # batch rows
    stride_xm, stride_xk,
    L: tl.constexpr,        # layers
    ACTS: tl.constexpr,     # activation codes, ACT_BITS per layer
    ACT_BITS: tl.constexpr,
    BIASES: tl.constexpr,   # bit l: layer l has a bias
    ACC: tl.constexpr,      # accumulation dtype: float32, or float64 for float64
    PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" or "tf32"
    BM: tl.constexpr,       # rows per program
    BK: tl.constexpr,       # the first layer's input columns per step
    H: tl.constexpr,        # every layer's width, padded to a power of 2
):  # fmt: skip
    """outputs[l] = actₗ(aₗ₋₁ Wₗᵀ + bₗ) for BM rows, every layer in registers."""
    rows = tl.program_id(0) * BM + tl.arange(0, BM)
    hs = tl.arange(0, H)
    ks = tl.arange(0, BK)
    row_mask = rows[:, None] < M
    acc = tl.zeros((BM, H), ACC)
    for k0 in range(0, widths[0], BK):
        k = k0 + ks
        x = tl.load(
            x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
            mask=row_mask & (k[None, :] < widths[0]),
            other=0.0,
        )
        w_t = tl.load(
            weights[0] + hs[None, :] * widths[0] + k[:, None],
            mask=(hs[None, :] < widths[1]) & (k[:, None] < widths[0]),
            other=0.0,
        )
        acc = tl.dot(x, w_t, acc, input_precision=PRECISION, out_dtype=ACC)
    for layer in tl.static_range(L):
        if layer > 0:
            n_in = widths[layer]
            w_t = tl.load(
                weights[layer] + hs[None, :] * n_in + hs[:, None],
                mask=(hs[None, :] < widths[layer + 1]) & (hs[:, None] < n_in),
                other=0.0,
            )
            h_in = h  # noqa: F821 (h: the previous unrolled layer's output)
            acc = tl.dot(
                h_in, w_t, tl.zeros((BM, H), ACC), input_precision=PRECISION, out_dtype=ACC
            )
        # constexpr bits: bit l of BIASES, bits ACT_BITS·l… of ACTS (FUSED_ACTIVATIONS:
        # no parameters)
        _, a = _epilogue(
            acc,
            biases[layer],
            hs,
            widths[layer + 1],
            (BIASES >> layer) & 1,
            (ACTS >> (ACT_BITS * layer)) & ((1 << ACT_BITS) - 1),
            0.0,
            0.0,
        )
        out = outputs[layer]
        n_out = widths[layer + 1]
        # Padded lanes hold act(x·0), NaN where x has an inf; the next layer's zero
        # weights would multiply that NaN into every real lane, so zero them.
        h = tl.where(hs[None, :] < n_out, a, 0.0)
        h = h.to(out.dtype.element_ty)  # the next layer reads what backward will read
        tl.store(
            out + rows[:, None] * n_out + hs[None, :], h, mask=row_mask & (hs[None, :] < n_out)
        )


@triton.jit
def _accumulate(ptr, value, mask, again):
    """*ptr += value, or *ptr = value on a program's first row block (no zeroing pass)."""
    # Other threads of this program stored *ptr for the last row block: the barrier
    # makes their stores visible (the interpreter, one thread, cannot show the race).
    tl.debug_barrier()
    previous = tl.where(again, tl.load(ptr, mask=mask, other=0.0), 0.0)
    tl.store(ptr, (previous + value).to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _mlp_backward_kernel(
    g_ptr,                  # (M, N_{L-1}) ∂L/∂a of the last layer, strides stride_g*
    x_ptr,                  # (M, K₀) the network's input, strides stride_x*
    weights,                # tuple of L contiguous (Nₗ, Kₗ) weights
    outputs,                # tuple of L contiguous (M, Nₗ) saved outputs aₗ
    dx_ptr,                 # (M, K₀) ∂L/∂x, written when NEEDS_DX (else a dummy)
    grads_ptr,              # (P, T) one row of [∂W | ∂b] partial sums per program
    widths,                 # (K₀, N₀, …, N_{L-1})
    offsets,                # where layer l's [∂Wₗ | ∂bₗ] starts in a row of grads
    M,                      # batch rows
    T,                      # a grads row's length: every parameter of the network
    stride_gm, stride_gn,
    stride_xm, stride_xk,
    L: tl.constexpr,        # layers
    ACTS: tl.constexpr,     # activation codes, ACT_BITS per layer
    ACT_BITS: tl.constexpr,
    NEEDS_DX: tl.constexpr,
    ACC: tl.constexpr,      # accumulation dtype: float32, or float64 for float64
    PRECISION: tl.constexpr,  # tl.dot's input_precision: "ieee" or "tf32"
    BM: tl.constexpr,       # rows per block
    BK: tl.constexpr,       # the first layer's input columns per step
    H: tl.constexpr,        # every layer's width, padded to a power of 2
):  # fmt: skip
    """Every layer's backward for BM rows at a time, ∂L/∂aₗ carried in registers.

    Program p walks row blocks p, p + P, … and accumulates its parameter
    gradients into row p of grads (P, T); ``offsets[l]`` is where layer l's
    [∂Wₗ | ∂bₗ] starts in a row.
    """
    hs = tl.arange(0, H)
    ks = tl.arange(0, BK)
    programs = tl.num_programs(0)
    grads = grads_ptr + tl.program_id(0) * T
    for block in range(tl.program_id(0), tl.cdiv(M, BM), programs):
        again = block != tl.program_id(0)
        rows = block * BM + tl.arange(0, BM)
        row_mask = rows[:, None] < M
        n_last = widths[L]
        g = tl.load(
            g_ptr + rows[:, None] * stride_gm + hs[None, :] * stride_gn,
            mask=row_mask & (hs[None, :] < n_last),
            other=0.0,
        ).to(ACC)
        for layer in tl.static_range(L - 1, -1, -1):
            n_in, n_out = widths[layer], widths[layer + 1]
            out_mask = row_mask & (hs[None, :] < n_out)
            a = tl.load(
                outputs[layer] + rows[:, None] * n_out + hs[None, :], mask=out_mask, other=0.0
            )
            # Zeroed padded lanes, as in the forward: g there is δ·0, NaN beside an inf.
            delta = tl.where(
                hs[None, :] < n_out,
                _delta(
                    g,
                    a.to(ACC),
                    a.to(ACC),
                    (ACTS >> (ACT_BITS * layer)) & ((1 << ACT_BITS) - 1),
                    0.0,
                    0.0,
                ),
                0.0,
            )
            _accumulate(
                grads + offsets[layer] + n_out * n_in + hs, tl.sum(delta, axis=0), hs < n_out, again
            )
            delta = delta.to(a.dtype)
            if layer > 0:
                a_in = tl.load(
                    outputs[layer - 1] + rows[:, None] * n_in + hs[None, :],
                    mask=row_mask & (hs[None, :] < n_in),
                    other=0.0,
                )
                w_mask = (hs[:, None] < n_out) & (hs[None, :] < n_in)
                grad_w = tl.dot(
                    tl.trans(delta),
                    a_in,
                    tl.zeros((H, H), ACC),
                    input_precision=PRECISION,
                    out_dtype=ACC,
                )
                _accumulate(
                    grads + offsets[layer] + hs[:, None] * n_in + hs[None, :], grad_w, w_mask, again
                )
                w = tl.load(
                    weights[layer] + hs[:, None] * n_in + hs[None, :], mask=w_mask, other=0.0
                )
                g = tl.dot(
                    delta, w, tl.zeros((BM, H), ACC), input_precision=PRECISION, out_dtype=ACC
                )
            else:
                for k0 in range(0, n_in, BK):
                    k = k0 + ks
                    x = tl.load(
                        x_ptr + rows[:, None] * stride_xm + k[None, :] * stride_xk,
                        mask=row_mask & (k[None, :] < n_in),
                        other=0.0,
                    )
                    # names of their own: a name the unrolled layers above used
                    # would become a loop-carried variable of another shape
                    chunk_mask = (hs[:, None] < n_out) & (k[None, :] < n_in)
                    grad_chunk = tl.dot(
                        tl.trans(delta),
                        x,
                        tl.zeros((H, BK), ACC),
                        input_precision=PRECISION,
                        out_dtype=ACC,
                    )
                    _accumulate(
                        grads + offsets[0] + hs[:, None] * n_in + k[None, :],
                        grad_chunk,
                        chunk_mask,
                        again,
                    )
                    if NEEDS_DX:
                        w_chunk = tl.load(
                            weights[0] + hs[:, None] * n_in + k[None, :], mask=chunk_mask, other=0.0
                        )
                        dx = tl.dot(
                            delta,
                            w_chunk,
                            tl.zeros((BM, BK), ACC),
                            input_precision=PRECISION,
                            out_dtype=ACC,
                        )
                        dx_mask = row_mask & (k[None, :] < n_in)
                        tl.store(
                            dx_ptr + rows[:, None] * n_in + k[None, :],
                            dx.to(dx_ptr.dtype.element_ty),
                            mask=dx_mask,
                        )


# ---------------------------------------------------------------------------
# Launch plans: block sizes, grids and offsets, computed once per shape
# ---------------------------------------------------------------------------
def _next_power_of_2(n: int, floor: int = 16) -> int:
    return max(floor, next_power_of_2(n))


def interpreted(device: torch.device) -> bool:
    """Whether tensors on ``device`` run in the interpreter: it gets small blocks.
    (Public, as the plans below, for the tests and the sm_90 compile check.)"""
    return device.type != "cuda"


@functools.cache
def multiprocessors(device: torch.device) -> int:
    """The programs a launch may keep busy: the GPU's SMs."""
    if interpreted(device):
        return 2  # the interpreter: few programs, so small tests reach every partial-sum path
    return torch.cuda.get_device_properties(device).multi_processor_count


class Blocks(NamedTuple):
    BM: int
    BN: int
    BK: int
    num_warps: int
    maxnreg: int | None  # the backward's registers per thread, where ptxas must be told


def _layer_blocks(dtype: torch.dtype, interpreting: bool, precision: str = "ieee") -> Blocks:
    """64×64 output tiles over 8 warps: with 4, ptxas spilled 56-228 bytes per thread in
    float32's ∂x and ∂W kernels (IEEE and TF32) and 72 in bfloat16's ∂W (sm_90,
    Triton 3.8), since each thread then holds 32 accumulators beside its operands.

    In float32 (IEEE) the backward, ∂W and ∂x in one kernel, is capped at 128 registers:
    left to itself, ptxas gave some activations' variants 64-80 registers and spilled
    48-68 bytes (identity with 3 pipeline stages, elu with 2), where 128 spill nothing.
    """
    if interpreting:
        return Blocks(16, 32, 16, 1, None)
    if dtype.itemsize == 2:
        return Blocks(64, 64, 64, 8, None)
    ieee = dtype == torch.float32 and precision == "ieee"
    return Blocks(64, 64, 32, 8, 128 if ieee else None)


class FusedPlan(NamedTuple):
    widths: tuple[int, ...]
    offsets: tuple[int, ...]  # where layer l's [∂W | ∂b] starts in a gradient row
    size: int  # T, every parameter's gradient (every bias slot included)
    H: int
    BM: int
    BK: int
    programs: int  # backward programs: each sums its own row of the workspace
    num_warps: int


@functools.lru_cache(maxsize=1024)
def fused_plan(widths: tuple[int, ...], batch: int, device: torch.device) -> FusedPlan:
    """Blocks, programs and gradient offsets of the fused kernels for one network shape."""
    interpreting = interpreted(device)
    H = _next_power_of_2(max(widths[1:]))
    BM = 16 if interpreting else (32 if batch <= 32 or H > 64 else 64)
    offsets, size = [], 0
    for n_in, n_out in zip(widths, widths[1:], strict=False):
        offsets.append(size)
        size += n_out * n_in + n_out
    blocks = cdiv(batch, BM)
    programs = min(blocks, multiprocessors(device))
    num_warps = 1 if interpreting else (8 if H > 64 else 4)
    return FusedPlan(
        widths, tuple(offsets), size, H, BM, 16 if interpreting else 32, programs, num_warps
    )


# Row blocks summed per partial ∂W accumulator (see _grad_weight_tile).
SUM_GROUP = 2
# Software-pipeline stages of the layered backward: with Triton's default 3, ptxas
# held the identity's float32 ∂W variant to 64 registers and spilled 32-36 bytes
# (sm_90, Triton 3.8 and 3.9); with 2 it takes 73 and spills nothing.
GRAD_WEIGHT_STAGES = 2


class SplitPlan(NamedTuple):
    splits: int
    rows_per_split: int


@functools.lru_cache(maxsize=1024)
def _split_plan(M: int, N: int, K: int, blocks: Blocks, device: torch.device) -> SplitPlan:
    """Split ∂W = δᵀx over the batch until the tiles fill the GPU twice over."""
    tiles = cdiv(N, blocks.BN) * cdiv(K, blocks.BK)
    row_blocks = cdiv(M, blocks.BM)
    splits = max(1, min(row_blocks, (2 * multiprocessors(device)) // tiles))
    rows_per_split = cdiv(row_blocks, splits) * blocks.BM
    return SplitPlan(cdiv(M, rows_per_split), rows_per_split)


# ---------------------------------------------------------------------------
# Launchers: check, allocate, launch
# ---------------------------------------------------------------------------
def accumulator_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def precision_of(dtype: torch.dtype, tf32: bool) -> str:
    return "tf32" if tf32 and dtype == torch.float32 else "ieee"


def check_device(x: torch.Tensor) -> None:
    """A ``ValueError`` unless ``x`` is where the kernels can run."""
    if x.device.type == "cuda" or (x.device.type == "cpu" and INTERPRETING):
        return
    raise ValueError(
        f"the Triton kernels run on CUDA tensors (or on CPU tensors under TRITON_INTERPRET=1, "
        f"set before triton is imported), got x on {x.device}"
    )


def device_guard(device: torch.device):
    """Triton launches on the current CUDA device: make it ``device`` (a model on
    cuda:1 under DDP) when it is not already."""
    if device.type == "cuda" and device.index != torch.cuda.current_device():
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def check_offsets(name: str, extent) -> None:
    """A ``ValueError`` where the kernels' 32-bit offsets would overflow: ``extent`` is
    a tensor (its furthest element from its start, plus one) or a count of elements."""
    if isinstance(extent, torch.Tensor):
        extent = 1 + sum(
            (n - 1) * abs(s) for n, s in zip(extent.shape, extent.stride(), strict=True)
        )
    if extent > INT32_MAX:
        raise ValueError(
            f"{name} spans {extent:,} elements: fastbp's Triton kernels index with 32-bit "
            f"offsets, up to {INT32_MAX:,}; run the batch in smaller pieces"
        )


class Prepared(NamedTuple):
    """What a checked network's launches take every call: the parsed activations and
    the widest layer (for the per-call offset check)."""

    parsed: tuple
    widest: int


def prepare(x, weights, biases, activations) -> Prepared:
    """Check a network for the kernels, with inputs like ``x``: once per network (a
    ``plans.Plan`` keeps the result); ``check_rows`` then checks each batch."""
    check_device(x)
    if x.dtype not in DTYPES:
        raise TypeError(f"x must be one of {DTYPES}, got {x.dtype}")
    check_one_per_layer(weights, biases, activations)
    width = x.shape[1]
    for layer, (w, b) in enumerate(zip(weights, biases, strict=True)):
        if w.dim() != 2 or w.shape[1] != width or w.dtype != x.dtype or w.device != x.device:
            raise ValueError(
                f"weights[{layer}] must be (*, {width}) {x.dtype} on {x.device}, got "
                f"{tuple(w.shape)} {w.dtype} on {w.device}"
            )
        width = w.shape[0]
        if b is not None and (b.shape != (width,) or b.dtype != x.dtype or b.device != x.device):
            raise ValueError(
                f"biases[{layer}] must be ({width},) {x.dtype} on {x.device}, got "
                f"{tuple(b.shape)} {b.dtype} on {b.device}"
            )
    widest = max(x.shape[1], *(w.shape[0] for w in weights))
    return Prepared(tuple(parse(a) for a in activations), widest)


def check_rows(x, prepared: Prepared) -> None:
    """The checks of a batch that a prepared network still needs: 32-bit offsets."""
    check_offsets("x", x)
    check_offsets(f"a ({x.shape[0]}, {prepared.widest}) layer output", x.shape[0] * prepared.widest)


def checked(x, weights, biases, activations):
    """(contiguous weights, contiguous biases, parsed activations) after every check."""
    prepared = prepare(x, weights, biases, activations)
    check_rows(x, prepared)
    return contiguous(weights), contiguous(biases), prepared.parsed


def contiguous(tensors) -> list:
    """The launches index parameters as contiguous: each one, or a contiguous copy."""
    return [None if t is None else t.contiguous() for t in tensors]


def packed(values, bits: int) -> int:
    return sum(int(v) << (bits * layer) for layer, v in enumerate(values))


def fusable(weights, activations=()) -> bool:
    """Whether a network fits the fused kernels: every layer output ≤ FUSED_MAX_WIDTH
    and every activation one of FUSED_ACTIVATIONS."""
    narrow = all(w.shape[0] <= FUSED_MAX_WIDTH for w in weights)
    return narrow and all(parse(a).code in FUSED_ACTIVATIONS for a in activations)


class SpillWarning(UserWarning):
    """``fused=True`` took a fused kernel that spills registers on this path."""


def _fused_choice(fused, weights, activations, x, tf32, backward: bool) -> bool:
    """``fused`` as given (True refused where the network does not fit, and warned of
    where it spills), or, for None, ``fused_by_default``."""
    default = fused_by_default(weights, x.dtype, tf32, backward)
    if fused is None:
        return fusable(weights, activations) and default
    if fused and not fusable(weights, activations):
        raise ValueError(
            f"fused=True needs every layer output at most {FUSED_MAX_WIDTH} wide and "
            f"activations among identity, relu, sigmoid, tanh, got widths "
            f"{[w.shape[0] for w in weights]} and {[parse(a).spec for a in activations]}"
        )
    if fused and not default and not interpreted(x.device):
        kind = "backward" if backward else "forward"
        precision = "TF32" if tf32 and x.dtype == torch.float32 else str(x.dtype)[6:]
        warnings.warn(
            f"fused=True takes the fused {kind} kernel, which spills registers in "
            f"{precision} (fused_by_default says where it does not): fused=None takes "
            "the layered kernels here",
            SpillWarning,
            stacklevel=3,
        )
    return fused


def fused_by_default(weights, dtype: torch.dtype, tf32: bool, backward: bool) -> bool:
    """Whether ``fused=None`` takes the fused kernels: only where they keep every
    layer in registers, their reason to exist.

    ``tests/triton_compile_worker.py`` compiles every kernel for sm_90 and reads
    ptxas's register counts: the fused backward spills 6-9 KB per thread on tensor
    cores and 117-132 KB in float32 (IEEE) and float64, the float32 (IEEE) fused
    forward 7.6 KB (Triton 3.8) to 52 KB (3.9), and the float64 one 1.1 KB with
    Triton 3.8 (none with 3.9); the layered kernels spill nothing but in float64.
    On an H200 the spilling fused kernels
    took 1.7 ms (backward) and 196 µs (forward) of a 64x1000x100x10 step whose
    torch-eager kernels take 44 µs in all. The fused forward on tensor cores
    (float16, bfloat16, TF32) spills nothing with either: there it is the default.
    """
    tensor_cores = dtype in (torch.float16, torch.bfloat16) or (dtype == torch.float32 and tf32)
    return fusable(weights) and tensor_cores and not backward


def mlp_forward(x, weights, biases, activations, *, tf32=False, fused=None) -> list[torch.Tensor]:
    """Outputs ``[a₁, …, a_L]`` of every layer (``reference.mlp_forward``), then the z of
    each layer whose activation's derivative reads it (what ``mlp_backward`` reads).

    ``fused``: None picks the fused kernel where ``fused_by_default``; True (where
    ``fusable(weights)``) or False forces a path (the tests run both).
    """
    weights, biases, parsed = checked(x, weights, biases, activations)
    return checked_forward(x, weights, biases, activations, parsed, tf32=tf32, fused=fused)


def prepared_forward(x, weights, biases, activations, prepared: Prepared, *, tf32=False):
    """``mlp_forward`` of a network ``prepare`` checked: only ``x`` is checked here."""
    check_rows(x, prepared)
    return checked_forward(
        x, contiguous(weights), contiguous(biases), activations, prepared.parsed, tf32=tf32
    )


def checked_forward(x, weights, biases, activations, parsed, *, tf32=False, fused=None):
    """``mlp_forward`` of what ``checked`` returned (``parsed``) and the activations."""
    fused = _fused_choice(fused, weights, activations, x, tf32, backward=False)
    acc, precision = accumulator_dtype(x.dtype), precision_of(x.dtype, tf32)
    outputs = [x.new_empty(x.shape[0], w.shape[0]) for w in weights]
    kept = [x.new_empty(x.shape[0], w.shape[0]) if p.activation.reads_input else None
            for w, p in zip(weights, parsed, strict=True)]  # fmt: skip
    saved = outputs + [z for z in kept if z is not None]
    if x.shape[0] == 0:
        return saved  # no rows: nothing to launch (a grid of 0 programs is an error)
    with device_guard(x.device):
        if fused:
            codes = tuple(p.code for p in parsed)
            _launch_fused_forward(x, weights, biases, codes, outputs, acc, precision)
        else:
            layer_input = x
            layers = zip(weights, biases, parsed, outputs, kept, strict=True)
            for w, b, activation, out, z in layers:
                _launch_layer_forward(layer_input, w, b, activation, out, z, acc, precision)
                layer_input = out
    return saved


def _launch_layer_forward(x, w, b, activation, out, z, acc, precision) -> None:
    (M, K), N = x.shape, w.shape[0]
    blocks = _layer_blocks(x.dtype, interpreted(x.device))
    grid = (cdiv(M, blocks.BM), cdiv(N, blocks.BN))
    code, p0, p1 = _activation_arguments(activation)
    _layer_forward_kernel[grid](
        x,
        w,
        *_bias_pointers([w], [b]),
        out,
        out if z is None else z,
        M,
        N,
        K,
        x.stride(0),
        x.stride(1),
        p0,
        p1,
        HAS_BIAS=b is not None,
        ACT=code,
        ACC=acc,
        PRECISION=precision,
        BM=blocks.BM,
        BN=blocks.BN,
        BK=blocks.BK,
        num_warps=blocks.num_warps,
        enable_fp_fusion=FP_FUSION,
    )


def _activation_arguments(activation) -> tuple[int, float, float]:
    """A parsed activation as the layered kernels take it: ACT, P0, P1."""
    code, p0, p1 = activation.row
    return int(code), p0, p1


def _bias_pointers(weights, biases) -> tuple[torch.Tensor, ...]:
    """Every layer's bias; a layer without one passes its weight, never read (HAS_BIAS is 0)."""
    return tuple(w if b is None else b for w, b in zip(weights, biases, strict=True))


def _launch_fused_forward(x, weights, biases, codes, outputs, acc, precision) -> None:
    widths = (x.shape[1], *(w.shape[0] for w in weights))
    plan = fused_plan(widths, x.shape[0], x.device)
    _mlp_forward_kernel[(cdiv(x.shape[0], plan.BM),)](
        x,
        tuple(weights),
        _bias_pointers(weights, biases),
        tuple(outputs),
        widths,
        x.shape[0],
        x.stride(0),
        x.stride(1),
        L=len(weights),
        ACTS=packed(codes, ACT_BITS),
        ACT_BITS=ACT_BITS,
        BIASES=packed((b is not None for b in biases), 1),
        ACC=acc,
        PRECISION=precision,
        BM=plan.BM,
        BK=plan.BK,
        H=plan.H,
        num_warps=plan.num_warps,
        enable_fp_fusion=FP_FUSION,
    )


def mlp_backward(
    g, x, weights, biases, activations, outputs, needs_input_grad=True, *, tf32=False, fused=None
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[torch.Tensor | None]]:
    """``(∂L/∂x, [∂L/∂Wₗ], [∂L/∂bₗ])`` (see ``reference.mlp_backward``).

    ``biases`` only says which layers have one (None or not); ``fused`` as in
    ``mlp_forward``.
    """
    has_bias = [b is not None for b in biases]
    weights, _, parsed = checked(x, weights, [None] * len(weights), activations)
    layers = split_saved(outputs, [p.activation.reads_input for p in parsed])
    for layer, (w, (a, z)) in enumerate(zip(weights, layers, strict=True)):
        want = (x.shape[0], w.shape[0])
        for name, saved in (("output", a), ("z", z)):
            if saved is not None and (saved.shape != want or not saved.is_contiguous()):
                raise ValueError(
                    f"layer {layer}'s saved {name} must be contiguous {want}, "
                    f"got {tuple(saved.shape)}"
                )
    if g.shape != layers[-1][0].shape:
        raise ValueError(f"g must have shape {tuple(layers[-1][0].shape)}, got {tuple(g.shape)}")
    check_offsets("g", g)
    return _backward(g, x, weights, has_bias, activations, parsed, layers, needs_input_grad,
                     tf32, fused)  # fmt: skip


def prepared_backward(g, x, weights, biases, activations, outputs, needs_input_grad,
                      prepared: Prepared, *, tf32=False):  # fmt: skip
    """``mlp_backward`` of a network ``prepare`` checked, and of what ``prepared_forward``
    returned: nothing is checked again."""
    parsed = prepared.parsed
    layers = split_saved(outputs, [p.activation.reads_input for p in parsed])
    has_bias = [b is not None for b in biases]
    return _backward(g, x, contiguous(weights), has_bias, activations, parsed, layers,
                     needs_input_grad, tf32, None)  # fmt: skip


def _backward(g, x, weights, has_bias, activations, parsed, layers, needs_input_grad, tf32,
              fused):  # fmt: skip
    if x.shape[0] == 0:  # no rows: every gradient is an empty sum
        grad_biases = [
            w.new_zeros(len(w)) if has else None for w, has in zip(weights, has_bias, strict=True)
        ]
        grad_x = x.new_empty(x.shape) if needs_input_grad else None
        return grad_x, [w.new_zeros(w.shape) for w in weights], grad_biases
    fused = _fused_choice(fused, weights, activations, x, tf32, backward=True)
    acc, precision = accumulator_dtype(x.dtype), precision_of(x.dtype, tf32)
    grad_x = (
        torch.empty_like(x, memory_format=torch.contiguous_format) if needs_input_grad else None
    )
    with device_guard(x.device):
        if fused:
            codes = tuple(p.code for p in parsed)
            outputs = [a for a, _ in layers]
            grad_weights, grad_biases = _launch_fused_backward(
                g, x, weights, codes, outputs, grad_x, acc, precision
            )
        else:
            grad_weights, grad_biases = layered_backward(
                g, x, weights, parsed, layers, grad_x, acc, precision
            )
    return (
        grad_x,
        grad_weights,
        [gb if has else None for gb, has in zip(grad_biases, has_bias, strict=True)],
    )


def _views(
    flat: torch.Tensor, offset: int, n_out: int, n_in: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(∂W, ∂b) of one layer, views of a flat [∂W | ∂b] gradient buffer."""
    end = offset + n_out * n_in
    return flat[offset:end].view(n_out, n_in), flat[end : end + n_out]


def _workspace(x: torch.Tensor, rows: int, size: int, direct: bool) -> torch.Tensor:
    """Rows of partial gradient sums: in x's dtype when the one row is the final result,
    else in the accumulation dtype (float32, float64 for float64), summed by ``_reduced``."""
    check_offsets(f"the ({rows}, {size}) gradient workspace", rows * size)
    dtype = x.dtype if direct else (torch.float64 if x.dtype == torch.float64 else torch.float32)
    return x.new_empty(rows, size, dtype=dtype)


def _reduced(partials: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Σ over the rows of partials (P, T), into a new (T,) buffer of dtype."""
    P, T = partials.shape
    if P == 1 and partials.dtype == dtype:
        return partials[0]
    out = partials.new_empty(T, dtype=dtype)
    BLOCK = 1024
    _sum_partials_kernel[(cdiv(T, BLOCK),)](
        partials, out, P, T, BLOCK=BLOCK, enable_fp_fusion=FP_FUSION
    )
    return out


def _launch_fused_backward(g, x, weights, codes, outputs, grad_x, acc, precision):
    widths = (x.shape[1], *(w.shape[0] for w in weights))
    plan = fused_plan(widths, x.shape[0], x.device)
    # One program writes final gradients in place; several sum partials in acc's dtype.
    direct = plan.programs == 1 and cdiv(x.shape[0], plan.BM) == 1
    partials = _workspace(x, plan.programs, plan.size, direct)
    _mlp_backward_kernel[(plan.programs,)](
        g,
        x,
        tuple(weights),
        tuple(outputs),
        x if grad_x is None else grad_x,
        partials,
        widths,
        plan.offsets,
        x.shape[0],
        plan.size,
        g.stride(0),
        g.stride(1),
        x.stride(0),
        x.stride(1),
        L=len(weights),
        ACTS=packed(codes, ACT_BITS),
        ACT_BITS=ACT_BITS,
        NEEDS_DX=grad_x is not None,
        ACC=acc,
        PRECISION=precision,
        BM=plan.BM,
        BK=plan.BK,
        H=plan.H,
        num_warps=plan.num_warps,
        enable_fp_fusion=FP_FUSION,
    )
    flat = _reduced(partials, x.dtype)
    views = [
        _views(flat, o, n_out, n_in)
        for o, n_in, n_out in zip(plan.offsets, widths, widths[1:], strict=False)
    ]
    return [w for w, _ in views], [b for _, b in views]


def layered_backward(g, x, weights, activations, layers, grad_x, acc, precision, partials=None):
    """Every layer's gradients, top down; ``layers`` holds each layer's (a, z or None).

    ``partials``: a workspace per layer, shaped by ``layered_workspaces``, to leave
    the partial [∂W | ∂b] sums in for the caller (the training step's update sums
    them); None sums them here. Returns ([∂Wₗ], [∂bₗ]), or Nones where left in partials.
    """
    grad_weights, grad_biases = [None] * len(weights), [None] * len(weights)
    blocks = _layer_blocks(x.dtype, interpreted(x.device), precision)
    for layer in reversed(range(len(weights))):
        w, (a, z), activation = weights[layer], layers[layer], activations[layer]
        layer_input = x if layer == 0 else layers[layer - 1][0]
        dx = None
        if layer > 0 or grad_x is not None:
            dx = grad_x if layer == 0 else torch.empty_like(layer_input)
        (M, N), K = a.shape, w.shape[1]
        split = _split_plan(M, N, K, blocks, x.device)
        if partials is None:
            out = _workspace(x, split.splits, N * K + N, direct=split.splits == 1)
        else:
            out = partials[layer]
        saved = (a, a if z is None else z, activation)
        _launch_layer_backward(g, saved, w, layer_input, dx, out, split, acc, precision, blocks)
        if partials is None:
            grad_weights[layer], grad_biases[layer] = _views(_reduced(out, x.dtype), 0, N, K)
        g = dx
    return grad_weights, grad_biases


def layered_workspaces(x: torch.Tensor, weights) -> tuple[tuple[int, int], ...]:
    """``(splits, N·K + N)`` of each layer's partial-gradient workspace on the layered
    path: what ``layered_backward``'s ``partials`` must hold."""
    blocks = _layer_blocks(x.dtype, interpreted(x.device))
    shapes, width = [], x.shape[1]
    for w in weights:
        N = w.shape[0]
        shapes.append((_split_plan(x.shape[0], N, width, blocks, x.device).splits, N * width + N))
        width = N
    return tuple(shapes)


def _launch_layer_backward(g, saved, w, x, dx, out, split: SplitPlan, acc, precision, blocks):
    """``saved``: the layer's (a, z, parsed activation), z being a where act' reads a;
    ``dx`` None where ∂x is not wanted."""
    a, z, activation = saved
    (M, N), K = a.shape, w.shape[1]
    k_tiles = cdiv(K, blocks.BK)
    weight_programs = cdiv(N, blocks.BN) * k_tiles * split.splits
    input_programs = 0 if dx is None else cdiv(M, blocks.BM) * k_tiles
    code, p0, p1 = _activation_arguments(activation)
    _layer_backward_kernel[(weight_programs + input_programs,)](
        g,
        a,
        z,
        w,
        x,
        x if dx is None else dx,
        out,
        M,
        N,
        K,
        g.stride(0),
        g.stride(1),
        x.stride(0),
        x.stride(1),
        split.rows_per_split,
        weight_programs,
        p0,
        p1,
        ACT=code,
        ACC=acc,
        PRECISION=precision,
        BM=blocks.BM,
        BN=blocks.BN,
        BK=blocks.BK,
        GROUP=SUM_GROUP,
        num_warps=blocks.num_warps,
        num_stages=GRAD_WEIGHT_STAGES,
        maxnreg=blocks.maxnreg,
        enable_fp_fusion=FP_FUSION,
    )
