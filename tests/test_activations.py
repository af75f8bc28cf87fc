"""The activations with parameters or a derivative that reads z (leaky_relu, gelu,
gelu_tanh, silu, softplus, elu): accuracy against a wider float by the criterion of
every accuracy test (no worse than twice torch's own error), on the numba kernels and
Triton's (in its interpreter without a GPU); special values as torch gives them; specs
and torch modules; FusedTrainer equal to torch's loop. (identity, relu, sigmoid and
tanh: test_accuracy.py and test_triton.py.)"""

import importlib.util

import numpy as np
import pytest
import torch
from torch import nn

import fastbp
from fastbp import activations as torch_activations
from fastbp.kernels import activation_table, cpu, reference
from fastbp.train import FusedTrainer

from .helpers import assert_as_accurate_as_torch, assert_no_less_accurate

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="Triton is not installed (pip install -e '.[test]' on Linux x86-64)",
)
# Every activation whose derivative reads z, at torch's defaults and with parameters
# that move it (softplus' threshold low enough that both of its branches are taken).
SPECS = [
    "leaky_relu",
    "leaky_relu(negative_slope=0.2)",
    "gelu",
    "gelu_tanh",
    "silu",
    "softplus",
    "softplus(beta=2.0, threshold=3.0)",
    "elu",
    "elu(alpha=0.7)",
]
# batch 1, an odd batch, a large one; widths below and above the kernels' blocks
CASES = [([3, 5, 2], 1), ([17, 33, 1, 10], 7), ([784, 256, 128, 10], 127), ([3, 600], 127)]
ENTRIES = [("fastbp", "cpu"), pytest.param(("fastbp", "cuda"), marks=needs_triton)]


def test_the_table_covers_every_activation_in_every_backend():
    assert set(torch_activations.IN_TORCH) == set(activation_table.NAMES)
    assert (len(activation_table.TABLE) - 1).bit_length() == activation_table.CODE_BITS
    reads = {a.name for a in activation_table.TABLE if a.reads_input}
    assert reads == {"leaky_relu", "gelu", "gelu_tanh", "silu", "softplus", "elu"}


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e[1])
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{'x'.join(map(str, c[0]))}-b{c[1]}")
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_float32_error_within_twice_torchs(entry, spec, case, bias):
    (name, device), (sizes, batch) = entry, case
    if device == "cuda" and batch > 64 and not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU: Triton's interpreter takes seconds per large case")
    run_on = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    assert_as_accurate_as_torch(
        name, sizes, batch, spec, bias, torch.float32, device=run_on, entry=device
    )


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e[1])
@pytest.mark.parametrize("spec", SPECS)
def test_float64_error_within_twice_torchs(entry, spec):
    name, device = entry
    run_on = "cuda" if device == "cuda" and torch.cuda.is_available() else "cpu"
    assert_as_accurate_as_torch(
        name, [17, 33, 1, 10], 7, spec, True, torch.float64, device=run_on, entry=device
    )


SPECIAL = [0.0, -0.0, 1e-30, -1e-30, 1e-8, -1e-8, 3.0, -3.0, 40.0, -40.0, 800.0, -800.0,
           np.inf, -np.inf, np.nan]  # fmt: skip


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.usefixtures("torch_at_the_limits")
def test_element_wise_passes_match_torch_over_the_whole_range(spec, dtype):
    """act and δ over a sweep and the special values: NaN and inf where torch gives them,
    errors against float64 no worse than torch's."""
    # special values first: torch's vectorized loops take them, not its scalar tail
    z = np.concatenate([SPECIAL, np.linspace(-60, 60, 4001)]).astype(dtype).reshape(1, -1)
    g = np.random.default_rng(0).standard_normal(z.shape).astype(dtype)
    bound = torch_activations.get(spec)
    tz = torch.from_numpy(z).requires_grad_()
    a_torch = bound.function(tz)
    (d_torch,) = torch.autograd.grad(a_torch, tz, torch.from_numpy(g))
    wide = np.float64 if dtype == np.float32 else np.longdouble  # the reference's float
    with np.errstate(all="ignore"):
        a_wide = reference.activate(z.astype(wide), spec)
        d_wide = reference.activation_grad(g.astype(wide), a_wide, spec, z.astype(wide))
    a_exact, d_exact = (torch.from_numpy(v.astype(np.float64)) for v in (a_wide, d_wide))
    a = cpu.activate(z, spec)
    d = cpu.activation_grad(g, a, spec, z)
    finite = np.isfinite(z)
    for ours, torchs, exact, what in ((a, a_torch, a_exact, "act"), (d, d_torch, d_exact, "δ")):
        ours, torchs = torch.from_numpy(ours), torchs.detach()
        specials = ~torch.from_numpy(finite)
        torch.testing.assert_close(ours[specials], torchs[specials], equal_nan=True)
        assert_no_less_accurate(
            f"{spec} {what}",
            ours[~specials],
            torchs[~specials],
            exact[~specials],
            torch.from_numpy(z).dtype,
        )


@pytest.mark.parametrize(
    "module, spec",
    [
        (nn.LeakyReLU(0.2), "leaky_relu(negative_slope=0.2)"),
        (nn.LeakyReLU(), "leaky_relu"),
        (nn.GELU(), "gelu"),
        (nn.GELU(approximate="tanh"), "gelu_tanh"),
        (nn.SiLU(), "silu"),
        (nn.Softplus(beta=2.0, threshold=5.0), "softplus(beta=2.0, threshold=5.0)"),
        (nn.ELU(alpha=0.7), "elu(alpha=0.7)"),
    ],
    ids=repr,
)
def test_torch_modules_are_taken_with_their_parameters_and_given_back(module, spec):
    model = fastbp.nn.MLP([4, 6, 5, 3], activation=module, output_activation=module)
    assert model.activations == (spec,) * 3
    sequential = model.to_torch()
    assert repr(sequential[1]) == repr(module)
    again = fastbp.nn.MLP.from_torch(sequential)
    assert again.activations == model.activations
    x = torch.randn(9, 4)
    torch.testing.assert_close(again(x), sequential(x))


def test_activations_per_layer_mix_names_specs_and_modules():
    per_layer = [nn.LeakyReLU(0.3), "gelu_tanh", "softplus(beta=0.5)"]
    model = fastbp.nn.MLP([4, 6, 5, 3, 2], activation=per_layer, output_activation=nn.SiLU())
    expected = ("leaky_relu(negative_slope=0.3)", "gelu_tanh", "softplus(beta=0.5, threshold=20.0)")
    assert model.activations == (*expected, "silu")
    x = torch.randn(8, 4, requires_grad=True)
    sequential = model.to_torch()
    ours, torchs = model(x), sequential(x)
    torch.testing.assert_close(ours, torchs)
    ours.sum().backward()
    grad_x, x.grad = x.grad, None
    torchs.sum().backward()
    torch.testing.assert_close(grad_x, x.grad)


def test_unsupported_modules_and_specs_are_refused_with_what_is_supported():
    with pytest.raises(ValueError, match=r"CELU.*not an activation fastbp runs.*nn\.GELU"):
        fastbp.nn.MLP([3, 4, 2], activation=nn.CELU())
    with pytest.raises(ValueError, match=r"sequential\[1\] is Hardtanh.*nn\.LeakyReLU"):
        fastbp.nn.MLP.from_torch(nn.Sequential(nn.Linear(3, 2), nn.Hardtanh()))
    with pytest.raises(ValueError, match="leaky_relu has no parameter 'slope'"):
        fastbp.nn.Linear(3, 2, activation="leaky_relu(slope=0.2)")
    with pytest.raises(ValueError, match="softplus: beta must be > 0"):
        fastbp.nn.MLP([3, 2], activation="softplus(beta=0)")  # checked without hidden layers
    with pytest.raises(ValueError, match="activation must be one of identity, relu"):
        fastbp.functional.linear_act(torch.ones(1, 3), torch.ones(2, 3), activation="swish")


@pytest.mark.parametrize("backend", ["numba", pytest.param("triton", marks=needs_triton)])
def test_elus_derivative_at_nan_is_nan_as_in_torchs_vectorized_loop(backend):
    """torch's elu backward gives NaN at a NaN input in its vectorized loop and g in its
    scalar tail (which elements reach which depends on the CPU's vector width): fastbp
    propagates the NaN everywhere."""
    z = torch.zeros(64)
    z[5] = float("nan")
    z.requires_grad_()
    (torchs,) = torch.autograd.grad(torch.nn.functional.elu(z), z, torch.ones(64))
    assert torchs[5].isnan()
    x = torch.tensor([[float("nan")]], requires_grad=True)
    weight = torch.ones(1, 1, requires_grad=True)
    out = fastbp.functional.linear_act(x, weight, None, "elu", backend=backend)
    out.backward(torch.ones(1, 1))
    assert x.grad.isnan().all() and weight.grad.isnan().all()


def test_spec_strings_are_canonical():
    assert activation_table.parse("elu(alpha=1.0)").spec == "elu"  # torch's default: the name
    assert activation_table.parse(" softplus( threshold=4 ) ").spec == (
        "softplus(beta=1.0, threshold=4.0)"
    )
    layer = fastbp.nn.Linear(3, 2, activation=nn.LeakyReLU(0.25))
    assert layer.activation == "leaky_relu(negative_slope=0.25)"
    assert "leaky_relu(negative_slope=0.25)" in repr(layer)


@pytest.mark.parametrize("backend", ["numba", pytest.param("triton", marks=needs_triton)])
@pytest.mark.parametrize("spec", [*SPECS, "softplus(beta=2.0, threshold=1.0)"])
def test_fused_trainer_equals_the_torch_loop(spec, backend):
    torch.manual_seed(0)
    model = fastbp.nn.MLP([5, 7, 3], activation=spec, output_activation=spec).double()
    sequential = model.to_torch()
    trainer = FusedTrainer(model, "mse", optimizer="adam", lr=0.01, backend=backend)
    optimizer = torch.optim.Adam(sequential.parameters(), lr=0.01)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    for _ in range(3):
        trainer.step(x, y)
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(sequential(x), y).backward()
        optimizer.step()
    for ours, torchs in zip(model.parameters(), sequential.parameters(), strict=True):
        torch.testing.assert_close(ours, torchs, rtol=1e-10, atol=1e-12)


def test_backward_keeps_z_of_the_layers_that_read_it_only():
    """Memory: forward keeps one extra (batch × width) array per such layer."""
    weights = [np.ones((4, 3)), np.ones((5, 4)), np.ones((2, 5))]
    saved = cpu.mlp_forward(np.ones((6, 3)), weights, [None] * 3, ["gelu", "relu", "silu"])
    assert [a.shape for a in saved] == [(6, 4), (6, 5), (6, 2), (6, 4), (6, 2)]
    with pytest.raises(ValueError, match="must hold the 5 arrays forward returned"):
        cpu.mlp_backward(
            np.ones((6, 2)),
            np.ones((6, 3)),
            weights,
            [None] * 3,
            ["gelu", "relu", "silu"],
            saved[:3],
        )


def test_reference_recomputes_what_the_kernels_keep():
    rng = np.random.default_rng(1)
    x, weights = (
        rng.standard_normal((5, 3)),
        [rng.standard_normal((4, 3)), rng.standard_normal((2, 4))],
    )
    biases, specs, g = (
        [rng.standard_normal(4), None],
        ["silu", "elu(alpha=0.5)"],
        rng.standard_normal((5, 2)),
    )
    ours = cpu.mlp_backward(
        g, x, weights, biases, specs, cpu.mlp_forward(x, weights, biases, specs)
    )
    theirs = reference.mlp_backward(
        g, x, weights, biases, specs, reference.mlp_forward(x, weights, biases, specs)
    )
    np.testing.assert_allclose(ours[0], theirs[0], rtol=1e-12)
    for mine, exact in zip([*ours[1], ours[2][0]], [*theirs[1], theirs[2][0]], strict=True):
        np.testing.assert_allclose(mine, exact, rtol=1e-12)


@pytest.mark.parametrize(
    "module, attribute, value",
    [
        (nn.LeakyReLU(0.2), "negative_slope", 0.7),
        (nn.ELU(), "alpha", 0.3),
        (nn.Softplus(), "beta", 3.0),
        (nn.GELU(), "approximate", "tanh"),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_a_changed_activation_child_takes_effect_at_the_next_call(module, attribute, value):
    model = fastbp.nn.MLP([3, 4, 2], activation=module)
    x = torch.randn(5, 3)
    before = model(x)
    setattr(model[1], attribute, value)
    after = model(x)
    torch.testing.assert_close(after, model.to_torch()(x))
    assert not torch.equal(before, after)
