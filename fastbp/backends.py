"""The registry of implementations that the tests and the benchmarks iterate over.

Every entry computes the same thing the same way from the outside: the forward
pass of an MLP and, for a given ``grad_output``, the gradients of its input
and parameters. Adding a backend is adding one entry; every accuracy test and
benchmark then covers it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from . import functional as F
from .kernels import reference

Tensors = list[torch.Tensor]
# torch's own loss for each of fastbp's loss names
TORCH_LOSSES = {
    "mse": torch.nn.functional.mse_loss,
    "cross_entropy": torch.nn.functional.cross_entropy,
    "bce_with_logits": torch.nn.functional.binary_cross_entropy_with_logits,
}
# (output, ∂L/∂x, [∂L/∂Wₗ], [∂L/∂bₗ or None])
Gradients = tuple[torch.Tensor, torch.Tensor, Tensors, list[torch.Tensor | None]]
Runner = Callable[
    [torch.Tensor, Tensors, Sequence[torch.Tensor | None], Sequence[str], torch.Tensor], Gradients
]


@dataclass(frozen=True)
class Implementation:
    """One way of computing an MLP's forward pass and gradients.

    ``device``: "any" runs wherever its tensors are; "cuda" needs CUDA tensors
    (or, for Triton, CPU tensors in its interpreter, slow enough that tests
    give it small shapes only).
    """

    name: str
    run: Runner
    description: str
    device: str = "any"


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
            x = F.linear_act(x, weight, bias, activation, backend=backend)
        return x

    return forward


def _whole_network(backend: str) -> Callable[..., torch.Tensor]:
    def forward(x, weights, biases, activations):
        return F.mlp(x, weights, biases, activations, backend=backend)

    return forward


IMPLEMENTATIONS: dict[str, Implementation] = {
    impl.name: impl
    for impl in (
        Implementation(
            "numpy", _numpy_reference, "kernels.reference: the hand derivation in plain numpy"
        ),
        Implementation(
            "torch-eager",
            _with_autograd(_layer_by_layer("torch")),
            "native torch ops under torch autograd (the baseline)",
        ),
        Implementation(
            "fastbp-numba",
            _with_autograd(_whole_network("numba")),
            "fastbp.functional.mlp: the network as one autograd node, numba kernels",
        ),
        Implementation(
            "fastbp-numba-layers",
            _with_autograd(_layer_by_layer("numba")),
            "fastbp.functional.linear_act per layer, numba kernels",
        ),
        Implementation(
            "fastbp-triton",
            _with_autograd(_whole_network("triton")),
            "fastbp.functional.mlp: the network as one autograd node, Triton kernels",
            "cuda",
        ),
    )
}


# ---------------------------------------------------------------------------
# Training steps: the registry the benchmarks time and the tests check
# ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Workload:
    """One training problem: network shape, data, loss and optimizer."""

    name: str
    sizes: tuple[int, ...]
    batch: int
    bias: bool
    loss: str
    lr: float
    momentum: float = 0.0
    reduction: str = "mean"
    devices: tuple[str, ...] = ("cpu", "cuda")  # GPU-sized batches are timed on CUDA only

    def flops(self, training: bool = True) -> int:
        """Multiply-adds ×2 of the step's GEMMs (the first layer's ∂x is skipped)."""
        pairs = list(zip(self.sizes[:-1], self.sizes[1:], strict=True))
        forward = sum(2 * self.batch * i * o for i, o in pairs)
        if not training:
            return forward
        return forward + forward + sum(2 * self.batch * i * o for i, o in pairs[1:])

    def model(self, device: str = "cpu", seed: int = 0) -> torch.nn.Sequential:
        """The initial network, as ``nn.Sequential``; every implementation starts from it."""
        torch.manual_seed(seed)
        layers: list[torch.nn.Module] = []
        for i, o in zip(self.sizes[:-1], self.sizes[1:], strict=True):
            layers += [torch.nn.Linear(i, o, bias=self.bias, device=device), torch.nn.ReLU()]
        return torch.nn.Sequential(*layers[:-1])

    def data(self, device: str = "cpu", seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        x = torch.randn(self.batch, self.sizes[0], generator=generator)
        if self.loss == "cross_entropy":
            y = torch.randint(0, self.sizes[-1], (self.batch,), generator=generator)
        else:
            y = torch.randn(self.batch, self.sizes[-1], generator=generator)
        return x.to(device), y.to(device)

    @property
    def activations(self) -> list[str]:
        """The activation names of ``model()``'s layers."""
        return ["relu"] * (len(self.sizes) - 2) + ["identity"]

    def numpy_parameters(self) -> tuple[list, list]:
        """``model()``'s weights and biases (None without bias) as numpy copies."""
        layers = [m for m in self.model() if isinstance(m, torch.nn.Linear)]
        weights = [layer.weight.detach().numpy().copy() for layer in layers]
        biases = [None if m.bias is None else m.bias.detach().numpy().copy() for m in layers]
        return weights, biases

    def torch_loss(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return TORCH_LOSSES[self.loss](output, y, reduction=self.reduction)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("docs-64x1000x100x10", (1000, 100, 10), 64, False, "mse", 1e-6, 0.0, "sum"),
        *(
            Workload(
                f"mnist-784x256x128x10-b{b}",
                (784, 256, 128, 10),
                b,
                True,
                "cross_entropy",
                0.01,
                0.9,
                devices=("cpu", "cuda") if b <= 1024 else ("cuda",),
            )  # fmt: skip
            for b in (64, 128, 1024, 4096, 65536)
        ),
    )
}


class Step:
    """A ready-to-time training step: ``run()`` does one step, ``parameters()`` reads
    the current weights (W₁, b₁, W₂, … as torch tensors on the CPU). Steps of a
    torch training loop also keep their ``model`` and ``optimizer``."""

    def __init__(
        self,
        run: Callable[[], object],
        parameters: Callable[[], Tensors],
        model=None,
        optimizer=None,
    ) -> None:
        self.run, self.parameters = run, parameters
        self.model, self.optimizer = model, optimizer


def _torch_eager(workload: Workload, device: str, model=None) -> Step:
    model = workload.model(device) if model is None else model
    x, y = workload.data(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=workload.lr, momentum=workload.momentum)

    def run():
        optimizer.zero_grad(set_to_none=True)
        loss = workload.torch_loss(model(x), y)
        loss.backward()
        optimizer.step()
        return loss

    return Step(run, lambda: [p.detach().cpu() for p in model.parameters()], model, optimizer)


def _cuda_graphed(make: Callable[[Workload, str], Step]) -> Callable[[Workload, str], Step]:
    """``make``'s torch-loop step captured once in a CUDA graph, then replayed.

    Warm-up steps on a side stream (as ``torch.cuda.graph`` requires) allocate the
    gradients and optimizer state; the parameters are then put back and the
    momentum zeroed (SGD's first step sets buf = d, as buf = μ·0 + d does), so the
    graphed step starts where every other implementation does.
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
                if state.get("momentum_buffer") is not None:
                    state["momentum_buffer"].zero_()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step.run()
        return Step(graph.replay, step.parameters, step.model, step.optimizer)

    return make_graphed


def _torch_compile(workload: Workload, device: str) -> Step:
    eager = _torch_eager(workload, device)
    return Step(torch.compile(eager.run), eager.parameters)


def _fastbp_autograd(workload: Workload, device: str) -> Step:
    from .nn import MLP

    return _torch_eager(workload, device, MLP.from_torch(workload.model(device)))


def _fastbp_fused(backend: str) -> Callable[[Workload, str], Step]:
    def make(workload: Workload, device: str) -> Step:
        from .nn import MLP
        from .train import FusedTrainer

        model = MLP.from_torch(workload.model(device))
        trainer = FusedTrainer(
            model, workload.loss, workload.reduction, "sgd", workload.lr, workload.momentum,
            backend=backend,
        )  # fmt: skip
        x, y = workload.data(device)
        return Step(
            lambda: trainer.step(x, y), lambda: [p.detach().cpu() for p in model.parameters()]
        )

    return make


def _numpy_manual(workload: Workload, device: str) -> Step:
    weights, biases = workload.numpy_parameters()
    x, y = (t.numpy() for t in workload.data())
    activations = workload.activations
    optimizer = reference.SGD(workload.lr, workload.momentum)

    def run():
        return reference.train_step(
            x, y, weights, biases, activations, workload.loss, workload.reduction, optimizer
        )

    def parameters():  # in nn.Sequential's order: W₁, b₁, W₂, …
        pairs = zip(weights, biases, strict=True)
        return [torch.from_numpy(p) for pair in pairs for p in pair if p is not None]

    return Step(run, parameters)


def _gemm_floor(workload: Workload, device: str) -> Step:
    """The step's GEMMs alone, on preallocated tensors: what no implementation can beat."""
    x, _ = workload.data(device)
    weights = [p.detach() for p in workload.model(device).parameters() if p.dim() == 2]
    outputs = [torch.empty(workload.batch, w.shape[0], device=device) for w in weights]
    grads = [torch.empty_like(w) for w in weights]

    def run():
        source = x
        for weight, output in zip(weights, outputs, strict=True):
            torch.mm(source, weight.T, out=output)
            source = output
        for layer in reversed(range(len(weights))):
            inputs = x if layer == 0 else outputs[layer - 1]
            torch.mm(outputs[layer].T, inputs, out=grads[layer])
            if layer > 0:
                torch.mm(outputs[layer], weights[layer], out=outputs[layer - 1])
        return None

    return Step(run, lambda: [w.cpu() for w in weights])


@dataclass(frozen=True)
class StepImplementation:
    """One way of running a workload's training step on one kind of device."""

    name: str
    make: Callable[[Workload, str], Step]
    device: str
    description: str


STEP_IMPLEMENTATIONS: dict[str, StepImplementation] = {
    impl.name: impl
    for impl in (
        StepImplementation("gemm-floor", _gemm_floor, "cpu", "the step's GEMMs alone (torch.mm)"),
        StepImplementation("torch-eager", _torch_eager, "cpu", "nn.Sequential + loss + optim.SGD"),
        StepImplementation("torch-compile", _torch_compile, "cpu", "torch-eager's step compiled"),
        StepImplementation(
            "torch-manual",
            _fastbp_fused("torch"),
            "cpu",
            "hand-derived step in torch ops + optim.SGD",
        ),  # fmt: skip
        StepImplementation("numpy-manual", _numpy_manual, "cpu", "kernels.reference.train_step"),
        StepImplementation(
            "fastbp-autograd", _fastbp_autograd, "cpu", "fastbp.nn.MLP in torch-eager's loop"
        ),  # fmt: skip
        StepImplementation(
            "fastbp-fused", _fastbp_fused("numba"), "cpu", "FusedTrainer: one numba call per step"
        ),  # fmt: skip
        StepImplementation("gemm-floor-cuda", _gemm_floor, "cuda", "the step's GEMMs alone"),
        StepImplementation("torch-eager-cuda", _torch_eager, "cuda", "torch-eager on CUDA"),
        StepImplementation("torch-compile-cuda", _torch_compile, "cuda", "torch-compile on CUDA"),
        StepImplementation(
            "torch-cudagraph", _cuda_graphed(_torch_eager), "cuda", "torch-eager in a CUDA graph"
        ),  # fmt: skip
        StepImplementation(
            "fastbp-triton",
            _fastbp_autograd,
            "cuda",
            "fastbp.nn.MLP (Triton) in torch-eager's loop",
        ),  # fmt: skip
        StepImplementation(
            "fastbp-triton-cudagraph",
            _cuda_graphed(_fastbp_autograd),
            "cuda",
            "fastbp-triton's step in a CUDA graph",
        ),  # fmt: skip
        StepImplementation(
            "fastbp-fused-cuda",
            _fastbp_fused("auto"),
            "cuda",
            "FusedTrainer on CUDA: Triton forward/backward, torch loss gradient and SGD",
        ),  # fmt: skip
    )
}


def check_step(name: str, workload: Workload, device: str = "cpu", steps: int = 2) -> None:
    """Raise ``AssertionError`` unless ``steps`` steps of implementation ``name`` leave
    the parameters where torch-eager's leave them (float32 tolerance)."""
    if name.startswith("gemm-floor"):
        return  # not a training step: nothing to compare
    expected = STEP_IMPLEMENTATIONS["torch-eager"].make(workload, device)
    step = STEP_IMPLEMENTATIONS[name].make(workload, device)
    for _ in range(steps):
        expected.run()
        step.run()
    for mine, theirs in zip(step.parameters(), expected.parameters(), strict=True):
        torch.testing.assert_close(mine, theirs, rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")


def available_steps(device: str) -> list[str]:
    """The step implementations that run on ``device`` on this machine."""
    if device == "cuda" and not torch.cuda.is_available():
        return []
    return [name for name, impl in STEP_IMPLEMENTATIONS.items() if impl.device == device]


# ---------------------------------------------------------------------------
# Inference: the forward pass alone
# ---------------------------------------------------------------------------
def _inference_torch(workload: Workload, device: str) -> Callable[[], torch.Tensor]:
    model, (x, _) = workload.model(device), workload.data(device)
    return torch.no_grad()(lambda: model(x))


def _inference_fastbp(workload: Workload, device: str) -> Callable[[], torch.Tensor]:
    from .nn import MLP

    model, (x, _) = MLP.from_torch(workload.model(device)), workload.data(device)
    return torch.no_grad()(lambda: model(x))


def _inference_numpy(workload: Workload, device: str) -> Callable[[], torch.Tensor]:
    weights, biases = workload.numpy_parameters()
    x, activations = workload.data()[0].numpy(), workload.activations
    return lambda: torch.from_numpy(reference.mlp_forward(x, weights, biases, activations)[-1])


INFERENCE_IMPLEMENTATIONS: dict[str, Callable[[Workload, str], Callable[[], torch.Tensor]]] = {
    "torch-eager": _inference_torch,
    "numpy-manual": _inference_numpy,
    "fastbp-numba": _inference_fastbp,  # on CUDA tensors: the Triton kernels ("auto")
}
