"""FusedTrainer with a loss written in torch: the torch loop's trajectory, and clear refusals."""

from __future__ import annotations

import copy

import pytest
import torch

import fastbp
from fastbp.registry import huber_loss, ppo_loss
from fastbp.train import FusedTrainer

from .helpers import assert_no_less_accurate


def weighted_mse(output, y, weights):
    """A loss with an extra target tensor: per-sample weights."""
    return (((output - y) ** 2).sum(dim=1) * weights).mean()


def _targets(loss, batch: int, width: int, generator, dtype):
    """What each loss takes beside the output, seeded."""
    normal = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype)  # noqa: E731
    if loss is ppo_loss:
        actions = torch.randint(0, width - 1, (batch,), generator=generator)
        old = torch.log_softmax(normal(batch, width - 1), dim=1).gather(1, actions[:, None])
        return actions, normal(batch), old[:, 0], normal(batch)
    if loss is huber_loss:
        return (2 * normal(batch, width),)
    return normal(batch, width), torch.rand(batch, generator=generator, dtype=dtype)


OPTIMIZERS = {
    "sgd-momentum": lambda groups: torch.optim.SGD(groups, lr=0.05, momentum=0.9),
    "adam": lambda groups: torch.optim.Adam(groups, lr=0.01, weight_decay=0.01),
    "adamw": lambda groups: torch.optim.AdamW(groups, lr=0.01, betas=(0.8, 0.99)),
}
LOSSES = {"ppo": ppo_loss, "huber": huber_loss, "weighted-mse": weighted_mse}


def _groups(parameters):
    """Two param groups, the second at a quarter of the learning rate."""
    parameters = list(parameters)
    return [{"params": parameters[:2]}, {"params": parameters[2:]}]


def _build(make, parameters):
    optimizer = make(_groups(parameters))
    optimizer.param_groups[1]["lr"] *= 0.25
    return optimizer


def _problem(loss, dtype, sizes=(6, 9, 4), batch=7, seed=0):
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = fastbp.nn.MLP(list(sizes), "tanh", dtype=dtype)
    batches = [
        (torch.randn(batch, sizes[0], generator=generator, dtype=dtype),
         _targets(loss, batch, sizes[-1], generator, dtype))
        for _ in range(5)
    ]  # fmt: skip
    return model, batches


def _torch_loop(sequential, loss, make, batches, max_norm):
    optimizer = _build(make, sequential.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    losses = []
    for x, targets in batches:
        optimizer.zero_grad()
        value = loss(sequential(x), *targets)
        value.backward()
        torch.nn.utils.clip_grad_norm_(sequential.parameters(), max_norm)
        optimizer.step()
        scheduler.step()
        losses.append(value.detach())
    return torch.stack(losses)


def _fused_loop(model, loss, make, batches, max_norm, **options):
    optimizer = _build(make, model.parameters())
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    trainer = FusedTrainer(model, loss, optimizer=optimizer, max_grad_norm=max_norm, **options)
    losses = []
    for x, targets in batches:
        losses.append(trainer.step(x, *targets))
        scheduler.step()
    return torch.stack(losses), trainer


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("loss", list(LOSSES))
def test_five_steps_equal_the_torch_loop_in_float64(loss, optimizer, backend):
    """With param groups, a scheduler and clipping (large enough to bind at times)."""
    model, batches = _problem(LOSSES[loss], torch.float64)
    sequential = model.to_torch()
    expected = _torch_loop(sequential, LOSSES[loss], OPTIMIZERS[optimizer], batches, 0.5)
    losses, _ = _fused_loop(
        model, LOSSES[loss], OPTIMIZERS[optimizer], batches, 0.5, backend=backend
    )
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-10)
    for mine, theirs in zip(model.parameters(), sequential.parameters(), strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-10, atol=1e-10)


def test_a_compiled_loss_follows_the_same_trajectory():
    model, batches = _problem(ppo_loss, torch.float64)
    sequential = model.to_torch()
    expected = _torch_loop(sequential, ppo_loss, OPTIMIZERS["adam"], batches, 0.5)
    losses, trainer = _fused_loop(
        model, ppo_loss, OPTIMIZERS["adam"], batches, 0.5, compile_loss=True
    )
    assert trainer._compiled_loss is not None  # steps 2-5 ran the compiled loss
    torch.testing.assert_close(losses, expected, rtol=1e-10, atol=1e-10)
    for mine, theirs in zip(model.parameters(), sequential.parameters(), strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("loss", list(LOSSES))
def test_float32_steps_stay_as_close_to_float64_as_torchs(loss):
    model, batches = _problem(LOSSES[loss], torch.float64)
    exact = model.to_torch()
    _torch_loop(exact, LOSSES[loss], OPTIMIZERS["adam"], batches, 0.5)
    model = model.float()
    batches = [
        (x.float(), [t.float() if t.is_floating_point() else t for t in targets])
        for x, targets in batches
    ]
    torchs = model.to_torch()
    _torch_loop(torchs, LOSSES[loss], OPTIMIZERS["adam"], batches, 0.5)
    _fused_loop(model, LOSSES[loss], OPTIMIZERS["adam"], batches, 0.5)
    triples = zip(model.parameters(), torchs.parameters(), exact.parameters(), strict=True)
    for ours, theirs, truth in triples:
        slack = 8 * torch.finfo(torch.float32).eps * truth.abs().max().item()
        ours, theirs, truth = ours.detach(), theirs.detach(), truth.detach()
        assert_no_less_accurate(loss, ours, theirs, truth, torch.float32, slack)


def test_a_run_moves_between_fused_trainer_and_the_torch_loop():
    """Two fused steps, two torch steps on the same optimizer, a checkpoint loaded into
    a new optimizer and trainer, one more fused step: the torch loop's trajectory."""
    model, batches = _problem(huber_loss, torch.float64)
    sequential = model.to_torch()
    reference = torch.optim.Adam(sequential.parameters(), lr=0.01)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    trainer = FusedTrainer(model, huber_loss, optimizer=optimizer)
    for index, (x, targets) in enumerate(batches):
        reference.zero_grad()
        huber_loss(sequential(x), *targets).backward()
        reference.step()
        if index in (2, 3):  # the torch loop on fastbp's own model
            optimizer.zero_grad()
            huber_loss(model(x), *targets).backward()
            optimizer.step()
        else:
            trainer.step(x, *targets)
        if index == 3:
            resumed = torch.optim.Adam(model.parameters(), lr=0.01)
            resumed.load_state_dict(copy.deepcopy(optimizer.state_dict()))
            trainer = FusedTrainer(model, huber_loss, optimizer=resumed)
    for mine, theirs in zip(model.parameters(), sequential.parameters(), strict=True):
        torch.testing.assert_close(mine.detach(), theirs.detach(), rtol=1e-12, atol=1e-12)


PENALTY = torch.nn.Parameter(torch.ones(()))  # a tensor that requires grad, not the model's


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize(
    "make, error, words",
    [
        (lambda model: lambda out, y: (out - y) ** 2, ValueError, "must return a scalar tensor"),
        (
            lambda model: lambda out, y: (out - y).detach().sum().item(),
            TypeError,
            "must return a scalar tensor, got float",
        ),
        (lambda model: lambda out, y: y.sum(), ValueError, "does not depend on the model's output"),
        (
            lambda model: lambda out, y: out.detach().sum(),
            ValueError,
            "does not depend on the model's output",
        ),
        (
            lambda model: lambda out, y: ((out - y) ** 2).mean() + model[0].weight.square().sum(),
            ValueError,
            "reaches the model's parameter '0.weight'.*weight_decay",
        ),
        (
            lambda model: lambda out, y: ((out - y) ** 2).mean() * PENALTY,
            ValueError,
            r"reaches a tensor that requires grad besides the output \(shape \(\)",
        ),
    ],
    ids=["not-scalar", "not-a-tensor", "not-on-output", "detached", "parameters", "other-leaf"],
)
def test_a_loss_whose_gradient_would_be_dropped_is_refused(make, error, words, backend):
    model, batches = _problem(huber_loss, torch.float32)
    before = [p.detach().clone() for p in model.parameters()]
    trainer = FusedTrainer(model, make(model), optimizer="adam", backend=backend)
    x, (y,) = batches[0]
    with pytest.raises(error, match=words):
        trainer.step(x, y)
    for parameter, value in zip(model.parameters(), before, strict=True):
        assert torch.equal(parameter.detach(), value)


def test_compile_loss_beside_a_loss_name_is_refused():
    model, batches = _problem(huber_loss, torch.float32)
    x, (y,) = batches[0]
    trainer = FusedTrainer(model, "mse", compile_loss=True)
    with pytest.raises(ValueError, match="compile_loss=True compiles a callable loss"):
        trainer.step(x, y)
    with pytest.raises(TypeError, match="compile_loss must be True or False"):
        trainer.compile_loss = "yes"


def test_a_loss_name_takes_one_target():
    model, batches = _problem(weighted_mse, torch.float32)
    x, targets = batches[0]
    with pytest.raises(TypeError, match="one target y for the 'mse' loss, got 2"):
        FusedTrainer(model, "mse").step(x, *targets)


def test_a_reduction_beside_a_callable_loss_is_refused():
    model, batches = _problem(huber_loss, torch.float32)
    x, (y,) = batches[0]
    trainer = FusedTrainer(model, huber_loss, reduction="sum")
    with pytest.raises(ValueError, match="reduction='sum' applies to the loss names"):
        trainer.step(x, y)
