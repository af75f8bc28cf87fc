"""FusedTrainer: k fused steps equal k steps of torch's own loss and optimizer."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch

import fastbp
from fastbp import examples, train
from fastbp.kernels import cpu, cpu_jit, reference
from fastbp.registry import TORCH_LOSSES, WORKLOADS, check_step, entries, huber_loss
from fastbp.train import TORCH_OPTIMIZERS, FusedTrainer

from .helpers import assert_matches_published, assert_no_less_accurate, python_calls

# A FusedTrainer step whose model, optimizer and batch are those of the step before:
# the bound step's checks, the thread policy and the kernel's launch.
BOUND_STEP_CALLS = 20
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
    coefficients = cpu.hyperparameters(
        hyper["lr"],
        hyper.get("momentum", 0.0),
        hyper.get("weight_decay", 0.0),
        hyper.get("betas", (0.9, 0.999)),
        1e-8,
    )
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
    cpu.update(param, grad, (m, v), "adam", cpu.hyperparameters(0.1, 0, 0, (0.9, 0.99), 1e-8), 1)
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


# Shapes whose steps split GEMMs among tasks (cpu.Network.splits): the first splits its
# forward GEMM by columns of z and layer 1's ∂W (with its update) by rows of W; the
# second its forward by rows, with 300 rows of x; the third also a middle layer's ∂x.
SPLIT_SHAPES = [([301, 257, 3], 17), ([129, 64, 5], 300), ([200, 160, 120, 3], 64)]


@pytest.mark.parametrize("tasks", [2, 3, 7])
@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
@pytest.mark.parametrize("configuration", ["sgd", "sgd-momentum-decay", "adam"])
@pytest.mark.parametrize("sizes, batch", SPLIT_SHAPES, ids=str)
def test_a_step_split_among_tasks_equals_one_task_in_float64(
    sizes, batch, configuration, max_grad_norm, tasks, monkeypatch
):
    """GEMMs split among more tasks than numba has threads, and among fewer rows than
    tasks, move nothing but the rounding of the sums; clipping takes the path that
    writes every gradient first."""
    hyper = {"lr": 0.01, **OPTIMIZERS[configuration]}
    optimizer = "adam" if configuration == "adam" else "sgd"
    results = []
    for count in (tasks, 1):
        monkeypatch.setattr(cpu.TrainStep, "_tasks", lambda self, batch, count=count: count)
        model, x, y = _problem(sizes, batch, "mse", torch.float64)
        trainer = FusedTrainer(model, "mse", "mean", optimizer, max_grad_norm=max_grad_norm,
                               **hyper)  # fmt: skip
        losses = torch.stack([trainer.step(x, y) for _ in range(3)])
        assert trainer._kernel[1].network.splits(batch)
        results.append((losses, [p.detach() for p in model.parameters()]))
    (losses, parameters), (one_task_losses, one_task_parameters) = results
    torch.testing.assert_close(losses, one_task_losses, rtol=1e-12, atol=1e-12)
    for mine, theirs in zip(parameters, one_task_parameters, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


# Blocks of rows (cpu_jit._in_row_blocks): a batch the blocks do not divide evenly, two
# blocks a task with 2 tasks (at most ROW_BLOCK_ROWS rows a block) and one with 3, on a
# net whose steps split their GEMMs; layers whose derivative reads z (gelu) and a (tanh),
# one without a bias.
ROW_BLOCK_SIZES, ROW_BLOCK_BATCH = [64, 48, 33, 7], 2 * cpu_jit.ROW_BLOCK_ROWS + 3


@pytest.mark.parametrize("tasks", [2, 3])
@pytest.mark.parametrize("loss", [*reference.LOSSES, "huber"])
def test_a_step_in_blocks_of_rows_equals_one_task_in_float64(loss, tasks, monkeypatch):
    """Each block's forward, loss gradient and chain of δ's, then ∂W and ∂b summed over
    the blocks, equal one task's whole-batch step but for rounding, for every loss: the
    string ones and one written in torch (which runs its forward apart)."""
    results = []
    for count in (tasks, 1):
        monkeypatch.setattr(cpu.TrainStep, "_tasks", lambda self, batch, count=count: count)
        _, x, y = _problem(ROW_BLOCK_SIZES, ROW_BLOCK_BATCH, loss, torch.float64)
        model = fastbp.nn.MLP(ROW_BLOCK_SIZES, ["gelu", "tanh"], bias=[True, False, True],
                              dtype=torch.float64)  # fmt: skip
        trainer = FusedTrainer(model, huber_loss if loss == "huber" else loss,
                               optimizer=torch.optim.Adam(model.parameters(), lr=0.01))  # fmt: skip
        losses = torch.stack([trainer.step(x, y) for _ in range(3)])
        step = trainer._kernel[1]
        blocked = cpu_jit._in_row_blocks(ROW_BLOCK_BATCH, step.network.weights,
                                         step._workspaces[1], 0.0, count)  # fmt: skip
        assert blocked == (count > 1)
        results.append((losses, [p.detach() for p in model.parameters()]))
    (losses, parameters), (one_task_losses, one_task_parameters) = results
    torch.testing.assert_close(losses, one_task_losses, rtol=1e-12, atol=1e-12)
    for mine, theirs in zip(parameters, one_task_parameters, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-12, atol=1e-12)


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


# ---------------------------------------------------------------------------
# torch.optim optimizers and schedulers: 30 steps equal the plain torch loop
# ---------------------------------------------------------------------------
def _sgd(params):
    return torch.optim.SGD(params, lr=0.05, momentum=0.9, weight_decay=0.01)


def _two_groups(params):
    """Each layer's weight in a group of its own lr; the biases in a third."""
    params = list(params)
    return torch.optim.SGD(
        [
            {"params": [params[0]], "lr": 0.1},
            {"params": [params[2]], "lr": 0.02},
            {"params": [params[1], params[3]]},
        ],
        lr=0.05,
        momentum=0.5,
    )


RUNS = {
    "sgd-momentum-decay-steplr": (_sgd, lambda o: torch.optim.lr_scheduler.StepLR(o, 7, 0.5), None),
    "adam-onecycle": (
        lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01),
        lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.05, total_steps=30),
        None,
    ),
    "adamw-cosine": (
        lambda p: torch.optim.AdamW(p, lr=0.02, betas=(0.8, 0.99), weight_decay=0.1),
        lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 30),
        None,
    ),
    "sgd-param-groups": (_two_groups, None, None),
    "sgd-clipped": (_sgd, None, 0.05),
    "adam-clipped": (lambda p: torch.optim.Adam(p, lr=0.01), None, 0.05),
}


def _loop(step, model, configure, steps=30, at_step=None):
    """``steps`` of ``step(optimizer)`` with a scheduler stepping after each; ``at_step``
    (step index, optimizer) runs before each step, as a user's hand edit would."""
    build, schedule, _ = configure
    optimizer = build(model.parameters())
    scheduler = schedule(optimizer) if schedule else None
    losses = []
    for index in range(steps):
        if at_step:
            at_step(index, optimizer)
        losses.append(step(optimizer))
        if scheduler:
            scheduler.step()
    return torch.stack(losses)


def _torch_step(sequential, x, y, max_norm):
    def step(optimizer):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(sequential(x), y)
        loss.backward()
        if max_norm:
            torch.nn.utils.clip_grad_norm_(sequential.parameters(), max_norm)
        optimizer.step()
        return loss.detach()

    return step


def _fused_step(model, x, y, max_norm, backend="numba"):
    trainers = {}

    def step(optimizer):
        if id(optimizer) not in trainers:
            trainers[id(optimizer)] = FusedTrainer(
                model,
                "cross_entropy",
                optimizer=optimizer,
                max_grad_norm=max_norm,
                backend=backend,
            )
        return trainers[id(optimizer)].step(x, y)

    return step


def _halve_lr_at_10(index, optimizer):
    if index == 10:
        optimizer.param_groups[0]["lr"] *= 0.5


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("run", [*RUNS, "manual-lr-change"])
def test_thirty_steps_equal_the_torch_loop_in_float64(run, backend):
    configure = RUNS.get(run, RUNS["sgd-momentum-decay-steplr"])
    at_step = _halve_lr_at_10 if run == "manual-lr-change" else None
    model, x, y = _problem([7, 6, 4], 9, "cross_entropy", torch.float64, activation="tanh")
    sequential = model.to_torch()
    max_norm = configure[2]
    expected = _loop(
        _torch_step(sequential, x, y, max_norm), sequential, configure, at_step=at_step
    )
    losses = _loop(_fused_step(model, x, y, max_norm, backend), model, configure, at_step=at_step)
    torch.testing.assert_close(losses, expected, rtol=1e-12, atol=1e-12)
    for mine, theirs in zip(model.parameters(), sequential.parameters(), strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("run", list(RUNS))
def test_thirty_float32_steps_stay_as_close_to_float64_as_torchs(run):
    configure = RUNS[run]
    model, x, y = _problem([7, 6, 4], 9, "cross_entropy", torch.float64, activation="tanh")
    exact = model.to_torch()
    _loop(_torch_step(exact, x, y, configure[2]), exact, configure)
    model, x = model.float(), x.float()
    torchs = model.to_torch()
    _loop(_torch_step(torchs, x, y, configure[2]), torchs, configure)
    _loop(_fused_step(model, x, y, configure[2]), model, configure)
    triples = zip(model.parameters(), torchs.parameters(), exact.parameters(), strict=True)
    for ours, theirs, truth in triples:
        slack = 8 * torch.finfo(torch.float32).eps * truth.abs().max().item()
        ours, theirs, truth = ours.detach(), theirs.detach(), truth.detach()
        assert_no_less_accurate(run, ours, theirs, truth, torch.float32, slack)


@pytest.mark.parametrize("rule", ["sgd", "adam"])
def test_a_run_moves_between_fused_trainer_and_the_torch_loop(rule):
    """Two fused steps, two torch steps on the same optimizer, a checkpoint of it loaded
    into a new optimizer and a new trainer, two more fused steps: the same trajectory
    as six uninterrupted torch steps."""
    build = {"sgd": _sgd, "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.01)}[rule]
    model, x, y = _problem([5, 4, 3], 6, "cross_entropy", torch.float64)
    uninterrupted = model.to_torch()
    _loop(_torch_step(uninterrupted, x, y, None), uninterrupted, (build, None, None), steps=6)

    optimizer = build(model.parameters())
    trainer = FusedTrainer(model, "cross_entropy", optimizer=optimizer)
    for _ in range(2):
        trainer.step(x, y)
    for _ in range(2):  # the plain loop on fastbp's own model and the same optimizer
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
    checkpoint = copy.deepcopy(optimizer.state_dict())
    resumed = build(model.parameters())
    resumed.load_state_dict(checkpoint)
    trainer = FusedTrainer(model, "cross_entropy", optimizer=resumed)
    for _ in range(2):
        trainer.step(x, y)
    for mine, theirs in zip(model.parameters(), uninterrupted.parameters(), strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-12, atol=1e-12)


def test_the_string_form_builds_the_optimizer_it_names():
    model, _, _ = _problem([3, 2], 1, "mse", torch.float32)
    trainer = FusedTrainer(model, optimizer="adamw", lr=0.1, betas=(0.8, 0.9))
    assert type(trainer.optimizer) is torch.optim.AdamW
    group = trainer.optimizer.param_groups[0]
    assert group["lr"] == 0.1 and group["betas"] == (0.8, 0.9) and group["weight_decay"] == 0.01


@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda p: torch.optim.RMSprop(p), TypeError, "torch.optim.SGD, Adam or AdamW"),
        (
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True),
            ValueError,
            "nesterov=True",
        ),
        (
            lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5),
            ValueError,
            "dampening=0.5",
        ),
        (lambda p: torch.optim.Adam(p, amsgrad=True), ValueError, "amsgrad=True"),
        (lambda p: torch.optim.AdamW(p, maximize=True), ValueError, "maximize=True"),
        (
            lambda p: torch.optim.SGD([*p, torch.nn.Parameter(torch.zeros(1))], lr=0.1),
            ValueError,
            "1 foreign",
        ),
        (lambda p: torch.optim.SGD(list(p)[:1], lr=0.1), ValueError, "of the model's missing"),
    ],
)
def test_optimizers_the_kernels_cannot_run_are_refused_at_construction(make, error, words):
    model, _, _ = _problem([3, 2], 1, "mse", torch.float32)
    with pytest.raises(error, match=re.escape(words)):
        FusedTrainer(model, optimizer=make(model.parameters()))


def test_an_unsupported_option_set_later_raises_at_the_next_step():
    model, x, y = _problem([3, 2], 2, "mse", torch.float32)
    trainer = FusedTrainer(model, optimizer="sgd", lr=0.1, momentum=0.9)
    trainer.step(x, y)
    trainer.optimizer.param_groups[0]["nesterov"] = True
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="nesterov=True"):
        trainer.step(x, y)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before, strict=True))


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda t: setattr(t, "lr", 0.0), "hyperparameters live in trainer.optimizer.param_groups"),
        (lambda t: setattr(t, "momentum", 0.9), "no setting 'momentum'"),
        (lambda t: setattr(t, "optimizer", None), "fixed at construction"),
        (lambda t: setattr(t, "max_grad_norm", -1.0), "max_grad_norm must be a finite number"),
    ],
)
def test_a_setting_that_would_be_ignored_raises(change, words):
    model, _, _ = _problem([3, 2], 1, "mse", torch.float32)
    trainer = FusedTrainer(model, optimizer="sgd")
    with pytest.raises((AttributeError, ValueError), match=re.escape(words)):
        change(trainer)


def test_settings_take_effect_at_the_next_step():
    model, x, y = _problem([3, 2], 2, "mse", torch.float64)
    sequential = model.to_torch()
    trainer = FusedTrainer(model, optimizer="sgd", lr=0.1)
    trainer.step(x, y)
    trainer.reduction, trainer.max_grad_norm = "sum", 0.01
    trainer.step(x, y)
    optimizer = torch.optim.SGD(sequential.parameters(), lr=0.1)
    for reduction, max_norm in (("mean", None), ("sum", 0.01)):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(sequential(x), y, reduction=reduction).backward()
        if max_norm:
            torch.nn.utils.clip_grad_norm_(sequential.parameters(), max_norm)
        optimizer.step()
    for mine, theirs in zip(model.parameters(), sequential.parameters(), strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------
# The bound step: after a step, the next re-checks what the first checked in one frame
# ---------------------------------------------------------------------------
def _replace_momentum_buffer(model, trainer):
    state = trainer.optimizer.state[model[0].weight]
    state["momentum_buffer"] = state["momentum_buffer"].clone()


def _reload_optimizer_state(model, trainer):
    trainer.optimizer.load_state_dict(copy.deepcopy(trainer.optimizer.state_dict()))


def _replace_weight(model, trainer):
    model[0].weight = torch.nn.Parameter(model[0].weight.data * 2)


# edit(model, trainer) between steps; a hook's handle it returns is removed after
EDITS = {
    "nothing": lambda m, t: None,
    "weight .data": lambda m, t: setattr(m[0].weight, "data", m[0].weight.data * 2),
    "weight replaced": _replace_weight,
    "child replaced": lambda m, t: m.__setitem__(1, torch.nn.Tanh()),
    "activation setting": lambda m, t: setattr(m[1], "negative_slope", 0.3),
    "forward hook": lambda m, t: m[2].register_forward_hook(lambda *a: None),
    "global hook": lambda m, t: torch.nn.modules.module.register_module_forward_hook(print),
    "lr": lambda m, t: t.optimizer.param_groups[0].update(lr=0.5),
    "nesterov": lambda m, t: t.optimizer.param_groups[0].update(nesterov=True),
    "optimizer state loaded": _reload_optimizer_state,
    "momentum buffer replaced": _replace_momentum_buffer,
    "step hook": lambda m, t: t.optimizer.register_step_pre_hook(lambda *a: None),
    "max_grad_norm": lambda m, t: setattr(t, "max_grad_norm", 0.01),
    "reduction": lambda m, t: setattr(t, "reduction", "sum"),
    "backend": lambda m, t: setattr(t, "backend", "torch"),
}
# the next step's arguments, from the (x, y) of the steps before
CALLS = {
    "another batch": lambda x, y: (x[:3], y[:3]),
    "strided x": lambda x, y: (x.t().contiguous().t(), y),
    "x requires grad": lambda x, y: (x.clone().requires_grad_(), y),
    "y of another dtype": lambda x, y: (x, y.float()),
    "x of another dtype": lambda x, y: (x.float(), y),
    "two targets": lambda x, y: (x, y, y),
}


def _step_after(change, taken=None):
    """The outcome (loss or exception) of a step after two steps and ``change`` (an edit
    or another call), and the parameters after it; ``taken`` is emptied before that step."""
    torch.manual_seed(0)
    model = fastbp.nn.MLP([5, 4, 3], torch.nn.LeakyReLU(0.1), dtype=torch.float64)
    trainer = FusedTrainer(model, "mse", optimizer="sgd", lr=0.1, momentum=0.9)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    for _ in range(2):
        trainer.step(x, y)
    handle = EDITS[change](model, trainer) if change in EDITS else None
    arguments = (x, y) if change in EDITS else CALLS[change](x, y)
    if taken is not None:
        taken.clear()
    try:
        outcome = trainer.step(*arguments)
    except (TypeError, ValueError) as error:
        outcome = f"{type(error).__name__}: {error}"
    finally:
        if handle is not None:
            handle.remove()
    return outcome, [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("edit", [*EDITS, *CALLS])
def test_a_step_after_an_edit_does_what_the_full_checks_do(edit, monkeypatch):
    """The bound step (``train._Ready``) runs only where nothing the full path checks has
    changed: after any edit, a step does what it does with the bound step turned off."""
    taken, bound_step = [], train._Ready.__call__

    def spied(*arguments):
        taken.append("raised")
        taken[-1] = bound_step(*arguments)
        return taken[-1]

    monkeypatch.setattr(train._Ready, "__call__", spied)
    outcome, parameters = _step_after(edit, taken)
    monkeypatch.setattr(train._Ready, "__call__", lambda *a: None)
    full_outcome, full_parameters = _step_after(edit)
    if isinstance(full_outcome, str):
        assert outcome == full_outcome
    else:
        torch.testing.assert_close(outcome, full_outcome, rtol=0, atol=0)
    for mine, theirs in zip(parameters, full_parameters, strict=True):
        torch.testing.assert_close(mine, theirs, rtol=0, atol=0)
    # the bound step stepped or raised what the full path raises; else it was dropped or
    # passed the call on
    stepped = bool(taken) and taken[-1] is not None
    assert stepped == (edit in ("nothing", "lr", "nesterov", "step hook")), taken


def test_a_bound_step_makes_few_python_calls():
    model, x, y = _problem([2, 2, 2], 1, "mse", torch.float32, activation="sigmoid")
    trainer = FusedTrainer(model, "mse", optimizer="sgd", lr=0.1)
    sequential = model.to_torch()
    optimizer = torch.optim.SGD(sequential.parameters(), lr=0.1)

    def torch_step():
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(sequential(x), y).backward()
        optimizer.step()

    ours, torchs = python_calls(lambda: trainer.step(x, y)), python_calls(torch_step)
    assert len(ours) <= BOUND_STEP_CALLS, ours
    assert len(torchs) > len(ours), torchs


def test_hyperparameters_are_refused_beside_an_optimizer_object():
    model, _, _ = _problem([3, 2], 1, "mse", torch.float32)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="lr given beside an optimizer object"):
        FusedTrainer(model, optimizer=optimizer, lr=0.5)


def test_optimizer_step_hooks_are_refused_rather_than_skipped():
    model, x, y = _problem([3, 2], 2, "mse", torch.float32)
    trainer = FusedTrainer(model, backend="numba")
    trainer.optimizer.register_step_post_hook(lambda *args: None)
    with pytest.raises(ValueError, match="step hooks"):
        trainer.step(x, y)


def test_a_hooked_model_is_refused_rather_than_its_hooks_skipped():
    model, x, y = _problem([3, 2], 2, "mse", torch.float32)
    model[0].register_forward_hook(lambda *args: None)
    with pytest.raises(ValueError, match="hooks would not fire"):
        FusedTrainer(model).step(x, y)


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
        ({"optimizer": "adam", "betas": (0.9, 1.0)}, "betas must be two numbers in [0, 1)"),
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
    "ensemble-5x(23-200-200-200-18)-b256",  # an ensemble, a batch per member, silu, Adam
]
# each entry on the workloads it runs (the ensembles' baselines on ensembles alone)
CHECKED_STEPS = [
    (workload, entry.name)
    for workload in CHECKED_WORKLOADS
    for entry in entries("cpu", "step")
    if entry.runs(WORKLOADS[workload])
]


@pytest.mark.parametrize(("workload", "name"), CHECKED_STEPS)
def test_registered_steps_match_torch_eager(workload, name):
    if "compile" in name:
        torch._dynamo.reset()  # fresh caches, as fastbp bench gives each workload
    print(check_step(name, WORKLOADS[workload], steps=3))


def test_momentum_turned_on_mid_run_starts_its_buffers_as_torch_does():
    model, x, y = _problem([4, 3, 2], 5, "mse", torch.float64)
    sequential = model.to_torch()
    mine = torch.optim.SGD(model.parameters(), lr=0.1)
    theirs = torch.optim.SGD(sequential.parameters(), lr=0.1)
    trainer = FusedTrainer(model, optimizer=mine)
    for index in range(4):
        if index == 2:
            for optimizer in (mine, theirs):
                optimizer.param_groups[0]["momentum"] = 0.9
        trainer.step(x, y)
        theirs.zero_grad()
        torch.nn.functional.mse_loss(sequential(x), y).backward()
        theirs.step()
    for ours, reference_ in zip(model.parameters(), sequential.parameters(), strict=True):
        torch.testing.assert_close(ours.detach(), reference_.detach(), rtol=1e-12, atol=1e-12)


def test_the_kernel_refuses_state_arrays_its_rule_would_read_past():
    weights = [np.ones((3, 4)), np.ones((2, 3))]
    network = cpu.Network(weights, [np.ones(3), None], ["relu", "identity"])
    step = cpu.TrainStep(network, "mse", "mean", "sgd")
    empty = np.empty(0)
    bound = step.bind([empty] * 6, [np.zeros(1, np.float32)] * 3)
    hyper = np.tile(cpu.hyperparameters(0.1, momentum=0.9), (3, 1))
    with pytest.raises(ValueError, match="parameter 0's update reads a momentum buffer of 12"):
        step(np.ones((2, 4)), np.ones((2, 2)), bound, hyper, np.zeros(3, bool))
    assert np.all(weights[0] == 1)


def _bare_step(loss):
    """A float64 TrainStep of a 3-4-2 net with plain SGD, and its bound state."""
    rng = np.random.default_rng(3)
    network = cpu.Network(
        [rng.normal(size=(4, 3)), rng.normal(size=(2, 4))],
        [np.zeros(4), None],
        ["tanh", "identity"],
    )
    step = cpu.TrainStep(network, loss, "mean", "sgd")
    bound = step.bind([np.empty(0)] * 6, [np.zeros(1)] * 3)
    hyper = np.tile(cpu.hyperparameters(0.1), (3, 1))
    return network, step, (bound, hyper, np.zeros(3, bool))


def _batch(loss, rows, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, rows) if loss == "cross_entropy" else rng.normal(size=(rows, 2))
    return rng.normal(size=(rows, 3)), y


@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_again_steps_as_a_full_call_does_and_keeps_no_batch(loss):
    """``TrainStep.again`` reuses the last call's kernel arguments: it must step as the
    full call does, let go of the caller's batch, and keep the arguments it checked when
    a later full call on another batch raised after making that batch's workspaces."""
    import weakref

    ours, step, state = _bare_step(loss)
    theirs, reference_step, reference_state = _bare_step(loss)
    x, y = _batch(loss, 5, seed=0)
    losses = [step(x, y, *state), reference_step(x, y, *reference_state)]
    bad_x, bad_y = _batch(loss, 7, seed=1)
    with pytest.raises(ValueError, match="y must have shape"):
        step(bad_x, bad_y[:3], *state)  # x's 7 rows laid out first, then y refused
    for seed in (2, 3):
        x, y = _batch(loss, 5, seed)
        losses += [step.again(x, y, *state), reference_step(x, y, *reference_state)]
        batch = weakref.ref(x), weakref.ref(y)
        del x, y
        assert batch[0]() is None and batch[1]() is None  # again keeps no batch alive
    assert losses[0::2] == losses[1::2]
    for mine, reference_ in zip(ours.weights, theirs.weights, strict=True):
        np.testing.assert_array_equal(mine, reference_)


@pytest.mark.parametrize(
    "x, error, words",
    [
        (torch.zeros(4, 5), ValueError, r"x must have shape \(batch, 3\) for the model's 3 input"),
        (torch.zeros(4), ValueError, r"x must have shape \(batch, 3\).*got shape \(4,\)"),
        (torch.zeros(4, 3, dtype=torch.int64), TypeError, "x must be a floating-point tensor"),
        ([[0.0] * 3] * 4, TypeError, "x must be a torch.Tensor, got list"),
    ],
    ids=["width", "1-D", "int64", "list"],
)
def test_a_bad_x_is_named_as_the_input(x, error, words):
    model, _, _ = _problem([3, 2], 4, "mse", torch.float32)
    with pytest.raises(error, match=words):
        FusedTrainer(model).step(x, torch.zeros(4, 2))
