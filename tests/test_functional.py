"""fastbp.functional: gradcheck, strides, NaN/Inf, gradient accumulation, bad input."""

import gc
import importlib.util
import weakref

import pytest
import torch

from fastbp import functional as F
from fastbp.kernels import cpu_jit
from fastbp.kernels.reference import ACTIVATIONS
from fastbp.nn import MLP

from .helpers import assert_no_less_accurate, make_network


def _leaves(tensors):
    return [None if t is None else t.detach().clone().requires_grad_() for t in tensors]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_linear_act(activation, bias):
    x, (weight,), (b,), _ = make_network([5, 4], 3, bias, seed=1)
    inputs = _leaves([x, weight] + ([b] if bias else []))

    def layer(x, weight, b=None):
        return F.linear_act(x, weight, b, activation, backend="numba")

    assert torch.autograd.gradcheck(layer, inputs)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_mlp(activation, bias):
    x, weights, biases, _ = make_network([4, 6, 3, 2], 3, bias, seed=2)
    x, *weights = _leaves([x, *weights])
    biases = _leaves(biases)
    params = weights + [b for b in biases if b is not None]

    def network(x, *params):
        ws, bs = list(params[:3]), list(params[3:]) if bias else [None] * 3
        return F.mlp(x, ws, bs, [activation, "tanh", activation], backend="numba")

    assert torch.autograd.gradcheck(network, [x, *params])


@pytest.mark.parametrize("batch, width", [(263, 257), (300, 300), (1, 70000), (64, 1024)])
@pytest.mark.parametrize("activation", ["identity", "relu"])
def test_every_row_gets_its_bias_where_the_fill_splits(batch, width, activation):
    """From PARALLEL_MIN_ELEMENTS elements a layer's bias fills z in blocks of rows on
    numba's threads: rows past the last whole block, and blocks of one row, included."""
    x, (weight,), (bias,), _ = make_network([3, width], batch, dtype=torch.float64, seed=4)
    assert batch * width >= cpu_jit.PARALLEL_MIN_ELEMENTS
    exact = F.linear_act(x, weight, bias, activation, backend="torch")
    single = [t.float() for t in (x, weight, bias)]
    ours = F.linear_act(*single, activation, backend="numba")
    torchs = F.linear_act(*single, activation, backend="torch")
    assert_no_less_accurate("output", ours, torchs, exact, torch.float32)


def _gradients(backend, x, weight, bias, activation="relu", grad_output=None):
    x, weight, bias = _leaves([x, weight, bias])
    out = F.linear_act(x, weight, bias, activation, backend=backend)
    out.backward(torch.ones_like(out) if grad_output is None else grad_output)
    return out.detach(), x.grad, weight.grad, bias.grad


@pytest.mark.parametrize(
    "layout",
    ["transposed-x", "sliced-x", "transposed-weight", "strided-bias", "expanded-grad"],
)
def test_any_stride_matches_contiguous(layout):
    x, (weight,), (bias,), grad_output = make_network([12, 7], 5, dtype=torch.float32, seed=3)
    if layout == "transposed-x":
        x = x.t().contiguous().t()
    elif layout == "sliced-x":
        x = torch.cat([x, x], dim=1)[:, ::2]
    elif layout == "transposed-weight":
        weight = weight.t().contiguous().t()
    elif layout == "strided-bias":
        bias = torch.stack([bias, bias], dim=1)[:, 0]
    else:
        grad_output = torch.ones(1, 1).expand(5, 7)  # what .sum().backward() passes down
    strided = (x, weight, bias, grad_output)
    assert not all(t.is_contiguous() for t in strided), "the case must exercise a strided tensor"
    ours = _gradients("numba", x, weight, bias, "tanh", grad_output)
    contiguous = _gradients(
        "numba",
        x.contiguous(),
        weight.contiguous(),
        bias.contiguous(),
        "tanh",
        grad_output.contiguous(),
    )
    for mine, reference in zip(ours, contiguous, strict=True):
        torch.testing.assert_close(mine, reference, rtol=0, atol=0)


def test_gradients_accumulate_into_grad_like_any_parameter():
    x, (weight,), (bias,), _ = make_network([6, 4], 3, seed=4)
    weight.requires_grad_()
    for _ in range(2):
        F.linear_act(x, weight, bias, "sigmoid", backend="numba").sum().backward()
    once = weight.grad.clone()
    weight.grad = None
    F.linear_act(x, weight, bias, "sigmoid", backend="numba").sum().backward()
    torch.testing.assert_close(once, 2 * weight.grad)


def test_input_without_requires_grad_gets_no_gradient():
    x, (weight,), (bias,), _ = make_network([6, 4], 3, seed=5)
    weight.requires_grad_()
    out = F.mlp(x, [weight], [bias], ["relu"], backend="numba")
    out.sum().backward()
    assert x.grad is None and weight.grad is not None


def test_nothing_requiring_grad_builds_no_node_and_computes_the_same():
    x, weights, biases, _ = make_network([6, 5, 4], 3, seed=7)
    activations = ["tanh", "sigmoid"]
    frozen = F.mlp(x, weights, biases, activations, backend="numba")
    weights = [w.requires_grad_() for w in weights]
    trained = F.mlp(x, weights, biases, activations, backend="numba")
    assert frozen.grad_fn is None and not frozen.requires_grad
    assert trained.grad_fn is not None
    torch.testing.assert_close(frozen, trained.detach(), rtol=0, atol=0)


def test_frozen_weights_still_give_input_gradient():
    x, (weight,), (bias,), _ = make_network([6, 4], 3, seed=6)
    x.requires_grad_()
    F.linear_act(x, weight, bias, backend="numba").sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape


# elu at a NaN input is left out: torch's own δ there depends on the element's place
# (NaN in its vectorized loop, g in its scalar tail); test_activations.py checks it.
SPECIAL_CASES = [
    (activation, value)
    for activation in ACTIVATIONS
    for value in (float("nan"), float("inf"), -float("inf"))
    if not (activation == "elu" and value != value)
]


@pytest.mark.parametrize("activation, value", SPECIAL_CASES)
@pytest.mark.parametrize("where", ["x", "weight", "bias", "grad"])
@pytest.mark.usefixtures("torch_at_the_limits")
def test_nan_and_inf_propagate_exactly_as_in_torch(activation, where, value):
    x, (weight,), (bias,), grad_output = make_network([5, 4], 3, dtype=torch.float32, seed=7)
    target = {"x": x, "weight": weight, "bias": bias, "grad": grad_output}[where]
    target.view(-1)[1] = value
    target.view(-1)[-1] = -1.0  # a unit switched off, where relu's derivative selects
    ours = _gradients("numba", x, weight, bias, activation, grad_output)
    theirs = _gradients("torch", x, weight, bias, activation, grad_output)
    for mine, reference in zip(ours, theirs, strict=True):
        assert torch.equal(torch.isnan(mine), torch.isnan(reference))
        assert torch.equal(torch.isinf(mine), torch.isinf(reference))
        finite = torch.isfinite(reference)
        torch.testing.assert_close(mine[finite], reference[finite])


def test_nn_layers_accept_batch_of_one_and_return_input_dtype():
    for dtype in (torch.float32, torch.float64):
        x, weights, biases, _ = make_network([3, 2, 1], 1, dtype=dtype)
        out = F.mlp(x, weights, biases, ["relu", "identity"], backend="numba")
        assert out.shape == (1, 1) and out.dtype == dtype


# ---------------------------------------------------------------------------
# Bad input: a clear error naming the argument, what it got and what it needs.
# ---------------------------------------------------------------------------
X = torch.zeros(4, 3)
W = torch.zeros(2, 3)
B = torch.zeros(2)

BAD_LINEAR_INPUTS = {
    "0-D x": (dict(x=torch.tensor(1.0)), ValueError, r"x must have shape \(\*, in_features\)"),
    "x of the wrong width": (
        dict(x=torch.zeros(2, 4, 5)),
        ValueError,
        r"weight must have shape \(out_features, 5\) to match its 5 input features",
    ),
    "integer x": (dict(x=X.long()), TypeError, r"x must be a floating-point tensor.*int64"),
    "complex x": (
        dict(x=X.to(torch.complex64)),
        TypeError,
        r"x must be a floating-point.*complex64",
    ),
    "not a tensor": (dict(x=[[1.0, 2.0, 3.0]]), TypeError, "x must be a torch.Tensor, got list"),
    "mismatched weight": (
        dict(weight=torch.zeros(2, 5)),
        ValueError,
        r"weight must have shape \(out_features, 3\).*got shape \(2, 5\)",
    ),
    "1-D weight": (dict(weight=torch.zeros(3)), ValueError, "weight must be a 2-D tensor"),
    "mismatched bias": (
        dict(bias=torch.zeros(3)),
        ValueError,
        r"bias must have shape \(2,\) to match weight, got shape \(3,\)",
    ),
    "mixed dtypes": (
        dict(weight=W.double()),
        TypeError,
        "weight has dtype torch.float64 but x has torch.float32",
    ),
    "float16 on numba": (
        dict(x=X.half(), weight=W.half(), bias=B.half()),
        TypeError,
        "backend 'numba' needs float32 or float64 tensors, got x of torch.float16",
    ),
    "different devices": (
        dict(weight=W.to("meta")),
        ValueError,
        "weight is on meta but x is on cpu",
    ),
    "non-cpu tensors on numba": (
        dict(x=X.to("meta"), weight=W.to("meta"), bias=B.to("meta")),
        ValueError,
        "backend 'numba' runs on CPU tensors only, got x on meta",
    ),
    "unknown activation": (
        dict(activation="swish"),
        ValueError,
        r"activation must be one of identity, relu, sigmoid, tanh, leaky_relu\(negative_slope\), "
        r"gelu, gelu_tanh, silu, softplus\(beta, threshold\), elu\(alpha\), got 'swish'",
    ),
    "unknown backend": (
        dict(backend="cuda"),
        ValueError,
        r"backend must be one of \('auto', 'numba', 'triton', 'torch'\), got 'cuda'",
    ),
}


@pytest.mark.parametrize("case", BAD_LINEAR_INPUTS, ids=str)
def test_bad_input_to_linear_act_raises_a_clear_error(case):
    override, error, message = BAD_LINEAR_INPUTS[case]
    arguments = dict(x=X, weight=W, bias=B, activation="relu", backend="numba") | override
    backend = arguments.pop("backend")
    with pytest.raises(error, match=message):
        F.linear_act(**arguments, backend=backend)


BAD_MLP_INPUTS = {
    "no layers": (dict(weights=[], biases=[], activations=[]), ValueError, "at least one layer"),
    "ragged lists": (dict(biases=[None]), ValueError, "one entry per layer, got 2, 1 and 2"),
    "chain broken": (
        dict(weights=[W, torch.zeros(1, 3)]),
        ValueError,
        r"weights\[1\] must have shape \(out_features, 2\)",
    ),
    "bias of layer 1": (
        dict(biases=[B, torch.zeros(5)]),
        ValueError,
        r"biases\[1\] must have shape \(1,\)",
    ),
    "activation of layer 1": (
        dict(activations=["relu", "softmax"]),
        ValueError,
        "activations must be one of .* got 'softmax'",
    ),
}


@pytest.mark.parametrize("case", BAD_MLP_INPUTS, ids=str)
def test_bad_input_to_mlp_raises_a_clear_error(case):
    override, error, message = BAD_MLP_INPUTS[case]
    arguments = (
        dict(
            x=X,
            weights=[W, torch.zeros(1, 2)],
            biases=[B, torch.zeros(1)],
            activations=["relu"] * 2,
        )
        | override
    )
    with pytest.raises(error, match=message):
        F.mlp(**arguments, backend="numba")


def test_kernel_launchers_check_shapes_before_touching_memory():
    from fastbp.kernels import cpu

    with pytest.raises(ValueError, match=r"weights\[0\] must have shape \(\*, 3\), got \(2, 4\)"):
        cpu.linear_act_forward(X.numpy(), torch.zeros(2, 4).numpy(), None, "relu")
    out = cpu.linear_act_forward(X.numpy(), W.numpy(), None, "relu")
    with pytest.raises(ValueError, match=r"g must have shape \(4, 2\), got \(4, 3\)"):
        cpu.linear_act_backward(X.numpy(), X.numpy(), W.numpy(), out, "relu")


def test_double_backward_is_refused_clearly():
    x, (weight,), (bias,), _ = make_network([3, 2], 2, seed=8)
    weight.requires_grad_()
    out = F.linear_act(x, weight, bias, "tanh", backend="numba")
    with pytest.raises(RuntimeError, match="double backward .* need backend='torch'"):
        torch.autograd.grad(out.sum(), weight, create_graph=True)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("leading", [(), (5,), (2, 3), (0,), (2, 0, 4)], ids=str)
def test_leading_dimensions_are_batch_as_in_nn_linear(leading, backend):
    """``(*, in_features)``: leading dimensions are flattened into the batch and restored,
    a 1-D input is one sample, an empty batch gives an empty output; gradients too."""
    _, weights, biases, _ = make_network([4, 6, 3], 1, dtype=torch.float64, seed=9)
    x = torch.randn(*leading, 4, dtype=torch.float64, requires_grad=True)
    weights = [w.requires_grad_() for w in weights]
    ours = F.mlp(x, weights, biases, ["tanh", "identity"], backend=backend)
    expected = x
    for w, b, act in zip(weights, biases, [torch.tanh, lambda t: t], strict=True):
        expected = act(torch.nn.functional.linear(expected, w, b))
    assert ours.shape == expected.shape == (*leading, 3)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(ours.sum(), [x, *weights])
    for mine, theirs in zip(grads, torch.autograd.grad(expected.sum(), [x, *weights]), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


def test_a_contiguous_batch_is_not_copied(monkeypatch):
    from fastbp.kernels import cpu

    x, weights, biases, _ = make_network([4, 3], 6, dtype=torch.float32, seed=10)
    x = x.reshape(2, 3, 4)
    seen = []
    original = cpu.Network.forward
    monkeypatch.setattr(
        cpu.Network,
        "forward",
        lambda self, rows, *keep: seen.append(rows) or original(self, rows, *keep),
    )
    F.mlp(x, weights, biases, ["relu"], backend="numba")
    assert seen[0].ctypes.data == x.data_ptr() and seen[0].shape == (6, 4)


@pytest.mark.parametrize("backend", ["numba", "triton", "torch"])
def test_a_step_leaves_no_reference_cycle(backend):
    # A cycle through the autograd node keeps each step's graph, activations and
    # AccumulateGrad nodes alive until Python's gc runs (with gc off: for good).
    if backend == "triton" and importlib.util.find_spec("triton") is None:
        pytest.skip("Triton is not installed (pip install -e '.[test]' on Linux x86-64)")
    model = MLP([5, 7, 3], backend=backend)
    gc.disable()
    try:
        output = model(torch.randn(4, 5))
        alive = weakref.ref(output)
        output.sum().backward()
        del output
        assert alive() is None
    finally:
        gc.enable()
