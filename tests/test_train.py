"""FusedTrainer: k fused steps equal k steps of torch's own loss and optimizer."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

import fastbp
from fastbp import examples
from fastbp.kernels import cpu, reference
from fastbp.registry import TORCH_LOSSES, WORKLOADS, check_step, entries
from fastbp.train import TORCH_OPTIMIZERS, FusedTrainer

from .conftest import assert_no_less_accurate
from .test_examples import assert_matches_published

OPTIMIZERS = {
    "sgd": {},
    "sgd-momentum-decay": {"momentum": 0.9, "weight_decay": 0.01},
    "sgd-decay": {"weight_decay": 0.1},
    "adam": {"weight_decay": 0.01, "betas": (0.8, 0.99)},
}


def _problem(sizes, batch, loss, dtype, seed=0, activation="tanh"):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = fastbp.nn.MLP(sizes, activation, dtype=dtype)
    x = torch.randn(batch, sizes[0], generator=generator, dtype=dtype)
    if loss == "cross_entropy":
        y = torch.randint(0, sizes[-1], (batch,), generator=generator)
    else:
        y = torch.rand(batch, sizes[-1], generator=generator, dtype=dtype)
    return model, x, y


def _torch_run(model, x, y, loss, reduction, optimizer, hyper, steps):
    """Losses and final parameters of ``steps`` steps of nn.Sequential + torch.optim."""
    sequential = model.to_torch()
    options = {k: v for k, v in hyper.items() if k in ("lr", "momentum", "weight_decay", "betas")}
    opt = TORCH_OPTIMIZERS[optimizer](sequential.parameters(), **options)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        value = TORCH_LOSSES[loss](sequential(x), y, reduction=reduction)
        value.backward()
        opt.step()
        losses.append(value.detach())
    return torch.stack(losses), list(sequential.parameters()), opt


def _fused_run(model, x, y, loss, reduction, optimizer, hyper, steps, backend):
    trainer = FusedTrainer(model, loss, reduction, optimizer, backend=backend, **hyper)
    return torch.stack([trainer.step(x, y) for _ in range(steps)]), trainer


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("configuration", list(OPTIMIZERS))
@pytest.mark.parametrize("reduction", reference.REDUCTIONS)
@pytest.mark.parametrize("loss", reference.LOSSES)
def test_fused_steps_equal_torch_in_float64(loss, reduction, configuration, backend):
    hyper = {"lr": 0.05, **OPTIMIZERS[configuration]}
    optimizer = "adam" if configuration == "adam" else "sgd"
    model, x, y = _problem([7, 5, 3], 4, loss, torch.float64)
    expected, parameters, _ = _torch_run(model, x, y, loss, reduction, optimizer, hyper, 4)
    losses, _ = _fused_run(model, x, y, loss, reduction, optimizer, hyper, 4, backend)
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    for mine, theirs in zip(model.parameters(), parameters, strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-12, atol=1e-12)


# Awkward shapes: batch 1, width 1, odd widths, widths on both sides of the
# fused passes' parallel threshold (2**16 elements).
SHAPES = [([1, 1], 1), ([3, 1, 2], 1), ([13, 7, 5], 9), ([300, 257, 3], 300)]
SEEDS = range(16)


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("sizes, batch", SHAPES)
def test_fused_float32_gradients_are_as_accurate_as_torchs(sizes, batch, seed):
    """The gradients of a fused step, read from SGD's momentum buffer after one step
    (``buf = ∂p`` on the first step; lr 0 keeps the weights), judged by the accuracy
    criterion against a float64 run. The update is judged apart, below."""
    model, x, y = _problem(sizes, batch, "mse", torch.float64, seed=seed, activation="relu")
    exact = _torch_gradients(model.to_torch(), x, y)
    model, x, y = model.float(), x.float(), y.float()
    torchs = _torch_gradients(model.to_torch(), x, y)
    trainer = FusedTrainer(model, "mse", optimizer="sgd", lr=0.0, momentum=0.9)
    trainer.step(x, y)
    state = trainer.state_dict()["state"]
    for index, (theirs, truth) in enumerate(zip(torchs, exact, strict=True)):
        ours = state[index]["momentum_buffer"]
        assert_no_less_accurate(f"parameter {index}", ours, theirs, truth, torch.float32)


def _torch_gradients(sequential, x, y) -> list[torch.Tensor]:
    torch.nn.functional.mse_loss(sequential(x), y).backward()
    return [p.grad for p in sequential.parameters()]


def _torch_updates(start, grads, optimizer, hyper, dtype) -> torch.Tensor:
    """``start`` after one torch.optim step per gradient, all in ``dtype``."""
    param = start.to(dtype).clone()
    opt = TORCH_OPTIMIZERS[optimizer]([param], **hyper)
    for grad in grads:
        param.grad = grad.to(dtype)
        opt.step()
    return param


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("size", [1, 7, 70_000])  # 70 000 >= 2**16: the parallel update path
@pytest.mark.parametrize("configuration", ["sgd", "sgd-momentum-decay", "adam"])
def test_float32_updates_are_as_accurate_as_torchs(configuration, size, seed):
    """The update alone, fed the same float32 gradients bit for bit as torch's optimizer,
    against torch's update in float64 on those gradients. The slack is one float32 ulp
    of the largest parameter: an update cannot be closer than the parameter's own rounding."""
    hyper = {"lr": 0.01, **OPTIMIZERS[configuration]}
    optimizer = "adam" if configuration == "adam" else "sgd"
    generator = torch.Generator().manual_seed(seed)
    start = torch.randn(size, generator=generator)
    # gradients over six orders of magnitude, so that Adam's eps and the decay both matter
    grads = [torch.randn(size, generator=generator) * 10.0 ** -(3 * i) for i in range(3)]
    exact = _torch_updates(start, grads, optimizer, hyper, torch.float64)
    torchs = _torch_updates(start, grads, optimizer, hyper, torch.float32)
    ours = start.numpy().copy()
    kept = 2 if optimizer == "adam" else int(bool(hyper.get("momentum")))
    state = tuple(np.zeros_like(ours) for _ in range(kept))
    coefficients = cpu.check_hyperparameters(
        hyper["lr"], hyper.get("momentum", 0.0), hyper.get("weight_decay", 0.0),
        hyper.get("betas", (0.9, 0.999)), 1e-8,
    )  # fmt: skip
    for step, grad in enumerate(grads, start=1):
        cpu.update(ours, grad.numpy(), state, optimizer, coefficients, step)
    slack = torch.finfo(torch.float32).eps * exact.abs().max().item()
    assert_no_less_accurate(
        configuration, torch.from_numpy(ours), torchs, exact, torch.float32, slack
    )


def test_adam_forms_its_coefficients_as_torch_does():
    """(1 − β₂) rounded once from float64, not 1 − float32(β₂): with β₂ = 0.99 the
    second moment after one step is then exactly torch's float32 ``(1 − β₂)·g²``."""
    grad = np.full(3, 3.0, np.float32)
    param, m, v = np.zeros(3, np.float32), np.zeros(3, np.float32), np.zeros(3, np.float32)
    cpu.update(
        param, grad, (m, v), "adam", cpu.check_hyperparameters(0.1, 0, 0, (0.9, 0.99), 1e-8), 1
    )
    assert v[0] == np.float32(1 - 0.99) * np.float32(9.0)


@pytest.mark.parametrize("configuration", ["sgd", "sgd-momentum-decay", "adam"])
def test_fused_steps_through_the_parallel_paths_equal_torch_in_float64(configuration):
    """[300, 257, 3] at batch 300: 77 100 weights, so the updates and the δ passes
    take their parallel, blocked paths."""
    hyper = {"lr": 0.01, **OPTIMIZERS[configuration]}
    optimizer = "adam" if configuration == "adam" else "sgd"
    model, x, y = _problem([300, 257, 3], 300, "mse", torch.float64)
    expected, parameters, _ = _torch_run(model, x, y, "mse", "mean", optimizer, hyper, 3)
    losses, _ = _fused_run(model, x, y, "mse", "mean", optimizer, hyper, 3, "numba")
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    for mine, theirs in zip(model.parameters(), parameters, strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-12, atol=1e-12)


def test_workspaces_follow_a_changing_batch_size():
    model, x, y = _problem([6, 4, 2], 9, "mse", torch.float64)
    batches = [(x[:4], y[:4]), (x, y), (x[:1], y[:1]), (x[:4], y[:4])]
    sequential = model.to_torch()
    opt = torch.optim.SGD(sequential.parameters(), lr=0.1, momentum=0.5)
    trainer = FusedTrainer(model, optimizer="sgd", lr=0.1, momentum=0.5)
    for inputs, targets in batches:
        trainer.step(inputs, targets)
        opt.zero_grad()
        torch.nn.functional.mse_loss(sequential(inputs), targets).backward()
        opt.step()
    for mine, theirs in zip(model.parameters(), sequential.parameters(), strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("configuration", ["sgd-momentum-decay", "adam"])
def test_state_round_trips_through_torch_optim(configuration):
    """Two steps each way, then each side resumes from the other's state: both
    continue on the same trajectory."""
    hyper = {"lr": 0.05, **OPTIMIZERS[configuration]}
    optimizer = "adam" if configuration == "adam" else "sgd"
    torch_optimizer = TORCH_OPTIMIZERS[optimizer]
    model, x, y = _problem([5, 4, 3], 6, "cross_entropy", torch.float64)
    _, _, opt = _torch_run(model, x, y, "cross_entropy", "mean", optimizer, hyper, 2)
    _, trainer = _fused_run(model, x, y, "cross_entropy", "mean", optimizer, hyper, 2, "numba")

    sequential = model.to_torch()  # torch.optim resumes the fused run
    resumed_torch = torch_optimizer(sequential.parameters(), lr=1.0)
    resumed_torch.load_state_dict(trainer.state_dict())
    fused = FusedTrainer(model, "cross_entropy", optimizer=optimizer, lr=1.0)
    fused.load_state_dict(opt.state_dict())  # the fused run resumes torch.optim's
    for _ in range(2):
        fused.step(x, y)
        resumed_torch.zero_grad()
        torch.nn.functional.cross_entropy(sequential(x), y).backward()
        resumed_torch.step()
    for mine, theirs in zip(model.parameters(), sequential.parameters(), strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize(
    "loss, bad_y, error, words",
    [
        ("mse", lambda y: y[:, :2], ValueError, "shape (4, 3)"),
        ("mse", lambda y: y.double(), ValueError, "dtype torch.float32"),
        ("cross_entropy", lambda y: y.float(), TypeError, "int64 class indices"),
        ("cross_entropy", lambda y: y[:2], TypeError, "shape (4,)"),
        ("cross_entropy", lambda y: y + 3, ValueError, "outside [0, 3)"),
        ("cross_entropy", lambda y: y - 5, ValueError, "outside [0, 3)"),
        ("bce_with_logits", lambda y: [0.0], TypeError, "torch.Tensor"),
    ],
)
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_bad_targets_fail_before_any_parameter_changes(loss, bad_y, error, words, backend):
    model, x, y = _problem([6, 5, 3], 4, loss, torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = FusedTrainer(model, loss, backend=backend)
    with pytest.raises(error) as raised:
        trainer.step(x, bad_y(y))
    assert words in str(raised.value)
    for now, then in zip(model.parameters(), before, strict=True):
        assert torch.equal(now, then)


def test_non_contiguous_parameters_are_refused_not_copied():
    model, x, y = _problem([6, 5, 3], 4, "mse", torch.float32)
    weight = model.linears[0].weight
    weight.data = weight.data.t().contiguous().t()  # same values, transposed strides
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"weights\[0\] must be C-contiguous"):
        FusedTrainer(model, backend="numba").step(x, y)
    for now, then in zip(model.parameters(), before, strict=True):
        assert torch.equal(now, then)


@pytest.mark.parametrize(
    "arguments, words",
    [
        ({"loss": "hinge"}, "loss must be one of"),
        ({"reduction": "none"}, "reduction must be one of"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of"),
        ({"lr": -1.0}, "lr must be a finite number >= 0"),
        ({"betas": (0.9, 1.0)}, "betas must be two numbers in [0, 1)"),
        ({"backend": "cuda"}, "backend must be one of"),
    ],
)
def test_bad_configuration_is_named(arguments, words):
    model, _, _ = _problem([3, 2], 1, "mse", torch.float32)
    with pytest.raises(ValueError, match=re.escape(words)):
        FusedTrainer(model, **arguments)


def test_model_must_be_a_fastbp_mlp():
    with pytest.raises(TypeError, match="fastbp.nn.MLP"):
        FusedTrainer(torch.nn.Linear(2, 2))


# ---------------------------------------------------------------------------
# The worked examples through FusedTrainer. Their loss is ½Σ(o − y)²: MSE-sum
# at half the learning rate gives the same update, at twice the loss.
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("lr", [1.0, 10.0])
def test_e1_ten_steps_through_fused_trainer(lr):
    model = examples.e1_model()
    trainer = FusedTrainer(model, "mse", "sum", lr=lr / 2)
    first_loss = trainer.step(examples.E1_INPUT, examples.E1_TARGET).item() / 2
    for _ in range(9):
        trainer.step(examples.E1_INPUT, examples.E1_TARGET)
    weights = examples.e1_weights(model)
    run = f"10 steps, lr {lr:g}"
    values = {f"{run}: w{i}": w for i, w in enumerate(weights, start=1)}
    assert_matches_published("E1", values | {"first forward: loss": first_loss})


def test_e2_step_through_fused_trainer():
    model = examples.e2_model()
    loss = FusedTrainer(model, "mse", "sum", lr=0.25).step(examples.E2_INPUT, examples.E2_TARGET)
    assert_matches_published("E2", examples.e2_parameters(model) | {"loss": loss.item() / 2})


def test_e4_through_fused_trainer_ends_below_1e_minus_3():
    model, x, y = examples.e4_problem()
    sequential = model.to_torch()
    trainer = FusedTrainer(model, "mse", "sum", lr=1e-6)
    opt = torch.optim.SGD(sequential.parameters(), lr=1e-6)
    ours, torchs = [], []
    for _ in range(500):
        ours.append(trainer.step(x, y).item())
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(sequential(x), y, reduction="sum")
        loss.backward()
        opt.step()
        torchs.append(loss.item())
    assert ours[-1] < 1e-3
    torch.testing.assert_close(
        torch.tensor(ours[:50]), torch.tensor(torchs[:50]), rtol=1e-4, atol=0
    )


# ---------------------------------------------------------------------------
# Every training step the benchmarks time computes what torch-eager computes.
# ---------------------------------------------------------------------------
CHECKED_WORKLOADS = [
    "docs-64x1000x100x10",  # MSE sum, SGD, no bias
    "mnist-784x256x128x10-b64",  # cross-entropy, SGD momentum
    "rl-8x64x64x2-tanh-b64",  # tanh, Adam
    "seeds-2x2x2-sigmoid-b1",  # sigmoid output, batch 1
]


@pytest.mark.parametrize("workload", CHECKED_WORKLOADS)
@pytest.mark.parametrize("name", [e.name for e in entries("cpu", "step")])
def test_registered_steps_match_torch_eager(workload, name):
    if "compile" in name:
        torch._dynamo.reset()  # fresh caches, as fastbp bench gives each workload
    print(check_step(name, WORKLOADS[workload], steps=3))
