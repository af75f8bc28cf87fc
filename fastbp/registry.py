"""The registry of implementations that the tests and the benchmarks iterate over.

One table, ``REGISTRY``, keyed by ``(implementation, device)`` as numbagg keys its
comparisons by (function, library). An ``Entry`` can do up to three things:

- ``gradients(x, weights, biases, activations, grad_output)``: the forward pass of an
  MLP and its gradients (``Gradients``), which the accuracy tests judge;
- ``step(workload, device)``: a ready-to-time training step (``Step``), which the
  benchmarks time after ``check_step`` has compared its updates with torch-eager's;
- ``inference(workload, device)``: the forward pass alone, under ``torch.no_grad``.

Adding a backend is adding entries; every accuracy test and benchmark then covers it.
``WORKLOADS`` holds the training problems the steps run.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.func import functional_call, stack_module_state, vmap

from . import activations as _activations
from . import functional, plans
from .kernels import reference
from .nn import MLP, MLPEnsemble
from .train import FusedTrainer

Tensors = list[torch.Tensor]
# torch's own loss for each of fastbp's loss names
TORCH_LOSSES = {
    "mse": torch.nn.functional.mse_loss,
    "cross_entropy": torch.nn.functional.cross_entropy,
    "bce_with_logits": torch.nn.functional.binary_cross_entropy_with_logits,
}


# ---------------------------------------------------------------------------
# Losses written in torch, as FusedTrainer takes them (loss=<callable>)
# ---------------------------------------------------------------------------
def ppo_loss(output, actions, advantages, old_log_probs, returns, clip=0.2):
    """PPO's clipped surrogate + value + entropy over one policy/value network whose
    last column is the value and the others the action logits (CleanRL's weights)."""
    logits, value = output[:, :-1], output[:, -1]
    log_probs = torch.log_softmax(logits, dim=1)
    ratio = torch.exp(log_probs.gather(1, actions[:, None])[:, 0] - old_log_probs)
    clipped = torch.clamp(ratio, 1 - clip, 1 + clip)
    surrogate = -torch.minimum(ratio * advantages, clipped * advantages).mean()
    value_loss = 0.5 * ((value - returns) ** 2).mean()
    entropy = -(log_probs.exp() * log_probs).sum(dim=1).mean()
    return surrogate + 0.5 * value_loss - 0.01 * entropy


def huber_loss(output, y, delta=1.0):
    """The Huber loss as a user writes it: ½d² within ``delta``, linear beyond."""
    distance = (output - y).abs()
    quadratic = 0.5 * distance * distance
    return torch.where(distance < delta, quadratic, delta * (distance - 0.5 * delta)).mean()


def _ppo_targets(batch: int, actions: int, generator) -> tuple[torch.Tensor, ...]:
    """(actions, advantages, old log-probabilities, returns) of a random rollout."""
    taken = torch.randint(0, actions, (batch,), generator=generator)
    old = torch.log_softmax(torch.randn(batch, actions, generator=generator), dim=1)
    old_log_probs = old.gather(1, taken[:, None])[:, 0]
    advantages = torch.randn(batch, generator=generator)
    return taken, advantages, old_log_probs, torch.randn(batch, generator=generator)


# A loss written in torch, for a workload: the function and how its targets are drawn,
# (batch, output width, generator) -> targets.
@dataclass(frozen=True)
class TorchLoss:
    function: Callable[..., torch.Tensor]
    targets: Callable[..., tuple[torch.Tensor, ...]]


CALLABLE_LOSSES = {
    "ppo": TorchLoss(ppo_loss, lambda batch, width, gen: _ppo_targets(batch, width - 1, gen)),
    "huber": TorchLoss(
        huber_loss, lambda batch, width, gen: (torch.randn(batch, width, generator=gen),)
    ),
}

# (output, ∂L/∂x, [∂L/∂Wₗ], [∂L/∂bₗ or None])
Gradients = tuple[torch.Tensor, torch.Tensor, Tensors, list[torch.Tensor | None]]
Runner = Callable[
    [torch.Tensor, Tensors, Sequence[torch.Tensor | None], Sequence[str], torch.Tensor], Gradients
]


# ---------------------------------------------------------------------------
# Workloads
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One training problem: network shape and activations, data, loss and optimizer."""

    name: str
    sizes: tuple[int, ...]
    batch: int
    bias: bool
    loss: str  # a fastbp loss name, or a key of CALLABLE_LOSSES
    lr: float
    optimizer: str = "sgd"  # "sgd" (with momentum) or "adam", as torch.optim's
    momentum: float = 0.0
    reduction: str = "mean"
    activation: str = "relu"  # after every hidden layer
    output_activation: str = "identity"
    devices: tuple[str, ...] = ("cpu", "cuda")  # GPU-sized batches are timed on CUDA only
    members: int = 1  # an ensemble of this many networks of the shape, trained side by side
    shared_batch: bool = True  # an ensemble's members all see one batch (else each its own)

    def flops(self, training: bool = True) -> int:
        """Multiply-adds ×2 of the step's GEMMs (the first layer's ∂x is skipped)."""
        pairs = list(zip(self.sizes[:-1], self.sizes[1:], strict=True))
        forward = sum(2 * self.batch * i * o for i, o in pairs) * self.members
        if not training:
            return forward
        backward = sum(2 * self.batch * i * o for i, o in pairs[1:]) * self.members
        return forward + forward + backward

    @property
    def ensemble(self) -> bool:
        return self.members > 1

    @property
    def activations(self) -> list[str]:
        """The activation names of ``model()``'s layers."""
        return [self.activation] * (len(self.sizes) - 2) + [self.output_activation]

    def model(self, device: str = "cpu", seed: int = 0) -> torch.nn.Module:
        """The initial network, as ``nn.Sequential`` (an ensemble: ``TorchEnsemble``, the
        members made one after another); every implementation starts from it."""
        torch.manual_seed(seed)
        if self.ensemble:
            return TorchEnsemble(self._network(device) for _ in range(self.members))
        return self._network(device)

    def _network(self, device: str) -> torch.nn.Sequential:
        layers: list[torch.nn.Module] = []
        pairs = zip(self.sizes[:-1], self.sizes[1:], self.activations, strict=True)
        for i, o, name in pairs:
            layers.append(torch.nn.Linear(i, o, bias=self.bias, device=device))
            module = _activations.get(name).module()
            if module is not None:
                layers.append(module)
        return torch.nn.Sequential(*layers)

    @property
    def callable_loss(self) -> TorchLoss | None:
        """The loss written in torch this workload trains with; None for a loss name."""
        return CALLABLE_LOSSES.get(self.loss)

    @property
    def fused_loss(self):
        """What ``FusedTrainer``'s ``loss=`` takes for this workload."""
        custom = self.callable_loss
        return self.loss if custom is None else custom.function

    def data(self, device: str = "cpu", seed: int = 1) -> tuple[torch.Tensor, Tensors]:
        """``(x, targets)``: the batch and what the loss takes beside the output (an
        ensemble's: one for all members, or one per member along a first dimension)."""
        generator = torch.Generator().manual_seed(seed)
        rows = (self.batch,) if self.shared_batch else (self.members, self.batch)
        x = torch.randn(*rows, self.sizes[0], generator=generator)
        width, custom = self.sizes[-1], self.callable_loss
        if custom is not None:
            targets = custom.targets(self.batch, width, generator)
        elif self.loss == "cross_entropy":
            targets = (torch.randint(0, width, rows, generator=generator),)
        else:
            targets = (torch.randn(*rows, width, generator=generator),)
        return x.to(device), [t.to(device) for t in targets]

    def fastbp_model(self, device: str = "cpu") -> torch.nn.Module:
        """``model()`` as fastbp's drop-in: an ``MLP``, or an ``MLPEnsemble``."""
        model = self.model(device)
        return MLPEnsemble.from_torch(list(model)) if self.ensemble else MLP.from_torch(model)

    def numpy_parameters(self) -> tuple[list, list]:
        """``model()``'s weights and biases (None without bias) as numpy copies."""
        layers = [m for m in self.model() if isinstance(m, torch.nn.Linear)]
        weights = [layer.weight.detach().numpy().copy() for layer in layers]
        biases = [None if m.bias is None else m.bias.detach().numpy().copy() for m in layers]
        return weights, biases

    def torch_loss(self, output: torch.Tensor, *targets: torch.Tensor) -> torch.Tensor:
        custom = self.callable_loss
        if custom is not None:
            return custom.function(output, *targets)
        if self.ensemble:
            return functional.ensemble_loss(output, *targets, self.loss, self.reduction)
        return TORCH_LOSSES[self.loss](output, *targets, reduction=self.reduction)

    def torch_optimizer(self, parameters, fused: bool | None = None) -> torch.optim.Optimizer:
        """The workload's torch.optim optimizer; ``fused=True``: torch's fused kernel."""
        if self.optimizer == "adam":
            return torch.optim.Adam(parameters, lr=self.lr, fused=fused)
        return torch.optim.SGD(parameters, lr=self.lr, momentum=self.momentum, fused=fused)

    def numpy_optimizer(self):
        if self.optimizer == "adam":
            return reference.Adam(self.lr)
        return reference.SGD(self.lr, self.momentum)


def _mnist(batch: int, **changes) -> Workload:
    options = dict(
        name=f"mnist-784x256x128x10-b{batch}",
        sizes=(784, 256, 128, 10),
        batch=batch,
        bias=True,
        loss="cross_entropy",
        lr=0.01,
        momentum=0.9,
        devices=("cpu", "cuda") if batch <= 1024 else ("cuda",),
    )
    return Workload(**(options | changes))


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("docs-64x1000x100x10", (1000, 100, 10), 64, False, "mse", 1e-6, reduction="sum"),
        *(_mnist(b) for b in (64, 128, 1024, 4096, 65536)),
        _mnist(128, name="mnist-sigmoid-b128", activation="sigmoid"),
        _mnist(128, name="mnist-gelu-b128", activation="gelu"),
        _mnist(128, name="mnist-adam-b128", optimizer="adam", lr=1e-3, momentum=0.0),
        # a policy/value network of the size RL libraries train on CPU
        Workload(
            "rl-8x64x64x2-tanh-b64",
            (8, 64, 64, 2),
            64,
            True,
            "mse",
            1e-3,
            "adam",
            activation="tanh",
        ),
        # PPO's policy/value network on CartPole: 2 action logits and a value
        Workload(
            "rl-ppo-8x64x64x3-b64",
            (8, 64, 64, 3),
            64,
            True,
            "ppo",
            3e-4,
            "adam",
            activation="tanh",
        ),
        Workload("docs-huber-64x1000x100x10", (1000, 100, 10), 64, False, "huber", 1e-3),
        # ensembles: REDQ-style critics (17 observations + 6 actions in, one Q-value out),
        # every critic on one batch; SAC-size critics; MBPO-style dynamics models
        # (observation + action in, next observation + reward out), each on its own batch
        *(
            Workload(
                f"ensemble-{k}x({'-'.join(map(str, sizes))})-b{batch}",
                sizes,
                batch,
                True,
                "mse",
                3e-4,
                "adam",
                members=k,
                shared_batch=shared,
                activation=act,
            )
            for k, sizes, batch, shared, act in (
                (10, (23, 64, 64, 1), 64, True, "relu"),
                (10, (23, 256, 256, 1), 256, True, "relu"),
                (5, (23, 200, 200, 200, 18), 256, False, "silu"),
            )
        ),  # fmt: skip
        # the seeds' network (E2): 2-2-2 sigmoid, one sample
        Workload(
            "seeds-2x2x2-sigmoid-b1",
            (2, 2, 2),
            1,
            True,
            "mse",
            0.5,
            reduction="sum",
            activation="sigmoid",
            output_activation="sigmoid",
        ),
    )
}


# ---------------------------------------------------------------------------
# Ensembles as torch users write them: the baselines of the ensemble workloads
# ---------------------------------------------------------------------------
class TorchEnsemble(torch.nn.ModuleList):
    """K ``nn.Sequential``'s in a Python loop: each member's output, stacked. Its
    ``stacked_parameters()`` are what the other ensembles hold (W₁ as (K, out, in), …)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x if x.dim() == 2 else x[i]) for i, m in enumerate(self)])

    def stacked_parameters(self) -> Tensors:
        members = [list(member.parameters()) for member in self]
        return [torch.stack(column) for column in zip(*members, strict=True)]


class VmapEnsemble(torch.nn.Module):
    """torch's own way: ``vmap(functional_call)`` over ``stack_module_state``'s stacked
    parameters of the members of a ``TorchEnsemble``."""

    def __init__(self, members: TorchEnsemble, shared_batch: bool) -> None:
        super().__init__()
        stacked, self.buffers_ = stack_module_state(list(members))
        self.names = list(stacked)
        self.stacked = torch.nn.ParameterList(
            torch.nn.Parameter(t.detach()) for t in stacked.values()
        )
        base = copy.deepcopy(members[0]).to("meta")
        call = lambda p, b, x: functional_call(base, (p, b), (x,))  # noqa: E731
        self.call = vmap(call, in_dims=(0, 0, None if shared_batch else 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(dict(zip(self.names, self.stacked, strict=True)), self.buffers_, x)


class BaddbmmEnsemble(torch.nn.Module):
    """The ensemble a user writes by hand: stacked weights and ``torch.baddbmm``
    (``plans.torch_ensemble_forward``, torch ops alone)."""

    def __init__(self, members: TorchEnsemble, activations: Sequence[str]) -> None:
        super().__init__()
        ensemble = MLPEnsemble.from_torch(list(members), backend="torch")
        self.layers, self.activations = ensemble.layers, list(activations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = [layer.weight for layer in self.layers]
        biases = [layer.bias for layer in self.layers]
        return plans.torch_ensemble_forward(x, weights, biases, self.activations)[-1]


# ---------------------------------------------------------------------------
# Gradients: the forward pass and every gradient, judged by the accuracy tests
# ---------------------------------------------------------------------------
def _with_autograd(forward: Callable[..., torch.Tensor]) -> Runner:
    """A runner that calls ``forward`` on fresh leaves and backpropagates ``grad_output``."""

    def run(x, weights, biases, activations, grad_output) -> Gradients:
        leaf = lambda t: None if t is None else t.detach().clone().requires_grad_()  # noqa: E731
        x, weights, biases = leaf(x), [leaf(w) for w in weights], [leaf(b) for b in biases]
        output = forward(x, weights, biases, activations)
        output.backward(grad_output)
        return (
            output.detach(),
            x.grad,
            [w.grad for w in weights],
            [None if b is None else b.grad for b in biases],
        )

    return run


def _numpy_reference(x, weights, biases, activations, grad_output) -> Gradients:
    as_array = lambda t: None if t is None else t.detach().cpu().numpy()  # noqa: E731
    arrays = [as_array(w) for w in weights], [as_array(b) for b in biases]
    outputs = reference.mlp_forward(as_array(x), *arrays, list(activations))
    grad_x, grad_weights, grad_biases = reference.mlp_backward(
        as_array(grad_output), as_array(x), *arrays, list(activations), outputs
    )
    as_tensor = lambda a: None if a is None else torch.from_numpy(a)  # noqa: E731
    return (
        as_tensor(outputs[-1]),
        as_tensor(grad_x),
        [as_tensor(g) for g in grad_weights],
        [as_tensor(g) for g in grad_biases],
    )


def _layer_by_layer(backend: str) -> Callable[..., torch.Tensor]:
    def forward(x, weights, biases, activations):
        for weight, bias, activation in zip(weights, biases, activations, strict=True):
            x = functional.linear_act(x, weight, bias, activation, backend=backend)
        return x

    return forward


def _whole_network(backend: str) -> Callable[..., torch.Tensor]:
    def forward(x, weights, biases, activations):
        return functional.mlp(x, weights, biases, activations, backend=backend)

    return forward


# ---------------------------------------------------------------------------
# Training steps: what the benchmarks time and check_step compares
# ---------------------------------------------------------------------------
@dataclass
class Step:
    """A ready-to-time training step: ``run()`` does one step, ``parameters()`` reads the
    current weights (W₁, b₁, W₂, … as CPU tensors). ``trains`` is False for what only
    stands beside a step (the GEMM floor): it has no update to check."""

    run: Callable[[], object]
    parameters: Callable[[], Tensors]
    model: torch.nn.Module | None = None
    optimizer: torch.optim.Optimizer | None = None
    trains: bool = True
    keeps: object = None  # what must outlive run: a CUDA graph reads its inputs by address


def _parameters_of(model) -> Callable[[], Tensors]:
    """W₁, b₁, W₂, … as CPU copies (an ensemble's stacked, whoever holds them)."""
    parameters = getattr(model, "stacked_parameters", model.parameters)
    return lambda: [p.detach().cpu().clone() for p in parameters()]


def _torch_loop(
    workload: Workload, device: str, model=None, dtype=torch.float32, fused: bool | None = None
) -> Step:
    """``nn.Sequential`` (or ``model``) in the plain loop: torch's loss and optimizer."""
    model = workload.model(device).to(dtype) if model is None else model
    x, targets = workload.data(device)
    x, targets = x.to(dtype), [t.to(dtype) if t.is_floating_point() else t for t in targets]
    optimizer = workload.torch_optimizer(model.parameters(), fused)

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = workload.torch_loss(model(x), *targets)
        loss.backward()
        optimizer.step()
        return loss

    return Step(run, _parameters_of(model), model, optimizer)


def _torch_fused_optim(workload: Workload, device: str) -> Step:
    return _torch_loop(workload, device, fused=True)


def _fastbp_loop(workload: Workload, device: str) -> Step:
    """``fastbp.nn.MLP`` (an ensemble: ``MLPEnsemble``) in the same plain loop: the drop-in."""
    return _torch_loop(workload, device, workload.fastbp_model(device))


def _vmap_loop(workload: Workload, device: str) -> Step:
    return _torch_loop(
        workload, device, VmapEnsemble(workload.model(device), workload.shared_batch)
    )


def _baddbmm_loop(workload: Workload, device: str) -> Step:
    return _torch_loop(
        workload, device, BaddbmmEnsemble(workload.model(device), workload.activations)
    )


def _compiled(make: Callable[[Workload, str], Step]) -> Callable[[Workload, str], Step]:
    """``make``'s loop under ``torch.compile``."""

    def make_compiled(workload: Workload, device: str) -> Step:
        eager = make(workload, device)
        return Step(torch.compile(eager.run), eager.parameters, eager.model, eager.optimizer)

    return make_compiled


def _cuda_graphed(make: Callable[[Workload, str], Step]) -> Callable[[Workload, str], Step]:
    """``make``'s torch-loop step captured once in a CUDA graph, then replayed.

    Warm-up steps on a side stream (as ``torch.cuda.graph`` requires) allocate the
    gradients and optimizer state; the parameters are then put back and the state
    zeroed (SGD's first step sets buf = d, as buf = μ·0 + d does), so the graphed
    step starts where every other implementation does.
    """

    def make_graphed(workload: Workload, device: str) -> Step:
        step = make(workload, device)
        initial = [p.detach().clone() for p in step.model.parameters()]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                step.run()
        torch.cuda.current_stream().wait_stream(side)
        with torch.no_grad():
            for parameter, value in zip(step.model.parameters(), initial, strict=True):
                parameter.copy_(value)
            for state in step.optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor):
                        value.zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step.run()
        # The graph holds no reference to x and y, which only the eager step's closure
        # does: without keeps they were freed, and replays read whatever was there next.
        return Step(graph.replay, step.parameters, step.model, step.optimizer, keeps=step)

    return make_graphed


def _fused(backend: str, cuda_graph: bool | None = None) -> Callable[[Workload, str], Step]:
    def make(workload: Workload, device: str) -> Step:
        model = workload.fastbp_model(device)
        trainer = FusedTrainer(
            model,
            workload.fused_loss,
            workload.reduction,
            workload.torch_optimizer(model.parameters()),
            backend=backend,
            compile_loss=workload.callable_loss is not None,
            cuda_graph=cuda_graph,
        )
        x, targets = workload.data(device)
        return Step(lambda: trainer.step(x, *targets), _parameters_of(model))

    return make


def _numpy_manual(workload: Workload, device: str) -> Step:
    weights, biases = workload.numpy_parameters()
    x, (y,) = workload.data()
    x, y = x.numpy(), y.numpy()
    activations = workload.activations
    optimizer = workload.numpy_optimizer()

    def run():
        return reference.train_step(
            x, y, weights, biases, activations, workload.loss, workload.reduction, optimizer
        )

    def parameters():  # in nn.Sequential's order: W₁, b₁, W₂, …
        pairs = zip(weights, biases, strict=True)
        return [torch.from_numpy(p.copy()) for pair in pairs for p in pair if p is not None]

    return Step(run, parameters)


class _FloorGemms:
    """A step's GEMMs on preallocated tensors, as the GEMM floor times them: ``forward()``
    runs the forward's (a = x Wᵀ, layer by layer), ``backward()`` the backward's (∂W = aᵀ
    a_below and, above the first layer, ∂x = a W). ``weights`` are read where they are:
    a model's own parameters, which its optimizer writes, or copies."""

    def __init__(self, workload: Workload, device: str, weights: Tensors) -> None:
        x, _ = workload.data(device)
        rows = (workload.members,) * workload.ensemble + (workload.batch,)  # stacked: (K, ·, ·)
        self.x = x.expand(*rows, x.shape[-1]).contiguous().to(device)
        self.weights = weights
        self.outputs = [torch.empty(*rows, w.shape[-2], device=device) for w in weights]
        self.grads = [torch.empty_like(w) for w in weights]

    def forward(self) -> None:
        source = self.x
        for weight, output in zip(self.weights, self.outputs, strict=True):
            torch.matmul(source, weight.mT, out=output)
            source = output

    def backward(self) -> None:
        outputs, weights = self.outputs, self.weights
        for layer in reversed(range(len(weights))):
            inputs = self.x if layer == 0 else outputs[layer - 1]
            torch.matmul(outputs[layer].mT, inputs, out=self.grads[layer])
            if layer > 0:
                torch.matmul(outputs[layer], weights[layer], out=outputs[layer - 1])


def _weights(workload: Workload, parameters: Tensors) -> list[torch.Tensor]:
    """The weight matrices among ``parameters`` (an ensemble's stacked ones, (K, out, in))."""
    return [p.detach() for p in parameters if p.dim() == 2 + workload.ensemble]


def _gemm_floor(workload: Workload, device: str) -> Step:
    """The step's GEMMs alone, on preallocated tensors: what no implementation can beat."""
    weights = [w.to(device) for w in _weights(workload, _parameters_of(workload.model(device))())]
    gemms = _FloorGemms(workload, device, weights)

    def run():
        gemms.forward()
        gemms.backward()

    return Step(run, lambda: [w.cpu() for w in weights], trains=False)


def _roofline_floor(workload: Workload, device: str) -> Step:
    """The GEMM floor plus the bytes a step must move beyond its GEMMs, at the copy
    bandwidth of this run: every parameter and its optimizer state (SGD's momentum
    buffer, Adam's two moments), read and written once, as one ``copy_`` of that many
    elements. The activations between layers are left out: a step that blocks the
    batch keeps them in cache, and the GEMM floor's own GEMMs write them anyway."""
    gemms = _gemm_floor(workload, device)
    parameters = sum(p.numel() for p in workload.model(device).parameters())
    states = 2 if workload.optimizer == "adam" else int(workload.momentum != 0)
    source = torch.zeros(parameters * (1 + states), device=device)
    target = torch.empty_like(source)

    def run():
        gemms.run()
        target.copy_(source)

    return Step(run, gemms.parameters, trains=False)


class _Precomputed(torch.autograd.Function):
    """``apply(output, gradients, gemms, *parameters)``: a copy of ``output`` and, in
    backward, copies of ``gradients``, as one autograd node; with ``gemms`` (a
    ``_FloorGemms``), its forward and backward also run the floor's GEMMs."""

    @staticmethod
    def forward(ctx, output, gradients, gemms, *parameters):
        ctx.gradients, ctx.gemms = gradients, gemms
        if gemms is not None:
            gemms.forward()
        return output.clone()

    @staticmethod
    def backward(ctx, grad_output):
        if ctx.gemms is not None:
            ctx.gemms.backward()
        return None, None, None, *[g.clone() for g in ctx.gradients]


class _CostsNothing(torch.nn.Module):
    """A model whose forward and backward cost nothing: ``sequential``'s parameters, and
    its output and gradients at ``x``, ``y`` replayed by ``_Precomputed``. With
    ``floor_gemms``, they cost the GEMM floor's GEMMs on those parameters, and nothing else."""

    def __init__(self, workload: Workload, sequential: torch.nn.Module, x, targets,
                 floor_gemms: bool = False) -> None:  # fmt: skip
        super().__init__()
        self.sequential = sequential
        self.output = sequential(x).detach()
        loss = workload.torch_loss(sequential(x), *targets)
        self.gradients = torch.autograd.grad(loss, list(sequential.parameters()))
        weights = _weights(workload, sequential.parameters())
        self.gemms = _FloorGemms(workload, x.device.type, weights) if floor_gemms else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Precomputed.apply(
            self.output, self.gradients, self.gemms, *self.sequential.parameters()
        )


def _replayed_loop(workload: Workload, device: str, floor_gemms: bool) -> Step:
    """torch-eager's loop around ``_CostsNothing`` (an ensemble's: stacked parameters)."""
    sequential = workload.model(device)
    if workload.ensemble:  # stacked parameters, as the fastest torch ensembles hold them
        sequential = BaddbmmEnsemble(sequential, workload.activations)
    model = _CostsNothing(workload, sequential, *workload.data(device), floor_gemms)
    step = _torch_loop(workload, device, model)
    return Step(step.run, step.parameters, model, step.optimizer, trains=False)


def _drop_in_ceiling(workload: Workload, device: str) -> Step:
    """torch-eager's loop around a model that costs nothing: what the loss, autograd's
    engine, zero_grad and the optimizer cost alone, the time no drop-in model can beat."""
    return _replayed_loop(workload, device, floor_gemms=False)


def _drop_in_floor(workload: Workload, device: str) -> Step:
    """torch-eager's loop around a model that costs exactly the GEMM floor: the ceiling's
    model, running the floor's GEMMs on its own parameters (which the optimizer writes)
    in its forward and backward. Where a drop-in whose kernels were the GEMMs alone would
    stand: the ceiling and the floor measured together, in one loop, rather than added
    (in one loop the optimizer's traffic and the GEMMs' share the caches and the cores)."""
    return _replayed_loop(workload, device, floor_gemms=True)


def check_step(
    name: str, workload: Workload, device: str = "cpu", step: Step | None = None,
    steps: int = 2, done: int = 0,
) -> str:  # fmt: skip
    """Check the next ``steps`` updates of ``step`` (default: a fresh one of entry
    ``name``), which has run ``done`` steps already, and say what was checked.

    The updates themselves, ``p_after − p_before``, are judged against torch-eager's
    in float64 from the same point: the norm of the error at most 1% of the update's,
    plus twice torch-eager's own float32 error. A wrong rule (lr, momentum, decay, a
    missing term) is off by far more; float32 noise is not, even where a step's
    gradient cancels (a random-label batch of 1024 loses 3 digits of its first-layer
    gradient to it, in torch as in numpy). Comparing the parameters instead would pass
    an update off by 15%, since with lr 1e-6 they hardly move.
    """
    step = REGISTRY[name, device].step(workload, device) if step is None else step
    if not step.trains:
        return "not a training step: nothing to compare"
    if name == "torch-eager":
        return "the baseline itself"
    runs = [step, _torch_loop(workload, device), _torch_loop(workload, device, dtype=torch.float64)]
    for run in runs[1:]:
        for _ in range(done):
            run.run()
    starts = [run.parameters() for run in runs]
    for _ in range(steps):
        for run in runs:
            run.run()
    updates = [
        [
            (after.double() - before.double())
            for before, after in zip(start, run.parameters(), strict=True)
        ]
        for start, run in zip(starts, runs, strict=True)
    ]
    for index, (ours, torchs, exact) in enumerate(zip(*updates, strict=True)):
        error, torch_error = (ours - exact).norm().item(), (torchs - exact).norm().item()
        bound = 1e-2 * exact.norm().item() + 2 * torch_error
        assert error <= bound, (
            f"{name} on {workload.name}: parameter {index}'s update is off by {error:.3g}, "
            f"torch-eager's float32 one by {torch_error:.3g} (update's norm {exact.norm():.3g})"
        )
    return f"{steps} updates within 1% of torch-eager's float64 ones"


# ---------------------------------------------------------------------------
# Inference: the forward pass alone
# ---------------------------------------------------------------------------
def check_inference(name: str, workload: Workload, device: str, output: torch.Tensor) -> str:
    """Check ``output``, entry ``name``'s forward on ``workload``'s data, against
    torch-eager's, and say what was checked."""
    if name == "torch-eager":
        return "the baseline itself"
    expected = REGISTRY["torch-eager", device].inference(workload, device)()
    torch.testing.assert_close(output.float(), expected.float(), rtol=1e-4, atol=1e-5)
    return "output equals torch-eager's (rtol 1e-4)"


def _inference_of(model_of: Callable[[torch.nn.Sequential], torch.nn.Module]):
    def make(workload: Workload, device: str) -> Callable[[], torch.Tensor]:
        model, (x, _) = model_of(workload.model(device)), workload.data(device)
        return torch.no_grad()(lambda: model(x))

    return make


def _inference_fastbp(workload: Workload, device: str) -> Callable[[], torch.Tensor]:
    model, (x, _) = workload.fastbp_model(device), workload.data(device)
    return torch.no_grad()(lambda: model(x))


def _compiled_fastbp(sequential: torch.nn.Sequential) -> torch.nn.Module:
    return torch.compile(MLP.from_torch(sequential))


def _inference_numpy(workload: Workload, device: str) -> Callable[[], torch.Tensor]:
    weights, biases = workload.numpy_parameters()
    x, activations = workload.data()[0].numpy(), workload.activations
    return lambda: torch.from_numpy(reference.mlp_forward(x, weights, biases, activations)[-1])


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Entry:
    """One implementation on one device, and what it can do (see the module docstring)."""

    name: str
    device: str  # "cpu" or "cuda" (Triton's entries also run on CPU tensors in its interpreter)
    description: str
    gradients: Runner | None = None
    step: Callable[[Workload, str], Step] | None = None
    inference: Callable[[Workload, str], Callable[[], torch.Tensor]] | None = None
    callable_losses: bool = True  # its step trains a workload whose loss is written in torch
    ensembles: bool = False  # it runs the ensemble workloads; None: those alone

    def runs(self, workload: Workload, task: str = "train") -> bool:
        """Whether this entry times ``task`` ("train" or "inference") on ``workload``."""
        if workload.ensemble and self.ensembles is False:
            return False
        if not workload.ensemble and self.ensembles is None:
            return False
        if task == "inference":
            return self.inference is not None
        return self.step is not None and (self.callable_losses or not workload.callable_loss)


def _entries() -> list[Entry]:
    torch_eager = _with_autograd(_layer_by_layer("torch"))
    return [
        Entry("gemm-floor", "cpu", "the step's GEMMs alone (torch.mm into preallocated tensors; "
              "an ensemble's: torch.bmm)", step=_gemm_floor, ensembles=True),
        Entry("roofline-floor", "cpu", "the GEMM floor + parameters and optimizer state read "
              "and written once, at this run's copy bandwidth", step=_roofline_floor,
              ensembles=True),
        Entry("torch-eager", "cpu", "nn.Sequential, torch's loss and torch.optim in a plain loop "
              "(an ensemble: a Python loop over K of them)", torch_eager, _torch_loop,
              _inference_of(lambda m: m), ensembles=True),
        Entry("torch-vmap", "cpu", "an ensemble as torch.func runs it: vmap(functional_call) over "
              "stack_module_state's parameters", step=_vmap_loop, ensembles=None),
        Entry("torch-baddbmm", "cpu", "an ensemble written by hand: stacked weights, torch.baddbmm",
              step=_baddbmm_loop, ensembles=None),
        Entry("torch-fused-optim", "cpu", "torch-eager with torch.optim's fused=True kernel",
              step=_torch_fused_optim),
        Entry("torch-compile", "cpu", "torch-eager's step under torch.compile",
              step=_compiled(_torch_loop), inference=_inference_of(torch.compile)),
        Entry("torch-manual", "cpu", "the hand-derived step in torch ops + torch.optim",
              step=_fused("torch")),
        Entry("drop-in-ceiling", "cpu", "torch-eager's loop around a model that costs nothing "
              "(an ensemble's: stacked parameters)", step=_drop_in_ceiling, ensembles=True),
        Entry("drop-in-floor", "cpu", "torch-eager's loop around a model that costs only the "
              "GEMM floor's GEMMs", step=_drop_in_floor, ensembles=True),
        Entry("numpy", "cpu", "kernels.reference: the hand derivation in plain numpy",
              _numpy_reference, _numpy_manual, _inference_numpy, callable_losses=False),
        Entry("fastbp", "cpu", "fastbp.nn.MLP (numba) in torch-eager's loop: the drop-in "
              "(an ensemble: MLPEnsemble)", _with_autograd(_whole_network("numba")), _fastbp_loop,
              _inference_fastbp, ensembles=True),
        Entry("fastbp-layers", "cpu", "fastbp.functional.linear_act per layer (numba)",
              _with_autograd(_layer_by_layer("numba"))),
        Entry("fastbp-compile", "cpu", "fastbp's loop under torch.compile (custom ops)",
              step=_compiled(_fastbp_loop), inference=_inference_of(_compiled_fastbp)),
        Entry("fastbp-fused", "cpu", "FusedTrainer: forward, loss, backward, update in one call "
              "(a loss written in torch: compiled, compile_loss=True)", step=_fused("numba"),
              ensembles=True),
        Entry("gemm-floor", "cuda", "the step's GEMMs alone", step=_gemm_floor, ensembles=True),
        Entry("roofline-floor", "cuda", "the GEMM floor + parameters and optimizer state "
              "read and written once", step=_roofline_floor, ensembles=True),
        Entry("torch-eager", "cuda", "torch-eager on CUDA", torch_eager, _torch_loop,
              _inference_of(lambda m: m), ensembles=True),
        Entry("torch-vmap", "cuda", "torch.func's vmap ensemble on CUDA", step=_vmap_loop,
              ensembles=None),
        Entry("torch-baddbmm", "cuda", "the hand-written baddbmm ensemble on CUDA",
              step=_baddbmm_loop, ensembles=None),
        Entry("torch-fused-optim", "cuda", "torch-eager with torch.optim's fused=True kernel",
              step=_torch_fused_optim),
        Entry("torch-compile", "cuda", "torch-compile on CUDA", step=_compiled(_torch_loop),
              inference=_inference_of(torch.compile)),
        Entry("torch-cudagraph", "cuda", "torch-eager's step captured in a CUDA graph",
              step=_cuda_graphed(_torch_loop)),
        Entry("drop-in-ceiling", "cuda", "torch-eager's loop around a model that costs nothing",
              step=_drop_in_ceiling, ensembles=True),
        Entry("drop-in-floor", "cuda", "torch-eager's loop around a model that costs only the "
              "GEMM floor's GEMMs", step=_drop_in_floor, ensembles=True),
        Entry("fastbp", "cuda", "fastbp.nn.MLP (Triton) in torch-eager's loop",
              _with_autograd(_whole_network("triton")), _fastbp_loop, _inference_fastbp,
              ensembles=True),
        Entry("fastbp-cudagraph", "cuda", "fastbp's step captured in a CUDA graph",
              step=_cuda_graphed(_fastbp_loop)),
        Entry("fastbp-fused", "cuda", "FusedTrainer on CUDA: the whole step on the device "
              "(Triton), replayed from a CUDA graph; an ensemble: torch's ops",
              step=_fused("auto"), ensembles=True),
        Entry("fastbp-fused-eager", "cuda", "FusedTrainer on CUDA, every step launched "
              "eagerly (cuda_graph=False)", step=_fused("auto", cuda_graph=False)),
    ]  # fmt: skip


REGISTRY: dict[tuple[str, str], Entry] = {(e.name, e.device): e for e in _entries()}


def entries(device: str | None = None, does: str | None = None) -> list[Entry]:
    """The entries for ``device`` (default: every device) that have ``does``
    ("gradients", "step" or "inference"; default: anything)."""
    return [
        entry
        for (_, on), entry in REGISTRY.items()
        if (device is None or on == device) and (does is None or getattr(entry, does) is not None)
    ]


def available(device: str) -> bool:
    """Whether this machine runs ``device``'s entries."""
    return device == "cpu" or (device == "cuda" and torch.cuda.is_available())
