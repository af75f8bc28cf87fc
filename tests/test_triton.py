"""fastbp.kernels.gpu and backend="triton", judged against a float64 reference.

Without a GPU the kernels run on CPU tensors in Triton's interpreter
(``TRITON_INTERPRET=1``, set by conftest before triton is imported), on small
shapes with tails: batch 1, 3, 17; widths 1, 10, 33, 100, below and above the
interpreter's 16- and 32-wide blocks. On a CUDA machine the same tests run on
the GPU, plus real sizes, half precision, CUDA graphs and torch.compile.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import warnings

import pytest
import torch

from fastbp import functional as F
from fastbp.kernels.activation_table import NAMES

from .helpers import (
    assert_as_accurate_as_torch,
    higher_precision,
    make_network,
    max_abs_error,
    named_results,
    needs_cuda,
    run_python,
    sm90_compile,
    torch_gradients,
)

pytest.importorskip(
    "triton", reason="Triton is not installed (pip install -e '.[test]' on Linux x86-64)"
)
import numpy as np  # noqa: E402
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from fastbp.kernels import gpu  # noqa: E402  (needs triton)

# The activations the fused kernels run; the others (layered only) are judged in
# test_activations.py through the "fastbp" cuda entry.
ACTIVATIONS = [NAMES[code] for code in gpu.FUSED_ACTIVATIONS]

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
HAS_CUDA = torch.cuda.is_available()


@triton.jit
def _probe_kernel(out_ptr, sizes, BLOCK: tl.constexpr):
    # a tuple argument's entry as a loop bound, as the fused kernels use widths[0]
    for start in range(0, sizes[0], BLOCK):
        offsets = start + tl.arange(0, BLOCK)
        tl.store(out_ptr + offsets, offsets.to(tl.float32), mask=offsets < sizes[0])


def _interpreter_problem() -> str | None:
    """Why this Triton's interpreter cannot run fastbp's kernels, or None.

    The test extra takes whatever Triton the installed torch pins, so that installing
    it never swaps torch; some of those interpreters fail beside a newer numpy
    (Triton 3.6 with numpy >= 2.4: a tuple entry used as an int).
    """
    out = torch.zeros(5)
    try:
        _probe_kernel[(1,)](out, (5,), BLOCK=4)
    except Exception as error:  # noqa: BLE001 - reported as the skip reason
        return (
            f"Triton {triton.__version__}'s interpreter cannot run fastbp's kernels beside "
            f"numpy {np.__version__} ({error!r}); Triton >= 3.7 can"
        )
    if out.tolist() != [0.0, 1.0, 2.0, 3.0, 4.0]:
        return f"Triton {triton.__version__}'s interpreter computed {out.tolist()} for a probe"
    return None


INTERPRETER_PROBLEM = _interpreter_problem() if INTERPRETED else None
DEVICES = [
    pytest.param(
        "cpu",
        marks=[
            pytest.mark.skipif(
                not INTERPRETED, reason="TRITON_INTERPRET is off (a CUDA GPU is present): see cuda"
            ),
            pytest.mark.skipif(INTERPRETER_PROBLEM is not None, reason=str(INTERPRETER_PROBLEM)),
        ],
    ),
    pytest.param("cuda", marks=needs_cuda),
]
SMALL = [(1, [3, 10]), (3, [33, 100, 10]), (17, [100, 1, 33]), (17, [10, 33, 17, 1])]


def _kernel_runner(fused: bool):
    """A registry.Runner over the kernels directly, forcing the fused or layered path."""

    def run(x, weights, biases, activations, grad_output):
        outputs = gpu.mlp_forward(x, weights, biases, activations, fused=fused)
        grads = gpu.mlp_backward(grad_output, x, weights, biases, activations, outputs, fused=fused)
        return outputs[len(weights) - 1], *grads

    return run


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "layered"])
@pytest.mark.parametrize("batch,sizes", SMALL, ids=lambda v: str(v))
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_kernels_as_accurate_as_torch(device, fused, batch, sizes, activation, bias):
    run = _kernel_runner(fused)
    for dtype in (torch.float32, torch.float64):
        assert_as_accurate_as_torch(
            f"triton-{'fused' if fused else 'layered'}",
            sizes,
            batch,
            activation,
            bias,
            dtype,
            device=device,
            run=run,
        )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "layered"])
@pytest.mark.parametrize("sizes", [[5, 7, 3], [5, 7, 6, 3]], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("special", [math.inf, -math.inf, math.nan], ids=str)
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")  # inf·0 in numpy
@pytest.mark.usefixtures("torch_at_the_limits")
def test_special_values_cross_layers_as_in_torch(device, fused, sizes, activation, special):
    # The fused kernels pad each layer to a power of 2: padded lanes must not turn
    # an inf in one row into NaN in the next layer's real lanes.
    x, weights, biases, grad = make_network(sizes, 4, dtype=torch.float32, seed=1)
    x[1, 2] = special
    activations = [activation] * len(weights)
    on = lambda tensors: [t.to(device) for t in tensors]  # noqa: E731
    ours = _kernel_runner(fused)(
        x.to(device), on(weights), on(biases), activations, grad.to(device)
    )
    torchs = torch_gradients(x, weights, biases, activations, grad)
    for name, value in named_results(torchs).items():
        got = named_results(ours)[name].cpu()
        assert torch.equal(torch.isnan(got), torch.isnan(value)), name
        torch.testing.assert_close(got, value, rtol=1e-4, atol=1e-5, equal_nan=True, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes", [(5, 7, 3), (300, 128, 128, 10)], ids=str)
def test_partial_gradient_sums_cover_every_row_block(device, sizes):
    # More row blocks than backward programs: each program adds each block's sums to
    # what it stored for the last one, which other threads of the program wrote (on
    # a GPU, a race without the barrier in _accumulate). At width 128 with a wide
    # input, every gradient tile of the fused backward takes that path.
    block = gpu.fused_plan(sizes, 10**6, torch.device(device)).BM
    batch = (3 * gpu.multiprocessors(torch.device(device)) + 1) * block
    assert_as_accurate_as_torch(
        "triton-fused",
        list(sizes),
        batch,
        "tanh",
        True,
        torch.float32,
        device=device,
        run=_kernel_runner(True),
    )


def test_offsets_beyond_int32_are_refused():
    gpu.check_offsets("x", gpu.INT32_MAX)  # the last one that fits
    with pytest.raises(ValueError, match=r"x spans 2,147,483,648 elements: .* 32-bit offsets"):
        gpu.check_offsets("x", gpu.INT32_MAX + 1)
    # A tensor's extent follows its strides: a (3, 2) view with row stride 2**30
    # reaches element 2·2**30 + 1.
    view = torch.empty_strided((3, 2), (2**30, 1), device="meta")
    with pytest.raises(ValueError, match="2,147,483,650 elements"):
        gpu.check_offsets("x", view)


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA GPUs; this machine has fewer"
)
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "layered"])
def test_tensors_on_a_second_gpu_run_there(fused):
    # The current device stays cuda:0, as in a DDP rank that never called set_device.
    assert torch.cuda.current_device() == 0
    assert_as_accurate_as_torch(
        "triton",
        [33, 16, 4],
        9,
        "tanh",
        True,
        torch.float32,
        device="cuda:1",
        run=_kernel_runner(fused),
    )


@needs_cuda
def test_a_batch_past_int32_offsets_is_refused_before_launch():
    x = torch.empty(gpu.INT32_MAX // 784 + 1, 784, dtype=torch.bfloat16, device="cuda")
    weights = [torch.empty(10, 784, dtype=torch.bfloat16, device="cuda")]
    with pytest.raises(ValueError, match="32-bit offsets"):
        gpu.mlp_forward(x, weights, [None], ["relu"])


@pytest.mark.parametrize("device", DEVICES)
def test_backend_triton_through_autograd(device):
    assert_as_accurate_as_torch(
        "fastbp", [33, 10, 3], 17, "sigmoid", True, torch.float32, device=device, entry="cuda"
    )


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_gradcheck_float64(device, bias):
    x, weights, biases, _ = make_network([4, 6, 3], 3, bias, seed=2)
    tensors = [x, *weights, *(b for b in biases if b is not None)]
    leaves = [t.to(device).requires_grad_() for t in tensors]

    def network(x, *params):
        ws, bs = list(params[:2]), list(params[2:]) if bias else [None, None]
        return F.mlp(x, ws, bs, ["tanh", "sigmoid"], backend="triton")

    assert torch.autograd.gradcheck(network, leaves)


# The interpreter runs tl.dot as numpy's matmul, which warns on the inf·0 products
# this test provokes on purpose (padded lanes hold zeros); a GPU says nothing.
@pytest.mark.filterwarnings("ignore:invalid value encountered in matmul:RuntimeWarning")
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(  # every activation (elu at NaN: see test_functional.SPECIAL_CASES)
    "activation, value",
    [(a, v) for a in NAMES for v in (float("nan"), float("inf")) if not (a == "elu" and v != v)],
)
@pytest.mark.usefixtures("torch_at_the_limits")
def test_nan_and_inf_propagate_as_in_torch(device, activation, value):
    x, weights, biases, grad_output = make_network([5, 4], 3, dtype=torch.float32, seed=7)
    x[0, 1] = value
    weights[0][2, 0] = -1.0
    results = {}
    for backend in ("triton", "torch"):
        leaves = [t.to(device).requires_grad_() for t in (x, weights[0], biases[0])]
        out = F.linear_act(*leaves, activation, backend=backend)
        out.backward(grad_output.to(device))
        results[backend] = [out.detach(), *(t.grad for t in leaves)]
    for ours, theirs in zip(results["triton"], results["torch"], strict=True):
        assert torch.equal(ours.isnan(), theirs.isnan())
        assert torch.equal(ours.isinf(), theirs.isinf())


@pytest.mark.parametrize("device", DEVICES)
def test_zero_rows_and_no_input_gradient(device):
    x, weights, biases, _ = make_network([6, 4, 2], 0, dtype=torch.float32)
    weights = [w.to(device).requires_grad_() for w in weights]
    out = F.mlp(
        x.to(device), weights, [b.to(device) for b in biases], ["relu"] * 2, backend="triton"
    )
    out.sum().backward()
    assert out.shape == (0, 2)
    assert all(torch.equal(w.grad, torch.zeros_like(w)) for w in weights)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_fused_trainer_with_triton_follows_the_torch_step(device, loss):
    from fastbp.nn import MLP
    from fastbp.train import FusedTrainer

    torch.manual_seed(0)
    models = [MLP([7, 16, 5], activation="tanh").to(device)]
    models.append(MLP.from_torch(models[0].to_torch()))
    x = torch.randn(9, 7, device=device)
    y = torch.randint(0, 5, (9,), device=device) if loss == "cross_entropy" else x[:, :5].clone()
    trainers = [
        FusedTrainer(model, loss, lr=0.1, momentum=0.9, backend=backend)
        for model, backend in zip(models, ("triton", "torch"), strict=True)
    ]
    for _ in range(3):
        losses = [trainer.step(x, y) for trainer in trainers]
        torch.testing.assert_close(*losses)
    for ours, theirs in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(ours, theirs)


def test_other_devices_are_refused_with_the_device_named():
    x, weights, biases, _ = make_network([6, 4], 3, dtype=torch.float32)
    meta = lambda t: t.to("meta")  # noqa: E731
    with pytest.raises(ValueError, match="backend 'triton' runs on CUDA tensors, got x on meta"):
        F.mlp(
            meta(x),
            [meta(w) for w in weights],
            [meta(b) for b in biases],
            ["relu"],
            backend="triton",
        )


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    """A fresh process that decides TRITON_INTERPRET for itself (unset unless given)."""
    return run_python(code, unset=("TRITON_INTERPRET",), **env)


def test_missing_triton_says_how_to_install():
    # A fresh process where `import triton` fails, as on a machine without it: fastbp
    # imports and runs on CPU, and backend="triton" says how to install it.
    result = _python(
        "import sys\n"
        "sys.modules['triton'] = None\n"
        "import torch, fastbp\n"
        "x = torch.ones(2, 3)\n"
        "w = torch.ones(4, 3)\n"
        "print(fastbp.functional.linear_act(x, w, backend='numba').sum().item())\n"
        "try:\n"
        "    fastbp.functional.linear_act(x, w, backend='triton')\n"
        "except RuntimeError as error:\n"
        "    print(error)\n"
    )
    assert result.returncode == 0, result.stderr
    total, message = result.stdout.splitlines()
    assert float(total) == 24.0
    assert "pip install 'fastbp[gpu]'" in message


def test_cpu_tensors_need_the_interpreter():
    result = _python(
        "import torch, fastbp\n"
        "x = torch.ones(2, 3)\n"
        "try:\n"
        "    fastbp.functional.linear_act(x, torch.ones(4, 3), backend='triton')\n"
        "except ValueError as error:\n"
        "    print(error)\n"
    )
    assert "backend 'triton' runs on CUDA tensors, got x on cpu" in result.stdout, result.stderr


def test_import_and_cpu_training_never_import_triton():
    result = _python(
        "import sys, torch, fastbp\n"
        "model = fastbp.nn.MLP([4, 8, 2])\n"
        "model(torch.ones(3, 4)).sum().backward()\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'triton'))\n"
    )
    assert result.stdout.strip() == "[]", result.stderr


def test_fused_true_warns_where_the_fused_kernel_spills(monkeypatch):
    """fused=True no longer takes a spilling kernel silently (the sm_90 check measures
    which do); where the fused kernel is the default, it says nothing."""
    monkeypatch.setattr(gpu, "interpreted", lambda device: False)  # as on a GPU
    weights = [torch.randn(3, 5)]
    message = "fused=True takes the fused backward kernel, which spills registers in float32"
    with pytest.warns(gpu.SpillWarning, match=message):
        gpu._fused_choice(True, weights, ["relu"], torch.randn(4, 5), False, backward=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        half = [w.half() for w in weights]
        assert gpu._fused_choice(True, half, ["relu"], torch.randn(4, 5).half(), False, False)


@pytest.mark.skipif(HAS_CUDA, reason="on a GPU the real tests compile every kernel")
def test_every_kernel_compiles_for_an_h100(request):
    # The interpreter accepts what a GPU compiler refuses (tl.dot blocks < 16,
    # loop-carried shape changes, shared memory): compile for sm_90 here, in the
    # worker that conftest started at collection.
    worker = sm90_compile(request.config)
    returncode = worker.process.wait()
    worker.output.seek(0)
    output = worker.output.read()
    assert returncode == 0, output  # it fails on a spill in a default path
    assert "compiled" in output
    lines = [json.loads(line[5:]) for line in output.splitlines() if line.startswith("SM90 {")]
    # 0 on every default path, but where the worker names a Triton's known spills
    default = [line for line in lines if line["default_path"]]
    assert default and all(line["spill_bytes"] <= line["allowed_spill_bytes"] for line in default)


# ---------------------------------------------------------------------------
# CUDA only: real sizes, half precision, TF32, CUDA graphs, torch.compile
# ---------------------------------------------------------------------------
REAL = [(64, [1000, 100, 10]), (4096, [784, 256, 128, 10]), (1, [784, 256, 128, 10])]


@needs_cuda
@pytest.mark.parametrize("batch,sizes", REAL, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_real_sizes_on_cuda(batch, sizes, dtype, activation, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert_as_accurate_as_torch(
        "fastbp", sizes, batch, activation, True, dtype, device="cuda", entry="cuda"
    )


@needs_cuda
def test_tf32_follows_torch_setting(monkeypatch):
    # Through F.mlp, which reads torch's flag on every call as torch's own matmuls do
    # (the launchers take it as an argument).
    x, weights, biases, grad = make_network([1000, 100, 10], 64, seed=3)
    activations = ["relu", "identity"]
    exact = named_results(higher_precision(x, weights, biases, activations, grad))["output"]
    on_gpu = lambda tensors: [t.float().cuda() for t in tensors]  # noqa: E731
    errors = {}
    for tf32 in (False, True):
        monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
        with torch.no_grad():
            output = F.mlp(
                x.float().cuda(), on_gpu(weights), on_gpu(biases), activations, backend="triton"
            )
        errors[tf32] = max_abs_error(output, exact)
    assert errors[False] < errors[True], errors  # TF32 keeps 10 mantissa bits, not 23


@needs_cuda
def test_training_step_captured_in_a_cuda_graph():
    from fastbp.registry import WORKLOADS, check_step

    check_step("fastbp-cudagraph", WORKLOADS["docs-64x1000x100x10"], "cuda", steps=3)


@needs_cuda
def test_torch_compile_runs_the_triton_kernels():
    from fastbp.nn import MLP

    model = MLP([33, 16, 4]).cuda()
    x = torch.randn(5, 33, device="cuda")
    expected = model(x)
    torch.testing.assert_close(torch.compile(model)(x), expected)
