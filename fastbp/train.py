"""``FusedTrainer``: a whole training step without an autograd graph.

``step(x, y)`` runs forward, the loss gradient, backward and the optimizer
update of a ``fastbp.nn.MLP`` with the gradients derived by hand
(``fastbp.kernels.reference`` writes the math out):

- ``backend="numba"`` (CPU tensors): ONE kernel call per step
  (``kernels.cpu.TrainStep``), workspaces reused across steps; plain SGD folds
  the update into the weight-gradient GEMM, so ∂W is never written out.
- ``backend="torch"``: the same hand-derived step in native torch ops, with the
  update done by ``torch.optim`` itself; it runs on any device.
- ``backend="triton"`` (CUDA tensors): Triton's forward and backward kernels
  (one launch each for a narrow network) around the loss gradient in torch
  ops; the update is ``torch.optim``'s.
- ``backend="auto"``: numba for float32/float64 CPU tensors, triton for CUDA
  tensors when Triton is installed, torch otherwise.

The parameters stay the model's own tensors, updated in place, so the model
can be evaluated, saved or handed to ``torch.optim`` at any time; the
optimizer state round-trips through ``state_dict()`` in ``torch.optim``'s format.
"""

from __future__ import annotations

import torch

from . import activations as _activations
from . import functional as F
from . import threads
from .kernels import cpu, reference
from .nn import MLP

# The torch.optim class each optimizer name follows, and its state_dict keys.
TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}
_STATE_KEYS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}


class FusedTrainer:
    """Train a ``fastbp.nn.MLP`` with a loss and an optimizer fused into one step.

    Args:
        model: the ``fastbp.nn.MLP`` whose parameters are updated in place.
        loss: "mse", "cross_entropy" (int64 class labels) or "bce_with_logits".
        reduction: "mean" or "sum", as in ``torch.nn.functional``'s losses.
        optimizer: "sgd" (``torch.optim.SGD``: momentum, weight_decay) or
            "adam" (``torch.optim.Adam``: betas, eps, weight_decay).
        backend: "auto", "numba" (CPU), "triton" (CUDA) or "torch" (any device).

    ``step(x, y)`` returns the 0-dim loss of the forward pass before the update.
    """

    def __init__(
        self,
        model: MLP,
        loss: str = "mse",
        reduction: str = "mean",
        optimizer: str = "sgd",
        lr: float = 0.01,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        *,
        backend: str = "auto",
    ) -> None:
        if not isinstance(model, MLP):
            raise TypeError(f"model must be a fastbp.nn.MLP, got {type(model).__name__}")
        self.model = model
        self.loss = cpu.check_choice("loss", loss, reference.LOSSES)
        self.reduction = cpu.check_choice("reduction", reduction, reference.REDUCTIONS)
        self.optimizer = cpu.check_choice("optimizer", optimizer, reference.OPTIMIZERS)
        self.backend = F.check_backend(backend)
        cpu.check_hyperparameters(lr, momentum, weight_decay, betas, eps)
        extra = {"momentum": momentum} if optimizer == "sgd" else {"betas": betas, "eps": eps}
        self.hyper = {"lr": lr, "weight_decay": weight_decay, **extra}
        self._params = list(model.parameters())
        self._torch_optimizer = TORCH_OPTIMIZERS[optimizer](self._params, **self.hyper)
        self._kernel: cpu.TrainStep | None = None

    # -- the step ----------------------------------------------------------
    def step(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """One training step on the batch ``(x, y)``; returns the loss before the update."""
        layers = self.model.linears
        weights, biases = [layer.weight for layer in layers], [layer.bias for layer in layers]
        x = F.check_tensor("x", x, 2)
        F.check_network(x, weights, biases, self.model.activations)
        self._check_target(x, y, weights[-1].shape[0])
        backend = F.resolve_backend(self.backend, x)
        if backend == "numba":  # cpu.TrainStep checks the class range before any update
            return self._numba_step(x, y, weights, biases)
        if self.loss == "cross_entropy":
            _check_class_range(y, weights[-1].shape[0])
        return self._torch_step(x, y, weights, biases, F.KERNELS.get(backend))

    def _check_target(self, x: torch.Tensor, y, classes: int) -> None:
        """Reject a bad ``y`` before any parameter changes."""
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}; both must be on one")
        batch = x.shape[0]
        if batch == 0:
            raise ValueError("x must hold at least one sample, got a batch of 0")
        if self.loss == "cross_entropy":
            if y.dtype != torch.int64 or y.shape != (batch,):
                raise TypeError(
                    f"y must be int64 class indices of shape ({batch},) for cross_entropy, "
                    f"got {F.describe(y)}"
                )
        elif y.shape != (batch, classes) or y.dtype != x.dtype:
            raise ValueError(
                f"y must have shape ({batch}, {classes}) and dtype {x.dtype} for {self.loss}, "
                f"got {F.describe(y)}"
            )

    def _numba_step(self, x, y, weights, biases) -> torch.Tensor:
        threads.ensure_policy()
        arrays = [w.detach().numpy() for w in weights], [_array(b) for b in biases]
        inputs = x.detach().numpy()
        if self._kernel is None or self._kernel.dtype != inputs.dtype:
            self._kernel = self._build_kernel(*arrays)
        value = self._kernel(inputs, y.detach().numpy(), *arrays)
        return torch.scalar_tensor(value, dtype=x.dtype)

    def _build_kernel(self, weights, biases) -> cpu.TrainStep:
        kernel = cpu.TrainStep(
            weights,
            biases,
            list(self.model.activations),
            loss=self.loss,
            reduction=self.reduction,
            optimizer=self.optimizer,
            lr=self.hyper["lr"],
            momentum=self.hyper.get("momentum", 0.0),
            weight_decay=self.hyper["weight_decay"],
            betas=self.hyper.get("betas", (0.9, 0.999)),
            eps=self.hyper.get("eps", 1e-8),
        )
        self._copy_state_into_kernel(kernel)
        return kernel

    @torch.no_grad()
    def _torch_step(self, x, y, weights, biases, kernels=None) -> torch.Tensor:
        """The step in torch ops, or with ``kernels``' forward and backward (Triton's,
        ``functional.KERNELS``) around the torch loss gradient; torch.optim updates."""
        if self._kernel is not None:  # switching backends: carry the state over
            self._load_torch_state(self._export_state())
            self._kernel = None
        activations = self.model.activations
        if kernels is None:
            outputs = F.torch_forward(x, weights, biases, activations)
        else:
            plan = F.Plan(weights, biases, activations, "triton")
            saved = kernels.forward(plan, x)[1]
            outputs = kernels.outputs(saved)
        value, g = _torch_loss_and_grad(outputs[-1], y, self.loss, self.reduction == "mean")
        if kernels is None:
            grads = _torch_backward(g, x, weights, biases, activations, outputs)
        else:
            _, *grads = kernels.backward(plan, saved, g, False)
        for parameters, gradients in zip((weights, biases), grads, strict=True):
            for parameter, gradient in zip(parameters, gradients, strict=True):
                if parameter is not None:
                    parameter.grad = gradient
        self._torch_optimizer.step()
        for parameter in self._params:
            parameter.grad = None
        return value

    # -- optimizer state, in torch.optim's format --------------------------
    def state_dict(self) -> dict:
        """The optimizer state as ``torch.optim.SGD``/``Adam`` would save it."""
        if self._kernel is None:
            return self._torch_optimizer.state_dict()
        return self._export_state()

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from ``state_dict()`` of this trainer or of the matching ``torch.optim``."""
        self._load_torch_state(state_dict)
        self._kernel = None  # the next numba step builds one from the loaded state

    def _load_torch_state(self, state_dict: dict) -> None:
        self._torch_optimizer.load_state_dict(state_dict)
        group = self._torch_optimizer.param_groups[0]
        self.hyper = {key: group[key] for key in self.hyper}

    def _export_state(self) -> dict:
        """The numba kernel's state, written into the torch optimizer and saved from there."""
        kernel, optimizer = self._kernel, self._torch_optimizer
        for parameter, arrays in zip(self._params, kernel.state(), strict=True):
            if not arrays or kernel.steps == 0:
                continue
            entry = {
                k: torch.from_numpy(a.copy())
                for k, a in zip(_STATE_KEYS[self.optimizer], arrays, strict=True)
            }
            if self.optimizer == "adam":
                entry["step"] = torch.tensor(float(kernel.steps))
            optimizer.state[parameter] = entry
        return optimizer.state_dict()

    def _copy_state_into_kernel(self, kernel: cpu.TrainStep) -> None:
        state = self._torch_optimizer.state
        for parameter, arrays in zip(self._params, kernel.state(), strict=True):
            saved = state.get(parameter, {})
            for key, array in zip(_STATE_KEYS[self.optimizer], arrays, strict=False):
                if key in saved:
                    array[...] = saved[key].numpy()
                    kernel.steps = int(saved.get("step", 1))


def _array(tensor: torch.Tensor | None):
    return None if tensor is None else tensor.detach().numpy()


def _check_class_range(y: torch.Tensor, classes: int) -> None:
    """Class indices in [0, classes), as ``cpu.TrainStep`` checks them (one host sync on CUDA)."""
    outside = (y < 0) | (y >= classes)
    if outside.any():
        raise ValueError(f"y holds class index {y[outside][0].item()}, outside [0, {classes})")


def _torch_backward(g, x, weights, biases, activations, outputs):
    """``([∂L/∂Wₗ], [∂L/∂bₗ or None])`` in torch ops, as ``reference.mlp_backward``."""
    grad_weights, grad_biases = [None] * len(weights), [None] * len(weights)
    for layer in reversed(range(len(weights))):
        delta = _activations.get(activations[layer]).grad(g, outputs[layer])
        grad_weights[layer] = delta.T @ (x if layer == 0 else outputs[layer - 1])
        if biases[layer] is not None:
            grad_biases[layer] = delta.sum(dim=0)
        if layer > 0:
            g = delta @ weights[layer]
    return grad_weights, grad_biases


def _torch_loss_and_grad(output, y, loss: str, mean: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L, ∂L/∂ŷ)`` in torch ops, as ``reference.loss_and_grad`` derives them."""
    if loss == "mse":
        difference = output - y
        value, grad, terms = (difference * difference).sum(), 2 * difference, output.numel()
    elif loss == "cross_entropy":
        log_probabilities = torch.log_softmax(output, dim=1)
        value = -log_probabilities.gather(1, y[:, None]).sum()
        grad = log_probabilities.exp()
        grad[torch.arange(len(y), device=y.device), y] -= 1
        terms = output.shape[0]
    else:
        value = torch.nn.functional.binary_cross_entropy_with_logits(output, y, reduction="sum")
        grad, terms = torch.sigmoid(output) - y, output.numel()
    if mean:
        return value / terms, grad / terms
    return value, grad
