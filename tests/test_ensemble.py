"""``MLPEnsemble``, vmap over stacked parameters and ``FusedTrainer`` on ensembles,
each judged against K separate ``nn.Sequential``'s run one by one."""

import copy

import numpy as np
import pytest
import torch
from torch.func import functional_call, stack_module_state, vmap

from fastbp.functional import ensemble_loss
from fastbp.kernels import cpu
from fastbp.kernels.activation_table import TABLE
from fastbp.nn import MLP, MLPEnsemble
from fastbp.train import TORCH_OPTIMIZERS, FusedTrainer

from .helpers import assert_no_less_accurate

ACTIVATIONS = [activation.name for activation in TABLE]
SIZES = [4, 7, 3]  # widths below the parallel passes' blocks; batch 1 and odd batches
BATCH = 5


def _members(ensemble: MLPEnsemble) -> list[torch.nn.Sequential]:
    return ensemble.to_torch()


def _stacked_grads(members, layer_index: int, kind: str) -> torch.Tensor:
    linears = [[m for m in member if isinstance(m, torch.nn.Linear)] for member in members]
    return torch.stack([getattr(ls[layer_index], kind).grad for ls in linears])


def _one_by_one(members, x):
    return torch.stack([m(x if x.dim() == 2 else x[i]) for i, m in enumerate(members)])


def _inputs(k, shared, dtype=torch.float64, batch=BATCH, seed=1):
    generator = torch.Generator().manual_seed(seed)
    shape = (batch, SIZES[0]) if shared else (k, batch, SIZES[0])
    return torch.randn(*shape, generator=generator, dtype=dtype)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("k", [1, 3, 10])
@pytest.mark.parametrize("shared", [True, False], ids=["broadcast", "per-member"])
@pytest.mark.parametrize("blocks", [None, 3], ids=["chosen", "three-blocks"])
def test_float64_forward_and_gradients_equal_k_sequentials(
    monkeypatch, activation, bias, k, shared, blocks
):
    if blocks is not None:  # the forward runs each member's rows in blocks (2, 2, 1)
        monkeypatch.setattr(cpu.Ensemble, "row_blocks", lambda self, batch: min(blocks, batch))
    torch.manual_seed(0)
    ensemble = MLPEnsemble(k, SIZES, activation, bias=bias, dtype=torch.float64)
    members = _members(ensemble)
    x = _inputs(k, shared).requires_grad_()
    x_ref = x.detach().clone().requires_grad_()
    output, expected = ensemble(x), _one_by_one(members, x_ref)
    g = torch.randn_like(output)
    (output * g).sum().backward()
    (expected * g).sum().backward()
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    for index, layer in enumerate(ensemble.layers):
        expected_weight = _stacked_grads(members, index, "weight")
        torch.testing.assert_close(layer.weight.grad, expected_weight, rtol=0, atol=1e-12)
        if bias:
            expected_bias = _stacked_grads(members, index, "bias")
            torch.testing.assert_close(layer.bias.grad, expected_bias, rtol=0, atol=1e-12)


@pytest.mark.parametrize("activation", ["tanh", "gelu", "relu"])
@pytest.mark.parametrize("batch", [1, 127])
def test_float32_error_within_twice_torchs(activation, batch):
    """float32 against the same ensemble in float64, beside the K nn.Sequential's own
    float32 error (the accuracy tests' criterion)."""
    torch.manual_seed(0)
    exact_model = MLPEnsemble(3, [33, 70, 5], activation, dtype=torch.float64)
    ours_model = copy.deepcopy(exact_model).float()
    torchs = [m.float() for m in _members(exact_model)]
    x = torch.randn(3, batch, 33, dtype=torch.float64)
    exact = exact_model(x).detach()
    ours = ours_model(x.float()).detach()
    assert_no_less_accurate("output", ours, _one_by_one(torchs, x.float()).detach(), exact,
                            torch.float32)  # fmt: skip


def test_each_member_is_drawn_as_k_sequentials_would_be():
    torch.manual_seed(3)
    ensemble = MLPEnsemble(4, [5, 6, 2], "tanh")
    torch.manual_seed(3)
    sequentials = [
        torch.nn.Sequential(torch.nn.Linear(5, 6), torch.nn.Tanh(), torch.nn.Linear(6, 2))
        for _ in range(4)
    ]
    rebuilt = MLPEnsemble.from_torch(sequentials)
    for ours, theirs in zip(ensemble.parameters(), rebuilt.parameters(), strict=True):
        assert torch.equal(ours, theirs)
    assert not torch.equal(ensemble.layers[0].weight[0], ensemble.layers[0].weight[1])


def test_from_torch_and_to_torch_round_trip_exactly():
    torch.manual_seed(0)
    sequentials = [
        torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.LeakyReLU(0.2), torch.nn.Linear(8, 2))
        for _ in range(3)
    ]
    ensemble = MLPEnsemble.from_torch(sequentials)
    assert ensemble.activations == ("leaky_relu(negative_slope=0.2)", "identity")
    for original, back in zip(sequentials, ensemble.to_torch(), strict=True):
        assert repr(original) == repr(back)
        for a, b in zip(original.parameters(), back.parameters(), strict=True):
            assert torch.equal(a, b)


def test_state_dict_keys_say_what_they_hold():
    ensemble = MLPEnsemble(5, [23, 64, 1], bias=[True, False])
    shapes = {key: tuple(value.shape) for key, value in ensemble.state_dict().items()}
    assert shapes == {
        "layers.0.weight": (5, 64, 23),
        "layers.0.bias": (5, 64),
        "layers.1.weight": (5, 1, 64),
    }


def test_bad_input_is_named():
    ensemble = MLPEnsemble(3, SIZES)
    with pytest.raises(ValueError, match=r"x must have shape \(3, batch, in_features\)"):
        ensemble(torch.randn(2, 5, 4))
    with pytest.raises(TypeError, match="weights\\[0\\] has dtype torch.float32 but x has"):
        ensemble(torch.randn(5, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="sequentials\\[1\\] is not the shape"):
        MLPEnsemble.from_torch([MLP([2, 3]).to_torch(), MLP([2, 4]).to_torch()])
    with pytest.raises(ValueError, match="no ensemble kernel"):
        MLPEnsemble(3, SIZES, backend="triton")(torch.randn(5, 4))
    ensemble.layers[0].register_forward_hook(lambda *args: None)
    with pytest.raises(RuntimeError, match="hooks on them would not fire"):
        ensemble(torch.randn(5, 4))


def test_the_torch_backend_is_the_same_ensemble():
    torch.manual_seed(0)
    ensemble = MLPEnsemble(3, SIZES, "silu", dtype=torch.float64)
    x = _inputs(3, shared=False)
    fused = ensemble(x)
    ensemble.backend = "torch"
    torch.testing.assert_close(ensemble(x), fused, rtol=0, atol=1e-12)


class _KernelCalls:
    """Counts the calls of cpu.py's kernels, network and ensemble alike (an ensemble
    kernel's serial and member-parallel variants as one)."""

    NAMES = ("_mlp_forward", "_mlp_backward", "_ensemble_forward", "_ensemble_backward")

    def __init__(self, monkeypatch) -> None:
        self.counts = dict.fromkeys(self.NAMES, 0)
        for name in self.NAMES:
            for variant in (name, f"{name}_parallel"):
                if not hasattr(cpu, variant):
                    continue
                kernel = getattr(cpu, variant)

                def counted(*args, _kernel=kernel, _name=name):
                    self.counts[_name] += 1
                    return _kernel(*args)

                monkeypatch.setattr(cpu, variant, counted)


@pytest.mark.parametrize("shared", [True, False], ids=["broadcast", "per-member"])
def test_vmap_over_stacked_parameters_is_one_kernel_call_per_direction(monkeypatch, shared):
    torch.manual_seed(0)
    models = [MLP(SIZES, "tanh", dtype=torch.float64) for _ in range(6)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    x = _inputs(6, shared).requires_grad_()
    calls = _KernelCalls(monkeypatch)

    def call(p, b, x):
        return functional_call(base, (p, b), (x,))

    output = vmap(call, in_dims=(0, 0, None if shared else 0))(params, buffers, x)
    assert calls.counts == {**dict.fromkeys(calls.NAMES, 0), "_ensemble_forward": 1}
    g = torch.randn_like(output)
    (output * g).sum().backward()
    assert calls.counts["_ensemble_backward"] == 1
    assert calls.counts["_mlp_forward"] == calls.counts["_mlp_backward"] == 0
    members = [m.to_torch() for m in models]
    x_ref = x.detach().clone().requires_grad_()
    expected = _one_by_one(members, x_ref)
    (expected * g).sum().backward()
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-12)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    for key, value in params.items():
        index, kind = key.split(".")
        torch.testing.assert_close(value.grad, _stacked_grads(members, int(index) // 2, kind))


def test_the_counter_sees_member_by_member_calls(monkeypatch):
    """The same count on a batch of networks the ensemble kernels do not take (vmap over
    the Triton backend's spec would; here: vmap within vmap) is one call per member."""
    torch.manual_seed(0)
    models = [MLP(SIZES, dtype=torch.float64) for _ in range(2)]
    calls = _KernelCalls(monkeypatch)
    for model in models:
        model(_inputs(1, True))
    assert calls.counts["_mlp_forward"] == 2


LOSSES = ("mse", "cross_entropy", "bce_with_logits")
OPTIMIZERS = {
    "sgd": {"lr": 0.1, "momentum": 0.9, "weight_decay": 0.01},
    "adam": {"lr": 0.01, "weight_decay": 0.01},
    "adamw": {"lr": 0.01, "weight_decay": 0.1},
}
_TORCH_LOSSES = {
    "mse": torch.nn.functional.mse_loss,
    "cross_entropy": torch.nn.functional.cross_entropy,
    "bce_with_logits": torch.nn.functional.binary_cross_entropy_with_logits,
}


def _targets(loss, k, shared, width=SIZES[-1]):
    generator = torch.Generator().manual_seed(2)
    rows = (BATCH,) if shared else (k, BATCH)
    if loss == "cross_entropy":
        return torch.randint(0, width, rows, generator=generator)
    return torch.rand(*rows, width, generator=generator, dtype=torch.float64)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("shared", [True, False], ids=["broadcast", "per-member"])
@pytest.mark.parametrize("backend", ["numba", "numba-blocks", "torch"])
def test_fused_trainer_steps_equal_k_sequentials_trained_apart(
    monkeypatch, loss, optimizer, reduction, shared, backend
):
    k = 3
    if backend == "numba-blocks":  # each member's rows in two blocks, whatever the threads
        _run_members_in_blocks(monkeypatch, 2)
        backend = "numba"
    torch.manual_seed(0)
    ensemble = MLPEnsemble(k, SIZES, "silu", bias=[True, False], dtype=torch.float64)
    members = _members(ensemble)
    options = OPTIMIZERS[optimizer]
    trainer = FusedTrainer(ensemble, loss, reduction, optimizer, **options, backend=backend)
    optimizers = [TORCH_OPTIMIZERS[optimizer](m.parameters(), **options) for m in members]
    x, y = _inputs(k, shared), _targets(loss, k, shared)
    for _ in range(5):
        value = trainer.step(x, y)
        total = 0.0
        for i, (member, member_optimizer) in enumerate(zip(members, optimizers, strict=True)):
            member_optimizer.zero_grad()
            output = member(x if shared else x[i])
            member_loss = _TORCH_LOSSES[loss](output, y if shared else y[i], reduction=reduction)
            member_loss.backward()
            member_optimizer.step()
            total += member_loss.item()
        assert abs(value.item() - total) <= 1e-12 * max(1.0, abs(total))
    for ours, theirs in zip(ensemble.parameters(), MLPEnsemble.from_torch(members).parameters(),
                            strict=True):  # fmt: skip
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    for state in trainer.optimizer.state.values():  # stacked, as the parameters
        assert all(t.shape[0] == k for key, t in state.items() if key != "step")


def _run_members_in_blocks(monkeypatch, blocks: int) -> None:
    monkeypatch.setattr(cpu.Ensemble, "row_blocks", lambda self, batch: min(blocks, batch))


@pytest.mark.parametrize("blocks", [None, 2], ids=["chosen", "two-blocks"])
def test_a_callable_loss_trains_an_ensemble(monkeypatch, blocks):
    if blocks is not None:
        _run_members_in_blocks(monkeypatch, blocks)
    torch.manual_seed(0)
    ensemble = MLPEnsemble(3, SIZES, "tanh", dtype=torch.float64)
    members = _members(ensemble)

    def huber(output, y):
        return torch.nn.functional.huber_loss(output, y, reduction="sum")

    trainer = FusedTrainer(ensemble, huber, optimizer="adam", lr=0.01)
    optimizers = [torch.optim.Adam(m.parameters(), lr=0.01) for m in members]
    x, y = _inputs(3, False), _targets("mse", 3, False)
    for _ in range(3):
        trainer.step(x, y)
        for i, (member, member_optimizer) in enumerate(zip(members, optimizers, strict=True)):
            member_optimizer.zero_grad()
            huber(member(x[i]), y[i]).backward()
            member_optimizer.step()
    for ours, theirs in zip(ensemble.parameters(), MLPEnsemble.from_torch(members).parameters(),
                            strict=True):  # fmt: skip
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)


def test_ensemble_loss_adds_each_members_own():
    output = torch.randn(3, 4, 2, dtype=torch.float64)
    y = torch.randn(4, 2, dtype=torch.float64)
    expected = sum(torch.nn.functional.mse_loss(o, y) for o in output)
    torch.testing.assert_close(ensemble_loss(output, y), expected, rtol=0, atol=1e-15)


def test_the_trainer_refuses_what_it_would_ignore():
    ensemble = MLPEnsemble(2, SIZES)
    x, y = torch.randn(BATCH, 4), torch.randn(BATCH, 3)
    with pytest.raises(ValueError, match="couple an ensemble's members"):
        FusedTrainer(ensemble, max_grad_norm=1.0).step(x, y)
    with pytest.raises(ValueError, match="an MLPEnsemble has no Triton step"):
        FusedTrainer(ensemble, cuda_graph=True).step(x, y)
    with pytest.raises(ValueError, match=r"y must have shape \(2, 5, 3\) or \(5, 3\)"):
        FusedTrainer(ensemble).step(x, torch.randn(3, BATCH, 3))
    trainer = FusedTrainer(MLPEnsemble(2, [4, 3]), "cross_entropy")
    with pytest.raises(ValueError, match="class index 7, outside"):
        trainer.step(x, torch.tensor([0, 1, 2, 7, 0]))


@pytest.mark.parametrize("shared", [True, False], ids=["broadcast", "per-member"])
@pytest.mark.parametrize("blocks", [1, 2, 3])
def test_members_in_parallel_compute_what_they_compute_one_after_another(shared, blocks):
    """The member-parallel kernels against the serial ones (a threading layer that
    cannot nest runs those), bit for bit: each member's result is its own, and a step
    in blocks of rows sums them in block order. BLAS runs one thread in both (a
    member's GEMMs inside the parallel region do anyway): MKL's own sums may depend on
    its thread count (with AVX2 code they do)."""
    torch.manual_seed(0)
    model = MLPEnsemble(4, [9, 300, 7], "gelu", dtype=torch.float64)
    weights, biases = ([t.detach().numpy() for t in ts] for ts in model.stacked())
    x = np.random.default_rng(0).standard_normal((67, 9) if shared else (4, 67, 9))
    originals, results = [a.copy() for a in (*weights, *biases)], []
    blas_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for in_parallel in (True, False):
            results.append(_both_directions_and_steps(weights, biases, model.activations, x,
                                                      in_parallel, shared, blocks))  # fmt: skip
            for array, original in zip((*weights, *biases), originals, strict=True):
                array[...] = original  # the next variant starts from the same parameters
    finally:
        torch.set_num_threads(blas_threads)
    for index, (a, b) in enumerate(zip(*results, strict=True)):
        assert np.array_equal(a, b), (index, np.abs(a - b).max())


def _both_directions_and_steps(weights, biases, activations, x, in_parallel, shared,
                               blocks) -> list:  # fmt: skip
    """Forward, backward and two Adam steps of a ``cpu.Ensemble``: every array made."""
    ensemble = cpu.Ensemble(weights, biases, activations)
    ensemble.in_parallel = in_parallel
    ensemble.row_blocks = lambda batch: min(blocks, batch)  # forward and backward's too
    outputs = ensemble.forward(x)
    made = [*outputs, *_flat(ensemble.backward(np.ones_like(outputs[1]), x, outputs))]
    step = cpu.EnsembleStep(ensemble, "mse", "mean", "adam", blocks)
    states = [np.zeros(w.size) for w in (weights[0], biases[0], weights[1], biases[1])
              for _ in "mv"]  # fmt: skip
    bound = step.bind(states, [np.zeros(1) for _ in range(4)])
    y = np.zeros((67, 7)) if shared else np.zeros((4, 67, 7))
    hyper = np.tile(cpu.hyperparameters(0.01), (4, 1))
    values = [step(x, y, bound, hyper, np.zeros(4, bool)) for _ in range(2)]
    return [*made, np.array(values), *[w.copy() for w in ensemble.weights], *states]


@pytest.mark.parametrize(
    ("members", "threads", "batch", "expected"),
    [(5, 2, 256, 2), (4, 2, 256, 1), (10, 2, 64, 1), (5, 4, 256, 4), (6, 4, 256, 2),
     (5, 4, 64, 2), (5, 2, 63, 1), (1, 2, 256, 1)],
)  # fmt: skip
def test_members_run_in_blocks_of_rows_only_where_they_do_not_divide_among_the_threads(
    monkeypatch, members, threads, batch, expected
):
    model = MLPEnsemble(members, SIZES)
    ensemble = cpu.Ensemble(*([t.detach().numpy() for t in ts] for ts in model.stacked()),
                            model.activations)  # fmt: skip
    monkeypatch.setattr(cpu.numba, "get_num_threads", lambda: threads)
    expected = expected if ensemble.in_parallel else 1
    assert ensemble.row_blocks(batch) == expected
    assert cpu.EnsembleStep(ensemble, "mse", "mean", "adam").row_blocks(batch) == expected
    assert cpu.EnsembleStep(ensemble, blocks=3).row_blocks(2) == 2  # at most one a row
    ensemble.split_rows = False  # as under fastbp.threads.use_reproducible_blas()
    assert ensemble.row_blocks(batch) == 1
    with pytest.raises(ValueError, match="blocks must be None or an integer >= 1, got 0"):
        cpu.EnsembleStep(ensemble, blocks=0)


def _flat(gradients) -> list:
    grad_x, grad_weights, grad_biases = gradients
    return [grad_x, *grad_weights, *grad_biases]


def test_compile_and_torch_func_run_the_ensemble_in_torch_ops():
    torch.manual_seed(0)
    ensemble = MLPEnsemble(3, SIZES, "gelu", dtype=torch.float64)
    x = _inputs(3, shared=True)
    compiled = torch.compile(ensemble)
    torch.testing.assert_close(compiled(x), ensemble(x), rtol=0, atol=1e-12)
    parameters = dict(ensemble.named_parameters())

    def total(parameters, x):
        return functional_call(ensemble, parameters, (x,)).sum()

    grads = torch.func.grad(total)(parameters, x)
    ensemble(x).sum().backward()
    for name, parameter in parameters.items():
        torch.testing.assert_close(grads[name], parameter.grad, rtol=0, atol=1e-12)


def test_a_global_hook_fires_on_the_ensembles_call():
    ensemble = MLPEnsemble(2, SIZES)
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: seen.append(type(module).__name__)
    )
    try:
        ensemble(torch.randn(BATCH, 4))
    finally:
        handle.remove()
    assert seen == ["MLPEnsemble"]
