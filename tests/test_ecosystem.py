"""fastbp in a PyTorch project: custom ops, torch.compile and torch.export,
save/load and interop, determinism. (DDP: ``test_distributed.py``.)"""

from __future__ import annotations

import copy
import importlib.util
import pickle
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.library import opcheck

import fastbp
from fastbp import functional as F
from fastbp import traced

from .helpers import make_network, needs_cuda

needs_triton = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None,
    reason="Triton is not installed (pip install -e '.[test]' on Linux x86-64)",
)
# (sizes, batch, bias per layer, activations): batch 1, odd widths, a layer without bias
NETWORKS = [
    ([3, 5, 2], 1, [True, True], ["relu", "identity"]),
    ([17, 33, 10], 4, [False, True], ["tanh", "sigmoid"]),
    ([64, 100, 30, 10], 17, [True, False, True], ["sigmoid", "relu", "identity"]),
]


def _op_arguments(sizes, batch, bias, activations, dtype):
    x, weights, biases, grad_output = make_network(sizes, batch, bias, dtype=dtype)
    present = [b for b in biases if b is not None]
    return x, weights, present, grad_output, (bias, traced.SPEC_SEPARATOR.join(activations))


# ---------------------------------------------------------------------------
# 1. Custom ops
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("network", NETWORKS, ids=lambda n: "x".join(map(str, n[0])))
def test_opcheck_forward_and_backward_ops(network, dtype):
    x, weights, biases, grad_output, (has_bias, activations) = _op_arguments(*network, dtype)
    leaves = [t.requires_grad_() for t in (x, *weights, *biases)]
    assert len(leaves) == 1 + len(weights) + len(biases)
    opcheck(torch.ops.fastbp.mlp_forward.default, (x, weights, biases, has_bias, activations))
    with torch.no_grad():
        outputs = torch.ops.fastbp.mlp_forward(x, weights, biases, has_bias, activations)
    detached = [t.detach() for t in weights]
    for needs_input_grad in (True, False):
        arguments = (grad_output, x.detach(), detached, has_bias, activations, outputs)
        opcheck(torch.ops.fastbp.mlp_backward.default, (*arguments, needs_input_grad))


@pytest.mark.parametrize("network", NETWORKS, ids=lambda n: "x".join(map(str, n[0])))
def test_custom_op_and_autograd_function_agree_bit_for_bit(network):
    sizes, batch, bias, activations = network
    x, weights, biases, grad_output = make_network(sizes, batch, bias, dtype=torch.float32)

    def run(forward):
        leaves = [t.detach().clone().requires_grad_() for t in (x, *weights)]
        bias_leaves = [None if b is None else b.detach().clone().requires_grad_() for b in biases]
        output = forward(leaves[0], leaves[1:], bias_leaves)
        output.backward(grad_output)
        grads = [t.grad for t in leaves] + [b.grad for b in bias_leaves if b is not None]
        return [output.detach(), *grads]

    via_op = lambda x, w, b: traced.custom_op_mlp(x, w, b, activations)  # noqa: E731
    via_function = lambda x, w, b: F.mlp(x, w, b, activations, backend="numba")  # noqa: E731
    for ours, theirs in zip(run(via_op), run(via_function), strict=True):
        assert torch.equal(ours, theirs)


def test_gradients_flow_from_the_last_output_of_the_ops_function_alone():
    x, weights, biases, _ = make_network([4, 6, 3], 2, False, dtype=torch.float32)
    weights = [w.requires_grad_() for w in weights]
    hidden, output = traced._OpMLP.apply((False, False), "relu;identity", x, *weights)
    assert not hidden.requires_grad and output.requires_grad
    # the ops themselves are not differentiable: autograd lives in _OpMLP, around them
    outputs = torch.ops.fastbp.mlp_forward(x, weights, [], [False, False], "relu;identity")
    assert not any(t.requires_grad for t in outputs)


# ---------------------------------------------------------------------------
# 2. torch.compile and torch.export
# ---------------------------------------------------------------------------
def _headline_model(around: bool) -> nn.Module:
    torch.manual_seed(0)
    mlp = fastbp.nn.MLP([1000, 100, 10], bias=False)
    if not around:
        return mlp
    return nn.Sequential(nn.LayerNorm(1000), mlp, nn.Linear(10, 10), nn.LogSoftmax(dim=1))


@pytest.mark.parametrize("around", [False, True], ids=["alone", "inside-torch-layers"])
def test_compile_fullgraph_gives_eagers_outputs_and_gradients(around):
    torch._dynamo.reset()
    model = _headline_model(around)
    x = torch.randn(64, 1000)

    def step(forward):
        model.zero_grad()
        output = forward(x)
        output.square().sum().backward()
        return [output.detach(), *(p.grad.clone() for p in model.parameters())]

    eager = step(model)
    compiled = step(torch.compile(model, fullgraph=True))
    for ours, theirs in zip(compiled, eager, strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


NO_GRAD_NETWORKS = [([2, 3], False), ([3, 5, 2], False), ([3, 5, 2], True), ([17, 9, 10], False)]


@pytest.mark.parametrize("sizes, bias", NO_GRAD_NETWORKS)
def test_compile_under_no_grad_gives_eagers_outputs(sizes, bias):
    """Without a gradient, torch.compile traces the ops' Function as a plain call, and
    chooses from its signature whether to pass it a ctx."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model, x = fastbp.nn.MLP(sizes, "tanh", bias=bias), torch.randn(5, sizes[0])
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model)(x), model(x), rtol=0, atol=0)


def test_a_compiled_models_steps_build_no_plan_after_the_first(monkeypatch):
    """The ops find the plan their first call built (forward's, which backward reuses):
    building one costs as much as a small network's step."""
    torch._dynamo.reset()
    model = _headline_model(around=False)
    compiled, x = torch.compile(model, fullgraph=True), torch.randn(8, 1000)

    def step():
        model.zero_grad(set_to_none=True)
        compiled(x).square().sum().backward()
        with torch.no_grad():
            compiled(x)

    step()
    built = []
    monkeypatch.setattr(traced, "Plan", lambda *arguments: built.append(arguments))
    for _ in range(3):
        step()
    assert built == []


def test_export_of_an_inference_model_runs_the_custom_op():
    model = _headline_model(around=True).eval()
    x = torch.randn(8, 1000)
    program = torch.export.export(model, (x,))
    targets = {str(node.target) for node in program.graph.nodes}
    assert "fastbp.mlp_forward.default" in targets
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------
# 4. Save/load and interop
# ---------------------------------------------------------------------------
def _model() -> fastbp.nn.MLP:
    torch.manual_seed(0)
    return fastbp.nn.MLP([20, 13, 8, 3], ["relu", "tanh"])


X = torch.randn(5, 20, generator=torch.Generator().manual_seed(1))


def test_state_dict_survives_torch_save_into_fastbp_and_sequential(tmp_path):
    model = _model()
    torch.save(model.state_dict(), tmp_path / "mlp.pt")
    state = torch.load(tmp_path / "mlp.pt")
    fresh = fastbp.nn.MLP([20, 13, 8, 3], ["relu", "tanh"])
    fresh.load_state_dict(state)
    sequential = model.to_torch()
    sequential.load_state_dict(state)
    with torch.no_grad():
        assert torch.equal(fresh(X), model(X))
        torch.testing.assert_close(sequential(X), model(X))


@pytest.mark.parametrize(
    "duplicate",
    [copy.deepcopy, lambda m: pickle.loads(pickle.dumps(m))],
    ids=["deepcopy", "pickle"],
)
def test_copies_compute_the_same_and_own_their_parameters(duplicate):
    model = _model()
    twin = duplicate(model)
    assert type(twin) is fastbp.nn.MLP and twin.backend == model.backend
    with torch.no_grad():
        assert torch.equal(twin(X), model(X))
        twin.linears[0].weight.add_(1.0)
        assert not torch.equal(twin(X), model(X))


def test_whole_module_torch_save_and_load(tmp_path):
    model = _model()
    torch.save(model, tmp_path / "whole.pt")
    loaded = torch.load(tmp_path / "whole.pt", weights_only=False)
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_to_dtype_runs_and_matches_the_sequential(dtype):
    model = _model().to(dtype)
    sequential = model.to_torch()
    x = X.to(dtype)
    output = model(x)
    output.float().sum().backward()
    assert output.dtype == dtype and model.linears[0].weight.grad.dtype == dtype
    with torch.no_grad():
        # float64 runs fastbp's kernels; half precision falls back to torch's ops ("auto")
        rtol = {torch.float64: 1e-12, torch.bfloat16: 0, torch.float16: 0}[dtype]
        torch.testing.assert_close(output.detach(), sequential(x), rtol=rtol, atol=rtol)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_no_grad_and_inference_mode_save_no_tensors(mode):
    model = _model()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        with mode():
            output = model(X)
        assert not saved and not output.requires_grad
        model(X).sum()  # with grad: the hook does see the saved outputs
    assert saved


def test_functional_call_uses_the_given_parameters():
    model = _model()
    doubled = {name: 2 * p.detach() for name, p in model.named_parameters()}
    reference = _model()
    with torch.no_grad():
        for p in reference.parameters():
            p.mul_(2)
        torch.testing.assert_close(torch.func.functional_call(model, doubled, (X,)), reference(X))


# torch.func on fastbp's kernels (Triton's in its interpreter without a GPU), against
# the same network in torch's own ops: a network with and one without a bias per layer.
FUNC_BACKENDS = ["numba", pytest.param("triton", marks=needs_triton)]


def _func_models(backend):
    torch.manual_seed(0)
    ours = fastbp.nn.MLP([3, 4, 2], "tanh", "sigmoid", bias=[True, False], backend=backend)
    ours = ours.double()
    params = {name: p.detach() for name, p in ours.named_parameters()}
    return ours, ours.to_torch(), params


def _assert_same(ours, torchs):
    """Equal results, in the same structure (tuples, dicts of gradients)."""
    torch.testing.assert_close(ours, torchs)


@pytest.mark.parametrize("backend", FUNC_BACKENDS)
def test_torch_func_grad_and_vjp_over_functional_call(backend):
    ours, torchs, params = _func_models(backend)
    x = torch.randn(5, 3, dtype=torch.float64)

    def loss(model):
        return lambda p, x: torch.func.functional_call(model, p, (x,)).pow(2).sum()

    for argnums in (0, 1, (0, 1)):
        _assert_same(
            torch.func.grad(loss(ours), argnums)(params, x),
            torch.func.grad(loss(torchs), argnums)(params, x),
        )
    cotangent = torch.randn(5, 2, dtype=torch.float64)
    _assert_same(torch.func.vjp(ours, x)[1](cotangent), torch.func.vjp(torchs, x)[1](cotangent))


@pytest.mark.parametrize("backend", FUNC_BACKENDS)
def test_torch_func_vmap_jacrev_and_per_sample_gradients(backend):
    ours, torchs, params = _func_models(backend)
    x = torch.randn(7, 5, 3, dtype=torch.float64)
    for in_dims in (0, 1):  # a batch of inputs folds into the kernels' rows
        _assert_same(torch.func.vmap(ours, in_dims)(x), torch.func.vmap(torchs, in_dims)(x))
    _assert_same(torch.func.jacrev(ours)(x[0]), torch.func.jacrev(torchs)(x[0]))

    def per_sample(model):
        def loss(p, sample):
            return torch.func.functional_call(model, p, (sample[None],)).pow(2).sum()

        return torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))(params, x[0])

    _assert_same(per_sample(ours), per_sample(torchs))
    ensemble = {name: torch.stack([p, 2 * p]) for name, p in params.items()}

    def outputs(model):  # a batch of networks, each run on its own
        return torch.func.vmap(lambda p: torch.func.functional_call(model, p, (x[0],)))(ensemble)

    _assert_same(outputs(ours), outputs(torchs))


@pytest.mark.parametrize("backend", FUNC_BACKENDS)
def test_torch_func_second_order_and_forward_mode_are_refused_clearly(backend):
    ours, _, _ = _func_models(backend)
    x = torch.randn(3, dtype=torch.float64)
    twice = torch.func.grad(lambda x: torch.func.grad(lambda x: ours(x).sum())(x).sum())
    with pytest.raises(RuntimeError, match="double backward .* backend='torch'"):
        twice(x)
    with pytest.raises(RuntimeError, match="forward-mode AD .* backend='torch'"):
        torch.func.jacfwd(ours)(x)


@needs_cuda
def test_cuda_round_trip_and_autocast():
    model = _model()
    on_gpu = model.cuda()
    assert on_gpu.linears[0].weight.is_cuda
    output = on_gpu(X.cuda())
    torch.testing.assert_close(output.cpu(), _model()(X), rtol=1e-4, atol=1e-5)
    with torch.autocast("cuda", dtype=torch.float16):
        assert on_gpu(X.cuda()).dtype == torch.float16
    assert on_gpu.cpu().linears[0].weight.device.type == "cpu"


# ---------------------------------------------------------------------------
# 5. Determinism
# ---------------------------------------------------------------------------
DETERMINISM_RUN = """
import hashlib, sys, torch, fastbp
from fastbp.train import FusedTrainer
try:
    fastbp.threads.use_reproducible_blas()  # before any torch op, as its docstring asks
    reproducible = "yes"
except RuntimeError as error:
    reproducible = f"no: {error}"
torch.set_num_threads(int(sys.argv[1]))
generator = torch.Generator().manual_seed(0)
x = torch.randn(512, 1000, generator=generator)
y = torch.randint(0, 10, (512,), generator=generator)
torch.manual_seed(0)
model = fastbp.nn.MLP([1000, 256, 128, 10])
output = model(x)
torch.nn.functional.cross_entropy(output, y).backward()
digest = hashlib.sha256(output.detach().numpy().tobytes())
for p in model.parameters():
    digest.update(p.grad.numpy().tobytes())
trainer = FusedTrainer(model, "cross_entropy", lr=0.1, momentum=0.9)
for _ in range(3):
    trainer.step(x, y)
for p in model.parameters():
    digest.update(p.detach().numpy().tobytes())
# 5 members divide among no thread count above 1: outside the reproducible mode they
# would run in blocks of rows, as many as the threads ask
ensemble = fastbp.nn.MLPEnsemble(5, [1000, 64, 10])
output = ensemble(x)
output.sum().backward()
digest.update(output.detach().numpy().tobytes())
for p in ensemble.parameters():
    digest.update(p.grad.numpy().tobytes())
trainer = FusedTrainer(ensemble, "cross_entropy", lr=0.1)
for _ in range(2):
    trainer.step(x, y)
for p in ensemble.parameters():
    digest.update(p.detach().numpy().tobytes())
print(digest.hexdigest(), reproducible)
"""


def _determinism_run(threads: int) -> tuple[str, str]:
    command = [sys.executable, "-c", DETERMINISM_RUN, str(threads)]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    digest, reproducible = result.stdout.strip().split(" ", 1)
    return digest, reproducible


def test_results_are_bit_identical_across_runs_and_thread_counts_with_reproducible_blas():
    # 512 x 1000 -> 256 -> 128 -> 10: large enough that every parallel path runs
    (first, reproducible), (again, _) = _determinism_run(2), _determinism_run(2)
    assert first == again
    if reproducible != "yes":
        pytest.skip(f"thread-count independence needs torch's MKL; here: {reproducible}")
    assert _determinism_run(1)[0] == first
    assert _determinism_run(4)[0] == first


def test_the_ops_plan_cache_frees_a_deleted_models_parameters():
    """The custom ops keep recent plans (a compiled model calls them every step), but
    never a deleted model's weights alive."""
    import gc
    import weakref

    model = fastbp.nn.MLP([6, 5, 3])
    x = torch.randn(4, 6, requires_grad=True)
    weights, biases = [m.weight for m in model.linears], [m.bias for m in model.linears]
    output = traced.custom_op_mlp(x, weights, biases, ["relu", "identity"])
    output.sum().backward()  # the forward's plan, reused by backward
    assert any(
        entry.plan.weights[0].data_ptr() == weights[0].data_ptr()
        for entry in traced._OP_PLANS.values()
    )
    freed = [weakref.ref(p) for p in model.parameters()]
    del model, weights, biases, output
    gc.collect()
    assert all(ref() is None for ref in freed)
    assert not any(entry.refs[0]() is None for entry in traced._OP_PLANS.values())
