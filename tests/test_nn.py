"""fastbp.nn: nn.Linear's layout and init, round trips with nn.Sequential, lazy compilation."""

import subprocess
import sys

import pytest
import torch
from torch import nn

import fastbp

from .helpers import python_calls


def test_linear_initialises_exactly_like_nn_linear():
    torch.manual_seed(0)
    ours = fastbp.nn.Linear(7, 3)
    torch.manual_seed(0)
    theirs = nn.Linear(7, 3)
    assert torch.equal(ours.weight, theirs.weight) and torch.equal(ours.bias, theirs.bias)


def test_mlp_matches_the_sequential_it_replaces():
    torch.manual_seed(1)
    ours = fastbp.nn.MLP([20, 13, 8, 3], activation=["relu", "sigmoid"], bias=[False, False, True])
    torch.manual_seed(1)
    theirs = nn.Sequential(
        nn.Linear(20, 13, bias=False),
        nn.ReLU(),
        nn.Linear(13, 8, bias=False),
        nn.Sigmoid(),
        nn.Linear(8, 3),
    )
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    for (name, mine), (_, reference) in zip(
        ours.state_dict().items(), theirs.state_dict().items(), strict=True
    ):
        assert torch.equal(mine, reference), name
    ours.load_state_dict(theirs.state_dict())  # a checkpoint of the Sequential loads as is
    x = torch.randn(5, 20)
    torch.testing.assert_close(ours(x), theirs(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_round_trip_with_torch_is_exact(dtype):
    sequential = nn.Sequential(
        nn.Linear(6, 5),
        nn.Tanh(),
        nn.Linear(5, 4, bias=False),
        nn.ReLU(),
        nn.Linear(4, 2),
        nn.Sigmoid(),
    ).to(dtype)
    mlp = fastbp.nn.MLP.from_torch(sequential, backend="torch")
    assert mlp.activations == ("tanh", "relu", "sigmoid")
    back = mlp.to_torch()
    assert [type(m) for m in back] == [type(m) for m in sequential]
    for mine, reference in zip(back.parameters(), sequential.parameters(), strict=True):
        assert mine.dtype == dtype and torch.equal(mine, reference)
    x = torch.randn(3, 6, dtype=dtype)
    assert torch.equal(mlp(x), sequential(x))
    assert torch.equal(back(x), sequential(x))


@pytest.mark.parametrize(
    "modules, message",
    [
        ([nn.ReLU()], "sequential\\[0\\] is ReLU"),
        ([nn.Linear(2, 2), nn.CELU()], "sequential\\[1\\] is CELU"),
        ([nn.Linear(2, 2), nn.GELU(), nn.SiLU()], "sequential\\[2\\] is SiLU"),
        ([nn.Linear(2, 2), nn.ReLU(), nn.Tanh()], "sequential\\[2\\] is Tanh"),
        ([], "at least one nn.Linear"),
    ],
)
def test_from_torch_rejects_what_it_cannot_run(modules, message):
    with pytest.raises(ValueError, match=message):
        fastbp.nn.MLP.from_torch(nn.Sequential(*modules))


@pytest.mark.parametrize(
    "arguments, message",
    [
        (dict(sizes=[10]), "at least \\[in, out\\]"),
        (dict(sizes=[10, 0]), "sizes\\[1\\] must be a positive int, got 0"),
        (dict(sizes=[4, 3, 2], activation=["relu", "tanh"]), "activation must be one value or 1"),
        (dict(sizes=[4, 2], output_activation="softmax"), "activation must be one of"),
        (dict(sizes=[4, 2], backend="jax"), "backend must be one of"),
    ],
)
def test_mlp_rejects_bad_arguments(arguments, message):
    with pytest.raises(ValueError, match=message):
        fastbp.nn.MLP(**arguments)


def test_mlp_trains_like_the_sequential_with_torch_optim():
    torch.manual_seed(2)
    theirs = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    ours = fastbp.nn.MLP.from_torch(theirs, backend="numba")
    x, y = torch.randn(32, 10), torch.randn(32, 3)
    for model in (ours, theirs):
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for _ in range(5):
            optimizer.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            optimizer.step()
    for mine, reference in zip(ours.parameters(), theirs.parameters(), strict=True):
        torch.testing.assert_close(mine, reference)


def test_import_compiles_no_kernel_and_the_readme_example_runs():
    script = (
        "import fastbp, torch, numba.core.registry as r\n"
        "from fastbp.kernels import cpu\n"
        "compiled = [f for f in vars(cpu).values() if hasattr(f, 'signatures') and f.signatures]\n"
        "assert not compiled, compiled\n"
        "m = fastbp.nn.MLP([1000, 100, 10], bias=False)\n"
        "m(torch.randn(64, 1000)).sum().backward()\n"
        "assert all(p.grad is not None for p in m.parameters())\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)


# The bounds on Python calls per call of the drop-in (counts, not timings).
NO_GRAD_FORWARD_CALLS = 15
TRAINING_CALLS = 45


def _seeds_net():
    from fastbp.registry import WORKLOADS

    workload = WORKLOADS["seeds-2x2x2-sigmoid-b1"]
    x, _ = workload.data()
    return fastbp.nn.MLP.from_torch(workload.model()), workload.model(), x


def test_a_no_grad_forward_makes_few_python_calls():
    model, sequential, x = _seeds_net()

    def forward(network):
        def run():
            network(x)

        return run

    with torch.no_grad():
        ours, torchs = python_calls(forward(model)), python_calls(forward(sequential))
    assert len(ours) <= NO_GRAD_FORWARD_CALLS, ours
    assert len(torchs) > len(ours), torchs  # the count sees torch's own chain too


def test_a_training_step_makes_few_python_calls():
    model, sequential, x = _seeds_net()

    def step(network):
        def run():
            network.zero_grad()
            network(x).sum().backward()

        return run

    ours, torchs = python_calls(step(model)), python_calls(step(sequential))
    assert len(ours) <= TRAINING_CALLS, ours
    assert len(torchs) > len(ours), torchs


def test_setting_backend_after_a_forward_takes_effect():
    model, _, x = _seeds_net()
    model(x)
    model.backend = "torch"
    model(x)
    assert model._plan.backend == "torch"


@pytest.mark.parametrize("set_to_none", [True, False])
def test_zero_grad_does_what_torchs_does(set_to_none):
    model, sequential, x = _seeds_net()
    for network in (model, sequential):
        for _ in range(2):  # the second call takes the bound path
            network(x).sum().backward()
            network.zero_grad(set_to_none)
    for ours, theirs in zip(model.parameters(), sequential.parameters(), strict=True):
        assert (ours.grad is None) == (theirs.grad is None) == set_to_none
        if not set_to_none:
            assert torch.equal(ours.grad, theirs.grad)


# edit(model) after two forwards, the second through the bound path (nn.BoundModel)
FORWARD_EDITS = {
    "weight .data": lambda m: setattr(m[0].weight, "data", m[0].weight.data * 2),
    "weight replaced": lambda m: setattr(m[0], "weight", nn.Parameter(m[0].weight.data * 2)),
    "bias removed": lambda m: setattr(m[2], "bias", None),
    "child replaced": lambda m: m.__setitem__(1, nn.Tanh()),
    "activation setting": lambda m: setattr(m[1], "negative_slope", 0.3),
    "forward hook": lambda m: m[2].register_forward_hook(lambda module, args, out: out * 3),
    "forward pre-hook": lambda m: m[0].register_forward_pre_hook(lambda module, a: (a[0] * 2,)),
    "global forward hook": lambda m: torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, out: out * 3
    ),
}


@pytest.mark.parametrize("edit", list(FORWARD_EDITS))
def test_a_forward_after_an_edit_runs_the_edited_network(edit):
    torch.manual_seed(0)
    model = fastbp.nn.MLP([5, 4, 3], nn.LeakyReLU(0.1), dtype=torch.float64)
    x = torch.randn(6, 5, dtype=torch.float64)
    for _ in range(2):
        model(x)
    handle = FORWARD_EDITS[edit](model)
    try:
        expected = nn.Sequential(*model.children())(x)  # the same children, one by one
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    finally:
        if handle is not None:
            handle.remove()  # a global hook would reach every later test
