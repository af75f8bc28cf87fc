"""FusedTrainer's step on the Triton backend (``kernels.gpu_step``): what it launches,
that it never waits on the device, and that it is torch.optim's step.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (see
test_triton.py); counting launches there counts the same launches a GPU gets.
"""

from __future__ import annotations

import pytest
import torch

from fastbp import capture
from fastbp.nn import MLP
from fastbp.train import FusedTrainer

from .helpers import count_launches, needs_cuda
from .test_triton import DEVICES

pytest.importorskip(
    "triton", reason="Triton is not installed (pip install -e '.[test]' on Linux x86-64)"
)


def _batch(sizes, loss, batch, device, dtype=torch.float32, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, sizes[0], generator=generator, dtype=dtype)
    classes = sizes[-1]
    if loss == "cross_entropy":
        y = torch.randint(0, classes, (batch,), generator=generator)
    elif loss == "bce_with_logits":
        y = torch.rand(batch, classes, generator=generator, dtype=dtype)
    else:
        y = torch.randn(batch, classes, generator=generator, dtype=dtype)
    return x.to(device), y.to(device)


# (widths, loss, optimizer, its options, the bound on launches per step)
COUNTED = [
    ([13, 24, 20, 5], "cross_entropy", "sgd", {"momentum": 0.9}, 8),
    ([13, 24, 20, 5], "cross_entropy", "adam", {}, 8),
    ([13, 24, 5], "mse", "sgd", {}, 6),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes,loss,optimizer,options,bound", COUNTED, ids=str)
def test_a_step_launches_few_kernels_and_never_waits(device, sizes, loss, optimizer, options,
                                                     bound):  # fmt: skip
    torch.manual_seed(0)
    trainer = FusedTrainer(
        MLP(sizes).to(device), loss, optimizer=optimizer, lr=0.1, backend="triton", **options
    )
    x, y = _batch(sizes, loss, 9, device)
    for _ in range(2):  # the first steps create the state and send the hyperparameters
        trainer.step(x, y)
    with count_launches() as seen:
        trainer.step(x, y)
    assert seen.syncs == []
    assert seen.torch_ops == []
    assert seen.total <= bound, seen
    assert len(seen.kernels) == 2 * (len(sizes) - 1) + 2, seen.kernels


@pytest.mark.parametrize("device", DEVICES)
def test_the_counter_sees_the_torch_op_step(device):
    """With clipping the step takes torch ops and the host-side class check: the count
    above could fail."""
    sizes = [13, 24, 5]
    trainer = FusedTrainer(
        MLP(sizes).to(device), "cross_entropy", lr=0.1, max_grad_norm=1.0, backend="triton"
    )
    x, y = _batch(sizes, "cross_entropy", 9, device)
    trainer.step(x, y)
    with count_launches() as seen:
        trainer.step(x, y)
    assert seen.syncs and len(seen.torch_ops) > 8, seen


# (widths, batch, biases): batch 1, odd widths, widths below and above the blocks
SHAPES = [
    ([3, 5, 2], 1, True),
    ([33, 17, 40, 3], 19, [True, False, True]),
    ([7, 70, 10], 40, False),
]
OPTIMIZERS = [
    ("sgd", {"momentum": 0.9, "weight_decay": 0.01}),
    ("sgd", {}),
    ("adam", {"weight_decay": 0.01}),
    ("adamw", {"weight_decay": 0.1, "betas": (0.8, 0.95)}),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("sizes,batch,bias", SHAPES, ids=str)
@pytest.mark.parametrize("loss", ["mse", "cross_entropy", "bce_with_logits"])
@pytest.mark.parametrize("optimizer,options", OPTIMIZERS, ids=str)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_the_device_step_is_torch_optims_step(device, sizes, batch, bias, loss, optimizer,
                                              options, reduction):  # fmt: skip
    """In float64, against the same step in torch ops (backend="torch"): losses,
    parameters and the optimizer's state, over steps that change the learning rate.
    (1e-9: the two sum the batch in different orders.)"""
    torch.manual_seed(0)
    models = [MLP(sizes, activation="tanh", bias=bias, dtype=torch.float64).to(device)]
    models.append(MLP.from_torch(models[0].to_torch()))
    trainers = [
        FusedTrainer(model, loss, reduction, optimizer, lr=0.05, backend=backend, **options)
        for model, backend in zip(models, ("triton", "torch"), strict=True)
    ]
    for step in range(4):
        x, y = _batch(sizes, loss, batch, device, torch.float64, seed=step)
        losses = [trainer.step(x, y) for trainer in trainers]
        torch.testing.assert_close(*losses, rtol=1e-9, atol=1e-9)
        for trainer in trainers:  # a hand edit, as a scheduler makes
            trainer.optimizer.param_groups[0]["lr"] *= 0.5
    for ours, theirs in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)
    states = [trainer.optimizer.state_dict()["state"] for trainer in trainers]
    for index, state in states[1].items():
        for key, value in state.items():
            torch.testing.assert_close(states[0][index][key].cpu(), value.cpu(), rtol=1e-9,
                                       atol=1e-9)  # fmt: skip


@pytest.mark.parametrize("device", DEVICES)
def test_param_groups_of_their_own_and_the_torch_loop_after(device):
    """Two groups with their own lr and decay; then torch's Adam takes over the state."""
    torch.manual_seed(0)
    models = [MLP([6, 9, 4], dtype=torch.float64).to(device)]
    models.append(MLP.from_torch(models[0].to_torch()))
    optimizers = [
        torch.optim.Adam(
            [
                {"params": [*m[0].parameters()], "lr": 0.01},
                {"params": [*m[2].parameters()], "lr": 0.03, "weight_decay": 0.1},
            ]
        )
        for m in models
    ]
    trainers = [
        FusedTrainer(m, "mse", optimizer=o, backend=b)
        for m, o, b in zip(models, optimizers, ("triton", "torch"), strict=True)
    ]
    x, y = _batch([6, 9, 4], "mse", 11, device, torch.float64)
    for _ in range(3):
        torch.testing.assert_close(*[t.step(x, y) for t in trainers])
    for model, optimizer in zip(models, optimizers, strict=True):  # the torch loop
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    for ours, theirs in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("device", DEVICES)
def test_a_class_index_out_of_range_raises_at_the_next_step_and_changes_nothing(device):
    sizes = [5, 8, 3]
    torch.manual_seed(0)
    trainer = FusedTrainer(MLP(sizes).to(device), "cross_entropy", "mean", "adam", lr=0.1,
                           backend="triton")  # fmt: skip
    x, y = _batch(sizes, "cross_entropy", 6, device)
    trainer.step(x, y)
    before = [p.detach().clone() for p in trainer.model.parameters()]
    state = {k: v.clone() for k, v in trainer.optimizer.state_dict()["state"][0].items()}
    bad = y.clone()
    bad[4] = 7
    trainer.step(x, bad)  # the device cannot refuse it before the update: it flags it
    with pytest.raises(ValueError, match=r"class index 7, outside \[0, 3\)"):
        for _ in range(100):  # raised once the flag's copy has reached the host (on a
            trainer.step(x, y)  # GPU, steps may run before it has)
    for old, new in zip(before, trainer.model.parameters(), strict=True):
        assert torch.equal(old, new)
    for key, value in trainer.optimizer.state_dict()["state"][0].items():
        assert torch.equal(state[key].cpu(), value.cpu()), key
    trainer.step(x, y)  # the flag is down again: training goes on
    assert not torch.equal(before[0], trainer.model[0].weight)


# ---------------------------------------------------------------------------
# CUDA graphs of the step (fastbp.capture): keys and invalidation without a GPU
# ---------------------------------------------------------------------------
def test_capture_keys_name_what_a_graph_bakes_in():
    x, y = torch.zeros(4, 3), torch.zeros(4, dtype=torch.int64)
    args = ("cross_entropy", "mean", ("relu", "identity"), False)
    base = capture.key(x, y, *args)
    assert capture.key(x.clone(), y.clone(), *args) == base  # the batch's values are copied in
    changed = [
        capture.key(torch.zeros(5, 3), torch.zeros(5, dtype=torch.int64), *args),
        capture.key(x.double(), y, *args),
        capture.key(x, y.float(), *args),
        capture.key(x, y, "mse", *args[1:]),
        capture.key(x, y, args[0], "sum", *args[2:]),
        capture.key(x, y, *args[:2], ("tanh", "identity"), False),
        capture.key(x, y, *args[:3], True),
    ]
    assert all(key != base for key in changed)
    assert len(set(changed)) == len(changed)


class _Recording:
    """Stands in for a CUDA graph on the CPU: replay() runs the captured step again."""

    def __init__(self, step, static):
        self.step, self.static, self.output = step, static, step(*static)

    def replay(self):
        self.output.copy_(self.step(*self.static))


def test_a_key_runs_eagerly_then_is_captured_then_replays(monkeypatch):
    calls = []

    def captured(step, inputs):
        static = tuple(torch.empty_like(t) for t in inputs)
        recording = _Recording(step, static)
        calls.append("capture")
        return capture.Graph(recording, static, recording.output)

    monkeypatch.setattr(capture, "_captured", captured)
    graphs = capture.Graphs(binding=object())
    double = lambda x: 2 * x  # noqa: E731

    outputs = [graphs.run(("a",), double, (torch.full((2,), float(i)),)) for i in range(4)]
    assert [o.tolist() for o in outputs] == [[2 * i] * 2 for i in range(4)]
    assert calls == ["capture"]  # the first step ran eagerly, the second captured
    outputs[2] += 100  # a copy: the graph's own output is not handed out
    assert graphs.run(("a",), double, (torch.ones(2),)).tolist() == [2.0, 2.0]
    assert [graphs.action(key) for key in [("b",), ("b",)]] == [capture.EAGER, capture.CAPTURE]
    for index in range(capture.GRAPHS_KEPT + 1):  # the oldest graph is dropped
        for _ in range(2):
            graphs.run(("k", index), double, (torch.ones(2),))
    assert ("k", 0) not in graphs.graphs and len(graphs.graphs) == capture.GRAPHS_KEPT


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("change", ["load_state_dict", "to", "new memory", "new state"], ids=str)
def test_a_new_binding_drops_the_graphs(device, change):
    """What makes a graph point at stale tensors makes a new binding, and a new
    binding has no graphs."""
    sizes = [5, 8, 3]
    model = MLP(sizes).to(device)
    trainer = FusedTrainer(model, "mse", optimizer="adam", backend="triton")
    x, y = _batch(sizes, "mse", 4, device)
    trainer.step(x, y)
    binding = trainer._binding
    graphs = trainer._graphs_for(binding)
    assert trainer._graphs_for(binding) is graphs
    trainer.step(x, y)
    assert trainer._binding is binding  # nothing changed: the same binding, the same graphs
    if change == "load_state_dict":
        trainer.load_state_dict(trainer.state_dict())
    elif change == "to":
        model.to(torch.float64).to(torch.float32)
    elif change == "new memory":
        model[0].weight.data = model[0].weight.data.clone()
    else:
        trainer.optimizer.state[model[0].weight]["exp_avg"] = torch.zeros_like(model[0].weight)
    trainer.step(x, y)
    assert trainer._binding is not binding
    assert trainer._graphs_for(trainer._binding) is not graphs


@pytest.mark.parametrize("device", DEVICES)
def test_cuda_graph_true_raises_where_the_step_cannot_be_captured(device):
    sizes = [5, 8, 3]
    x, y = _batch(sizes, "mse", 4, device)
    clipped = FusedTrainer(MLP(sizes).to(device), "mse", backend="triton", max_grad_norm=1.0,
                           cuda_graph=True)  # fmt: skip
    with pytest.raises(ValueError, match="cuda_graph=True captures the Triton step"):
        clipped.step(x, y)
    with pytest.raises(TypeError, match="cuda_graph must be None, True or False"):
        clipped.cuda_graph = "yes"


@needs_cuda
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_graphed_step_equals_the_eager_step_bit_for_bit(optimizer):
    """Graphed steps between eager ones and a change of lr: the same bits as eager."""
    sizes = [784, 128, 64, 10]
    torch.manual_seed(0)
    models = [MLP(sizes).cuda()]
    models.append(MLP.from_torch(models[0].to_torch()))
    trainers = [
        FusedTrainer(
            m, "cross_entropy", optimizer=optimizer, lr=0.01, backend="triton", cuda_graph=graphed
        )  # fmt: skip
        for m, graphed in zip(models, (None, False), strict=True)
    ]
    for step in range(8):
        x, y = _batch(sizes, "cross_entropy", 128 if step != 5 else 32, "cuda", seed=step)
        losses = [trainer.step(x, y) for trainer in trainers]
        assert torch.equal(*losses), step
        if step == 3:
            for trainer in trainers:
                trainer.optimizer.param_groups[0]["lr"] = 0.003
    assert len(trainers[0]._graphs.graphs) == 1  # batch 128 captured; 32 came once
    for ours, theirs in zip(models[0].parameters(), models[1].parameters(), strict=True):
        assert torch.equal(ours, theirs)


@needs_cuda
def test_a_graphed_step_waits_on_nothing():
    sizes = [784, 128, 10]
    trainer = FusedTrainer(MLP(sizes).cuda(), "cross_entropy", optimizer="adam", backend="triton")
    x, y = _batch(sizes, "cross_entropy", 128, "cuda")
    for _ in range(3):
        trainer.step(x, y)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            trainer.step(x, y)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@needs_cuda
def test_the_drop_in_under_reduce_overhead_and_make_graphed_callables():
    torch.manual_seed(0)
    model = MLP([33, 64, 10]).cuda()
    reference = model.to_torch()
    x = torch.randn(16, 33, device="cuda", requires_grad=True)
    compiled = torch.compile(model, mode="reduce-overhead")
    for _ in range(3):
        torch.testing.assert_close(compiled(x), reference(x))
    graphed = torch.cuda.make_graphed_callables(model, (x,))
    for _ in range(3):
        out = graphed(x)
        out.sum().backward()
    expected = reference(x)
    torch.testing.assert_close(out, expected)
