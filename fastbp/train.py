"""``FusedTrainer``: a whole training step without an autograd graph.

``step(x, y)`` runs forward, the loss gradient, backward and the optimizer
update of a ``fastbp.nn.MLP`` with the gradients derived by hand
(``fastbp.kernels.reference`` writes the math out):

- ``backend="numba"`` (CPU tensors): ONE kernel call per step
  (``kernels.cpu.TrainStep``); plain SGD folds the update into the
  weight-gradient GEMM, so ∂W is never written out;
- ``backend="torch"``: the same hand-derived step in torch ops, with the update
  done by the optimizer itself; it runs on any device;
- ``backend="triton"`` (CUDA tensors): Triton's forward and backward kernels
  around the loss gradient in torch ops; the update is the optimizer's;
- ``backend="auto"``: numba for float32/float64 CPU tensors, triton for CUDA
  tensors when Triton is installed, torch otherwise.

The optimizer is a ``torch.optim.SGD``, ``Adam`` or ``AdamW`` over exactly the
model's parameters, given or built from its name. Its ``param_groups`` hold the
hyperparameters, read at every step (so ``torch.optim.lr_scheduler`` schedulers
and hand edits take effect), and its ``state`` holds the momentum buffers and
moments, which the kernel updates in place: ``optimizer.state_dict()`` is a
checkpoint, and a run may move between ``FusedTrainer`` and the plain torch loop
at any step.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.optim import optimizer as _optim

from . import activations as _activations
from . import capture, plans, threads
from .functional import ensemble_loss
from .kernels import cpu, reference
from .kernels.utils import check_choice
from .nn import MLP, BoundModel, MLPEnsemble

# The torch.optim classes FusedTrainer runs, by the name of their rule.
TORCH_OPTIMIZERS = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
# Group options the kernels do not implement, and the value each must keep.
_UNSUPPORTED = {
    "sgd": {"dampening": 0, "nesterov": False, "maximize": False, "differentiable": False},
    "adam": {"amsgrad": False, "maximize": False, "differentiable": False},
}
_UNSUPPORTED["adamw"] = _UNSUPPORTED["adam"]
# What each name's state holds, in the order the kernel takes it.
_STATE_KEYS = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq")}
_STATE_KEYS["adamw"] = _STATE_KEYS["adam"]
_UNSET = object()
_SETTINGS = ("loss", "reduction", "backend", "max_grad_norm", "compile_loss", "cuda_graph")


def _rule(optimizer: torch.optim.Optimizer) -> str:
    """ "sgd", "adam" or "adamw": the update ``optimizer`` computes."""
    if type(optimizer) is torch.optim.SGD:
        return "sgd"
    if type(optimizer) in (torch.optim.Adam, torch.optim.AdamW):
        default = type(optimizer) is torch.optim.AdamW
        flags = {g.get("decoupled_weight_decay", default) for g in optimizer.param_groups}
        if len(flags) > 1:
            raise ValueError(
                "optimizer's param_groups mix Adam's and AdamW's weight decay "
                "(decoupled_weight_decay); FusedTrainer runs one rule for all parameters"
            )
        return "adamw" if flags.pop() else "adam"
    raise TypeError(
        "optimizer must be a torch.optim.SGD, Adam or AdamW (or one of the names "
        f"{tuple(TORCH_OPTIMIZERS)}), got {type(optimizer).__name__}"
    )


def _number(value) -> float:
    """A hyperparameter as a Python float (torch.optim also takes 0-dim tensors)."""
    return float(value.item() if isinstance(value, torch.Tensor) else value)


class FusedTrainer:
    """Train a ``fastbp.nn.MLP`` with a loss and an optimizer fused into one step.

    Args:
        model: the ``fastbp.nn.MLP`` whose parameters are updated in place; or an
            ``MLPEnsemble``, whose members' losses add (``functional.ensemble_loss``):
            x is ``(k, batch, in)`` or ``(batch, in)`` shared, y ``(k, batch, out)`` or
            ``(batch, out)`` (labels ``(k, batch)`` or ``(batch,)``), a callable loss
            takes the ``(k, batch, out)`` output; every member steps in one numba call
            on CPU (torch's ops elsewhere), and max_grad_norm is refused.
        loss: "mse", "cross_entropy" (int64 class labels) or "bce_with_logits", computed
            inside the step's kernel; or a callable ``loss(output, *targets)`` returning
            a scalar tensor, written in torch ops: the step then runs fastbp's forward,
            takes ∂L/∂output by autograd over the loss alone, and runs the fused backward
            and update. A callable whose graph reaches the model's parameters (or any
            other tensor that requires grad) is refused, since that gradient would be
            dropped: a weight penalty belongs in ``weight_decay``.
        reduction: "mean" or "sum", as in ``torch.nn.functional``'s losses; for the loss
            names only (a callable reduces its own terms, and "sum" beside one raises).
        optimizer: a ``torch.optim.SGD`` (momentum, weight_decay), ``Adam`` or
            ``AdamW`` (betas, eps, weight_decay) over exactly the model's parameters,
            in any number of param groups; or "sgd", "adam" or "adamw", built with
            ``lr`` (default 0.01), ``momentum``, ``weight_decay``, ``betas`` and ``eps``
            (default: torch's), which are refused beside an optimizer object.
        max_grad_norm: clip the gradients' global 2-norm to this before each update,
            as ``torch.nn.utils.clip_grad_norm_``; None (the default) does not clip.
        backend: "auto", "numba" (CPU), "triton" (CUDA) or "torch" (any device).
        compile_loss: for a callable loss, run its value and gradient under
            ``torch.compile`` (``torch.func.grad_and_value``) from the second step on,
            after the first step has checked its graph eagerly. torch's autograd engine
            costs more than a small network's whole fused step on a CPU; compiled, the
            loss costs about what its forward does. The first compile takes seconds.
        cuda_graph: capture the Triton step in a CUDA graph and replay it
            (``fastbp.capture``): None (the default) does so on CUDA wherever the step
            runs whole on the device (a loss name, no ``max_grad_norm``); True requires
            it, and raises where it cannot; False runs every step eagerly.

    The hyperparameters live in ``trainer.optimizer.param_groups``, read at every step;
    the state in ``trainer.optimizer.state``. Options the kernels do not implement
    (nesterov, dampening, amsgrad, maximize, differentiable) raise, at construction
    and at any step where a group has them. ``step(x, y)`` (``step(x, *targets)`` for
    a callable loss) returns the 0-dim loss of the forward pass before the update;
    ``x`` is ``(batch, in_features)``.
    """

    def __init__(
        self,
        model: MLP,
        loss: str = "mse",
        reduction: str = "mean",
        optimizer: torch.optim.Optimizer | str = "sgd",
        lr=_UNSET,
        momentum=_UNSET,
        weight_decay=_UNSET,
        betas=_UNSET,
        eps=_UNSET,
        *,
        max_grad_norm: float | None = None,
        backend: str = "auto",
        compile_loss: bool = False,
        cuda_graph: bool | None = None,
    ) -> None:
        if not isinstance(model, (MLP, MLPEnsemble)):
            raise TypeError(
                f"model must be a fastbp.nn.MLP or MLPEnsemble, got {type(model).__name__}"
            )
        object.__setattr__(self, "model", model)
        self.loss, self.reduction, self.backend = loss, reduction, backend
        self.max_grad_norm = max_grad_norm
        self.compile_loss = compile_loss
        self.cuda_graph = cuda_graph
        options = {
            name: value
            for name, value in zip(
                ("lr", "momentum", "weight_decay", "betas", "eps"),
                (lr, momentum, weight_decay, betas, eps),
                strict=True,
            )
            if value is not _UNSET
        }
        object.__setattr__(self, "optimizer", self._optimizer(optimizer, options))
        self._rule = _rule(self.optimizer)
        self._check_groups()
        self._kernel = None  # (plan, cpu.TrainStep) of the numba path
        self._binding = None
        self._device_plan = None  # the network as the Triton step last checked it
        self._flag = None  # the Triton step's class-range flag
        self._graphs = None  # capture.Graphs of the Triton step's binding
        self._ready = None  # _Ready: what the last numba step checked, for the next

    # -- settings: each takes effect at the next step, or raises ----------------
    def __setattr__(self, name: str, value) -> None:
        if name == "loss":
            if not callable(value):
                value = check_choice("loss", value, reference.LOSSES)
        elif name == "reduction":
            value = check_choice("reduction", value, reference.REDUCTIONS)
        elif name == "backend":
            value = plans.check_backend(value)
        elif name == "max_grad_norm":
            if value is not None and not (
                isinstance(value, (int, float)) and math.isfinite(value) and value > 0
            ):
                raise ValueError(
                    f"max_grad_norm must be a finite number > 0 or None, got {value!r}"
                )
        elif name == "compile_loss":
            if not isinstance(value, bool):
                raise TypeError(f"compile_loss must be True or False, got {value!r}")
        elif name == "cuda_graph":
            if value not in (None, True, False):
                raise TypeError(f"cuda_graph must be None, True or False, got {value!r}")
        elif name in ("model", "optimizer"):
            raise AttributeError(f"{name} is fixed at construction: make a new FusedTrainer")
        elif not name.startswith("_"):
            raise AttributeError(
                f"FusedTrainer has no setting {name!r}: its settings are {_SETTINGS}; "
                "hyperparameters live in trainer.optimizer.param_groups"
            )
        if not name.startswith("_"):  # the next step checks everything anew
            object.__setattr__(self, "_ready", None)
        if name in ("loss", "reduction"):
            object.__setattr__(self, "_kernel", None)  # the next step builds one anew
        if name in ("loss", "compile_loss"):
            object.__setattr__(self, "_compiled_loss", None)
        object.__setattr__(self, name, value)

    def _optimizer(self, optimizer, options: dict) -> torch.optim.Optimizer:
        if isinstance(optimizer, str):
            rule = check_choice("optimizer", optimizer, tuple(TORCH_OPTIMIZERS))
            options.setdefault("lr", 0.01)
            if "momentum" in options and rule != "sgd":
                raise ValueError(f"momentum is SGD's, not {rule}'s (use betas)")
            if {"betas", "eps"} & set(options) and rule == "sgd":
                raise ValueError("betas and eps are Adam's and AdamW's, not SGD's")
            cpu.hyperparameters(**options)  # the kernels' checks, with their defaults
            return TORCH_OPTIMIZERS[rule](self.model.parameters(), **options)
        if options:
            raise ValueError(
                f"{', '.join(options)} given beside an optimizer object, whose param_groups "
                "hold the hyperparameters: set them there"
            )
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"optimizer must be a torch.optim.SGD, Adam or AdamW or one of "
                f"{tuple(TORCH_OPTIMIZERS)}, got {type(optimizer).__name__}"
            )
        _rule(optimizer)
        _check_holds(optimizer, list(self.model.parameters()))
        return optimizer

    def _check_step_hooks(self) -> None:
        """Refuse optimizer step hooks, which the numba path's update would skip."""
        optimizer = self.optimizer
        if (
            getattr(optimizer, "_optimizer_step_pre_hooks", None)
            or getattr(optimizer, "_optimizer_step_post_hooks", None)
            or _optim._global_optimizer_pre_hooks
            or _optim._global_optimizer_post_hooks
        ):
            raise ValueError(
                "the optimizer has step hooks, which FusedTrainer's numba step would not run "
                "(it updates the parameters itself): use backend='torch', or the torch loop"
            )

    def _check_groups(self) -> None:
        """Refuse group options the kernels do not implement (checked at every step)."""
        for index in range(len(self.optimizer.param_groups)):
            _check_group(self.optimizer, index, self._rule)

    # -- the step ---------------------------------------------------------------
    def step(self, x: torch.Tensor, *targets) -> torch.Tensor:
        """One training step on the batch ``x`` and its targets; returns the loss before
        the update. A loss name takes one target ``y``; a callable loss is called as
        ``loss(output, *targets)``."""
        ready = self._ready
        if ready is not None:  # the common call: what the last step checked still holds
            value = ready(self, x, targets)
            if value is not None:
                return value
        custom = callable(self.loss)
        if self.compile_loss and not custom:
            raise ValueError(
                f"compile_loss=True compiles a callable loss; the {self.loss!r} loss runs "
                "inside fastbp's kernel already: set compile_loss=False"
            )
        if custom and self.reduction != "mean":
            raise ValueError(
                f"reduction={self.reduction!r} applies to the loss names; a callable loss "
                "reduces its own terms: leave reduction at 'mean' and sum inside the loss"
            )
        if not custom and len(targets) != 1:
            raise TypeError(
                f"step takes x and one target y for the {self.loss!r} loss, "
                f"got {len(targets)} targets"
            )
        if isinstance(self.model, MLPEnsemble):
            return self._ensemble_step(x, targets, custom)
        fused = self.model.fused()
        if fused is None:
            raise ValueError(
                "FusedTrainer runs the network without calling its modules, so their "
                "hooks would not fire and children fastbp does not fuse would be skipped; "
                "this model has one or the other: train it with the torch loop"
            )
        weights, biases, activations = fused
        kernel_plan = self._kernel[0] if self._kernel else None  # the numba step's
        plan = kernel_plan or self._device_plan
        unchanged = plan and plan.activations == activations and plan.current(weights, biases)
        if not (unchanged and x.__class__ is torch.Tensor and x.dim() == 2 and plan.fits(x)):
            x = _check_input(x, weights[0].shape[1])  # the layout or x changed: every check
            plans.check_network(x, weights, biases, activations)
        if custom:
            if x.shape[0] == 0:
                raise ValueError("x must hold at least one sample, got a batch of 0")
        else:
            _check_target(self.loss, x, targets[0], weights[-1].shape[0])
        backend = plans.resolve_backend(self.backend, x)
        if backend == "numba":
            self._check_step_hooks()
            built = unchanged and plan is kernel_plan  # else the kernel is built anew
            return self._numba_step(x, targets, weights, biases, activations, built)
        self._check_groups()
        on_device = backend == "triton" and self._on_device_step(weights, biases)
        if self.cuda_graph and not (on_device and x.is_cuda):
            raise ValueError(
                "cuda_graph=True captures the Triton step on CUDA tensors, whole on the device "
                f"(a loss name, max_grad_norm=None); this step has x on {x.device}, backend "
                f"{backend!r}, loss {self.loss!r} and max_grad_norm={self.max_grad_norm}: "
                "set cuda_graph=None or False"
            )
        if on_device:
            if not unchanged:  # checked above: the next steps check x alone
                plan = plans.Plan(list(weights), list(biases), activations, "triton")
                object.__setattr__(self, "_device_plan", plan)
            return self._triton_step(x, targets[0], weights, biases, activations)
        if self.loss == "cross_entropy":
            _check_class_range(targets[0], weights[-1].shape[0])
        kernels = plans.KERNELS.get(backend)
        return self._torch_step(x, targets, weights, biases, activations, kernels)

    def _bound(self, weights, biases) -> tuple[_Binding, np.ndarray]:
        """The binding of the optimizer's state to these parameters (made anew where the
        optimizer's state or the parameters changed), and the hyperparameters as now."""
        binding = self._binding
        if binding is None or not binding.current(_sequential_order(weights, biases)):
            binding = self._new_binding(weights, biases)
        hyper = binding.hyper()  # also refuses options the kernels do not implement
        if binding.container is None:  # SGD's momentum turned on where no buffer exists
            binding = self._new_binding(weights, biases)
            hyper = binding.hyper()
        return binding, hyper

    def _new_binding(self, weights, biases) -> _Binding:
        ordered = _sequential_order(weights, biases)
        _check_holds(self.optimizer, ordered, " (a parameter of the model was replaced since?)")
        binding = _Binding(self.optimizer, ordered, self._rule, on_device=ordered[0].is_cuda)
        object.__setattr__(self, "_binding", binding)
        return binding

    def _numba_step(self, x, targets, weights, biases, activations, unchanged) -> torch.Tensor:
        custom = callable(self.loss)
        if not unchanged:
            ensemble = isinstance(self.model, MLPEnsemble)
            make_plan = plans.ensemble_plan if ensemble else plans.plan
            plan = make_plan(x, weights, biases, activations, "numba")
            loss = None if custom else self.loss  # None: the gradient is given
            step = cpu.EnsembleStep if ensemble else cpu.TrainStep
            kernel = step(plan.prepared, loss, self.reduction, self._rule)
            self._kernel, self._binding = (plan, kernel), None
        plan, kernel = self._kernel
        binding, hyper = self._bound(weights, biases)
        if binding.arrays is None:
            binding.arrays = kernel.bind(*binding.views())
        parallel = plan.prepared.parallel(x.shape[-2], updates=True)
        if custom:
            output = threads.call(kernel.forward, plans.numpy_view(x), parallel=parallel)
            value, y = self._callable_loss(torch.from_numpy(output), targets)
            y = y.numpy()
        else:
            y = plans.numpy_view(targets[0])
        result = threads.call(
            kernel,
            plans.numpy_view(x),
            y,
            binding.arrays,
            hyper,
            binding.fresh,
            self.max_grad_norm or 0.0,
            parallel=parallel,
        )
        binding.stepped()
        # What optimizer.step() would mark: an lr scheduler, which wraps step() to set it,
        # warns that it stepped first when it finds this unset.
        self.optimizer._opt_called = True
        if custom:
            return value
        if isinstance(self.model, MLP) and self.max_grad_norm is None:
            ready = _Ready(self.model, plan, kernel, binding, x, targets[0], parallel)
            object.__setattr__(self, "_ready", ready)
        return torch.scalar_tensor(result, dtype=x.dtype)

    def _ensemble_step(self, x, targets, custom: bool) -> torch.Tensor:
        """``step`` of an ``MLPEnsemble``: every member in one numba call on CPU, torch's
        batched matmuls and the optimizer elsewhere; the members' losses add."""
        if self.max_grad_norm is not None:
            raise ValueError(
                "max_grad_norm clips the norm of every gradient together, which would couple "
                "an ensemble's members: FusedTrainer does not clip an MLPEnsemble; set "
                "max_grad_norm=None"
            )
        if self.cuda_graph:
            raise ValueError(
                "cuda_graph=True captures the Triton step of an MLP; an MLPEnsemble has no "
                "Triton step yet: set cuda_graph=None or False"
            )
        weights, biases = self.model.stacked()
        activations = self.model.activations
        plan = self._kernel[0] if self._kernel else None
        unchanged = plan is not None and plan.current(weights, biases) and plan.fits(x)
        if not unchanged:
            plans.check_ensemble(x, weights, biases, activations)
        if custom:
            if x.shape[-2] == 0:
                raise ValueError("x must hold at least one sample, got a batch of 0")
        else:
            _check_target(self.loss, x, targets[0], weights[-1].shape[1], len(weights[-1]))
        backend = plans.resolve_ensemble_backend(self.backend, x)
        if backend == "numba":
            self._check_step_hooks()
            return self._numba_step(x, targets, weights, biases, activations, unchanged)
        self._check_groups()
        if self.loss == "cross_entropy":
            _check_class_range(targets[0], weights[-1].shape[1])
        return self._torch_ensemble_step(x, targets, weights, biases, activations)

    def _torch_ensemble_step(self, x, targets, weights, biases, activations) -> torch.Tensor:
        """The ensemble's step in torch ops: forward, the loss's gradient, backward by
        autograd, then the optimizer."""
        parameters = _sequential_order(weights, biases)
        with torch.enable_grad():
            output = plans.torch_ensemble_forward(x, weights, biases, activations)[-1]
        if callable(self.loss):
            value, g = self._callable_loss(output.detach(), targets)
        else:
            loss = lambda out, y: ensemble_loss(out, y, self.loss, self.reduction)  # noqa: E731
            value, g = _loss_and_grad_by_autograd(loss, output.detach(), targets, self.model)
        grads = torch.autograd.grad(output, parameters, g)
        for parameter, grad in zip(parameters, grads, strict=True):
            parameter.grad = grad
        self.optimizer.step()
        for parameter in parameters:
            parameter.grad = None
        return value

    def _on_device_step(self, weights, biases) -> bool:
        """Whether the Triton step runs whole on the device (``kernels.gpu_step``): a loss
        name, no clipping (its global norm is a reduction before the update), outputs
        within the loss kernel's tile, parameters that hold their own memory."""
        from .kernels import gpu_step

        parameters = _sequential_order(weights, biases)
        return (
            not callable(self.loss)
            and self.max_grad_norm is None
            and gpu_step.supports(weights[-1].shape[0])
            and all(p.is_contiguous() for p in parameters)
        )

    @torch.no_grad()
    def _triton_step(self, x, y, weights, biases, activations) -> torch.Tensor:
        """The whole step on the device, with no host sync (``kernels.gpu_step``)."""
        from .kernels import gpu_step

        flag = self._flag
        if flag is None or flag.tensor.device != x.device:
            flag = self._flag = _ClassFlag(x.device)
        flag.check(weights[-1].shape[0])  # an earlier step's class index out of range
        binding, hyper = self._bound(weights, biases)
        if binding.device_state is None:
            binding.device_state = _DeviceState(binding, weights, biases, flag.tensor)
        state = binding.device_state.refreshed(binding, hyper)
        mean, tf32 = self.reduction == "mean", plans.tf32()

        def step(x, y):
            return gpu_step.train_step(
                x, y, weights, biases, activations, state, self.loss, mean, tf32=tf32
            )

        y = y.contiguous()
        if self.cuda_graph is False or not x.is_cuda:
            loss = step(x, y)
        else:
            key = capture.key(x, y, self.loss, self.reduction, activations, tf32)
            loss = self._graphs_for(binding).run(key, step, (x, y))
        binding.stepped()
        flag.copy_out()
        self.optimizer._opt_called = True  # as in _numba_step
        return loss

    def _graphs_for(self, binding: _Binding) -> capture.Graphs:
        """The graphs of this binding: a new binding (load_state_dict, .to(), replaced
        parameters or state) drops the old one's graphs, which point at its tensors."""
        graphs = self._graphs
        if graphs is None or graphs.binding is not binding:
            graphs = capture.Graphs(binding)
            object.__setattr__(self, "_graphs", graphs)
        return graphs

    @torch.no_grad()
    def _torch_step(self, x, targets, weights, biases, activations, kernels=None) -> torch.Tensor:
        """The step in torch ops, or with ``kernels``' forward and backward (Triton's,
        ``plans.KERNELS``) around the torch loss gradient; the optimizer updates."""
        if kernels is None:
            outputs = plans.torch_forward(x, weights, biases, activations, keep=True)
        else:
            plan = plans.Plan(weights, biases, activations, "triton")
            saved = kernels.forward(plan, x)[1]
            outputs = kernels.outputs(saved)
        output = outputs[len(weights) - 1]
        if callable(self.loss):
            value, g = self._callable_loss(output, targets)
        else:
            mean = self.reduction == "mean"
            value, g = _torch_loss_and_grad(output, targets[0], self.loss, mean)
        if kernels is None:
            grads = _torch_backward(g, x, weights, biases, activations, outputs)
        else:
            _, *grads = kernels.backward(plan, saved, g, False)
        parameters = [
            p for pair in zip(weights, biases, strict=True) for p in pair if p is not None
        ]
        for parameter, gradient in zip(weights + biases, [*grads[0], *grads[1]], strict=True):
            if parameter is not None:
                parameter.grad = gradient
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(parameters, self.max_grad_norm)
        self.optimizer.step()
        for parameter in parameters:
            parameter.grad = None
        return value

    def _callable_loss(self, output: torch.Tensor, targets) -> tuple:
        """``(L, ∂L/∂ŷ)`` of the callable loss: eager autograd with the graph checked,
        or, with ``compile_loss``, compiled once the first step has checked it."""
        compiled = self._compiled_loss
        if compiled is not None:
            grad, value = compiled(output, *targets)
            return value.detach().reshape(()), grad
        result = _loss_and_grad_by_autograd(self.loss, output, targets, self.model)
        if self.compile_loss:
            loss = self.loss
            scalar = lambda output, *targets: loss(output, *targets).reshape(())  # noqa: E731
            compiled = torch.compile(torch.func.grad_and_value(scalar))
            object.__setattr__(self, "_compiled_loss", compiled)
        return result

    # -- optimizer state, in torch.optim's format ---------------------------------
    def state_dict(self) -> dict:
        """``trainer.optimizer.state_dict()``: the optimizer's own, as a checkpoint keeps it."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        """Resume from ``state_dict()`` of this trainer or of the matching ``torch.optim``."""
        self.optimizer.load_state_dict(state_dict)
        self._check_groups()


class _Binding:
    """The optimizer's state and hyperparameters as the kernels take them, for one
    list of parameters (W₁, b₁, W₂, …, biases only where a layer has one).

    Creates the state tensors torch would create on its first step, and builds a
    (parameters, 6) hyperparameter array from the groups. ``current(params)`` says, in
    one identity test per tensor, whether the parameters (and their memory) and the
    state tensors are still those bound. The numba step binds ``views()`` into
    ``arrays``; the Triton step takes ``device_state``. ``on_device``: keep Adam's step
    counts on the parameters' device (as torch's capturable Adam does), where the
    Triton step advances them.
    """

    def __init__(self, optimizer, params, rule: str, on_device: bool = False) -> None:
        self.optimizer, self.params, self.rule = optimizer, params, rule
        self.pointers = [p.data_ptr() for p in params]
        position = {id(p): index for index, p in enumerate(params)}
        self.groups = [
            (group, [position[id(p)] for p in group["params"]]) for group in optimizer.param_groups
        ]
        self._last: list = [None] * len(self.groups)  # each group's values at the last step
        self.hyper_array = np.zeros((len(params), 6))
        self.fresh, self.started = np.zeros(len(params), bool), False
        self.version = 0  # counts the changes of hyper_array and fresh
        group_of = {id(p): group for group in optimizer.param_groups for p in group["params"]}
        self.container = optimizer.state
        self.on_device = on_device
        self.held = [self._state(i, p, group_of[id(p)]) for i, p in enumerate(params)]
        self.arrays = None  # the numba kernel's views of the state, bound by its step
        self.device_state: _DeviceState | None = None  # the Triton step's, made by its step

    def _state(self, index: int, param, group) -> tuple[dict, dict]:
        """``(the parameter's state dict, the tensors in it the kernel uses)``, created as
        torch creates them where they do not exist yet."""
        state = self.optimizer.state.get(param, _NO_STATE)
        if self.rule == "sgd":
            if group["momentum"] != 0 and state.get("momentum_buffer") is None:
                state = self.optimizer.state[param]
                state["momentum_buffer"] = torch.zeros_like(param)
                self.fresh[index] = self.started = True  # torch's first step sets buf = d
        elif not state:
            state = self.optimizer.state[param]
            # torch.optim's scalar dtype: float64 only under a float64 default
            wide = torch.get_default_dtype() == torch.float64
            state["step"] = torch.tensor(0.0, dtype=torch.float64 if wide else torch.float32)
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        step = state.get("step")
        if self.on_device and step is not None and step.device != param.device:
            state["step"] = step.to(param.device)
        return state, {key: state.get(key) for key in (*_STATE_KEYS[self.rule], "step")}

    def views(self):
        """``(states, steps)`` as numpy views, for ``cpu.TrainStep.bind``."""
        states, steps = [], []
        empty = {p.dtype: np.empty(0, _numpy_dtype(p.dtype)) for p in self.params}
        for param, (_, held) in zip(self.params, self.held, strict=True):
            arrays = [_flat(held[key]) for key in _STATE_KEYS[self.rule] if held[key] is not None]
            states += (arrays + [empty[param.dtype]] * 2)[:2]
            step = held["step"]
            steps.append(_NO_STEP if step is None else step.detach().view(1).numpy())
        return states, steps

    def current(self, params) -> bool:
        """Whether ``params`` are the parameters bound, in the same memory, and the
        optimizer still holds the state tensors bound (``holds_state``)."""
        if len(params) != len(self.params):
            return False
        for param, bound, pointer in zip(params, self.params, self.pointers, strict=True):
            if param is not bound or param.data_ptr() != pointer:
                return False
        return self.holds_state()

    def holds_state(self) -> bool:
        """Whether the optimizer still holds the state tensors bound (a load_state_dict
        replaces them all, a hand edit some)."""
        if self.optimizer.state is not self.container:
            return False
        for state, held in self.held:
            for key, tensor in held.items():
                if state.get(key) is not tensor:
                    return False
        return True

    def hyper(self):
        """The (parameters, 6) array from the groups as they are now; options the kernels
        do not implement raise, here as at construction."""
        for index, (group, rows) in enumerate(self.groups):
            values = tuple(map(group.get, _GROUP_KEYS[self.rule]))
            if values == self._last[index]:
                continue
            _check_group(self.optimizer, index, self.rule)
            if self.rule == "sgd":
                if group["momentum"] != 0 and any(
                    self.held[r][1]["momentum_buffer"] is None for r in rows
                ):
                    self.container = None  # momentum turned on: the next step binds anew
                lr, momentum, decay = values[:3]
                row = (lr, momentum, decay, 0.0, 0.0, 0.0)
            else:
                lr, (beta1, beta2), eps, decay = values[:4]
                row = (lr, 0.0, decay, beta1, beta2, eps)
            self.hyper_array[rows] = [_number(v) for v in row]
            self._last[index] = values
            self.version += 1
        return self.hyper_array

    def stepped(self) -> None:
        """After a step: the momentum buffers it started are no longer new."""
        if self.started:
            self.fresh[:] = False
            self.started = False
            self.version += 1


class _Ready:
    """What ``FusedTrainer.step``'s full path checked before a numba step of an ``MLP``
    with a loss name and no clipping: the model (``nn.BoundModel``), x's and y's shape,
    dtype and device, the optimizer's state, with the step's kernel. ``ready(trainer, x,
    targets)`` re-checks all of it in one frame and steps, reading the hyperparameters
    and refusing hooks as the full path does; or returns None where anything changed or
    the call is not the common case (contiguous tensors that do not require grad), and
    the full path runs (and keeps a new one). A setting set on the trainer drops it.
    """

    def __init__(self, model: MLP, plan, kernel, binding: _Binding, x, y, parallel: bool):
        self.model = BoundModel(model, plan)
        self.kernel, self.binding, self.parallel = kernel, binding, parallel
        self.x = (x.shape, x.dtype, x.device)
        self.y = (y.shape, y.dtype, y.device)

    def __call__(self, trainer: FusedTrainer, x, targets) -> torch.Tensor | None:
        y = targets[0] if len(targets) == 1 else None
        binding = self.binding
        if not (
            x.__class__ is torch.Tensor
            and (x.shape, x.dtype, x.device) == self.x
            and y.__class__ is torch.Tensor
            and (y.shape, y.dtype, y.device) == self.y
            and x.is_contiguous()
            and y.is_contiguous()
            and not x.requires_grad
            and not y.requires_grad
            and self.model.unchanged(trainer.model)
            and binding.holds_state()
        ):
            return None
        trainer._check_step_hooks()
        hyper = binding.hyper()  # also refuses options the kernels do not implement
        if binding.container is None:  # SGD's momentum turned on: bind anew
            return None
        arrays = x.numpy(), y.numpy(), binding.arrays, hyper, binding.fresh
        result = threads.call(self.kernel.again, *arrays, parallel=self.parallel)
        binding.stepped()
        trainer.optimizer._opt_called = True  # as _numba_step marks it
        return torch.scalar_tensor(result, dtype=x.dtype)


class _DeviceState:
    """A binding as ``gpu_step`` takes it: the state per parameter slot (W₁, b₁, W₂, …,
    a layer without bias filling its b slot with W) and the hyperparameters in a device
    tensor, sent again only when the groups or the first-step flags change."""

    def __init__(self, binding: _Binding, weights, biases, flag: torch.Tensor) -> None:
        from .kernels import gpu_step

        slots, index = [], 0
        for w, b in zip(weights, biases, strict=True):
            slots += [(w, index), (w if b is None else b, None if b is None else index + 1)]
            index += 1 if b is None else 2
        self.rows = [row for _, row in slots]
        device = weights[0].device
        placeholder = torch.zeros((), dtype=torch.float32, device=device)
        held = [None if row is None else binding.held[row][1] for row in self.rows]
        keys = _STATE_KEYS[binding.rule]

        def tensors(key, fallback):
            return tuple(
                fallback[i] if h is None or h.get(key) is None else h[key]
                for i, h in enumerate(held)
            )

        params = [tensor for tensor, _ in slots]
        self.hyper = torch.zeros(len(slots), gpu_step.HYPER_COLUMNS, dtype=torch.float64,
                                 device=device)  # fmt: skip
        self.sent = -1  # the binding's version the device holds
        self.state = gpu_step.OptimizerState(
            binding.rule,
            tensors(keys[0], params),
            tensors(keys[-1], params) if len(keys) > 1 else tuple(params),
            tensors("step", [placeholder] * len(slots)),
            self.hyper,
            flag,
        )

    def refreshed(self, binding: _Binding, hyper: np.ndarray):
        """The state, its hyperparameter rows sent to the device if ``binding``'s
        changed since they were last sent (``hyper``: ``binding.hyper()``)."""
        if self.sent != binding.version:
            rows = np.zeros(tuple(self.hyper.shape))
            for slot, row in enumerate(self.rows):
                if row is not None:
                    rows[slot, :6], rows[slot, 6] = hyper[row], binding.fresh[row]
            source = torch.from_numpy(rows)
            if self.hyper.is_cuda:  # a copy from pinned memory does not wait for the device
                source = source.pin_memory()
            self.hyper.copy_(source, non_blocking=True)
            self.sent = binding.version
        return self.state


class _ClassFlag:
    """``gpu_step``'s class-range flag, read without waiting on the device: after each
    step a copy goes to pinned host memory behind an event, and the next step reads it
    once the event has passed. The flag stays up on the device, so every step after a
    bad one changes nothing until the host has raised."""

    def __init__(self, device: torch.device) -> None:
        self.tensor = torch.zeros(2, dtype=torch.int64, device=device)
        self.host, self.event = self.tensor, None
        if device.type == "cuda":
            self.host = torch.zeros(2, dtype=torch.int64).pin_memory()
            self.event = torch.cuda.Event()

    def copy_out(self) -> None:
        if self.event is not None:
            self.host.copy_(self.tensor, non_blocking=True)
            self.event.record()

    def check(self, classes: int) -> None:
        if self.event is not None and not self.event.query():
            return  # not known yet: the next step asks again
        raised, label = self.host.numpy()
        if raised:
            self.tensor.zero_()
            self.host.zero_()
            raise ValueError(
                f"y of an earlier step held class index {label}, outside [0, {classes}): "
                "that step and every step after it left the parameters and the "
                "optimizer's state unchanged"
            )


_NO_STEP = np.zeros(1, np.float32)  # SGD keeps no step count
_NO_STATE: dict = {}


def _sequential_order(weights, biases) -> list[torch.Tensor]:
    """W₁, b₁, W₂, …: the parameters as nn.Sequential lists them (and the kernel takes them)."""
    return [p for pair in zip(weights, biases, strict=True) for p in pair if p is not None]


def _numpy_dtype(dtype: torch.dtype):
    return torch.empty(0, dtype=dtype).numpy().dtype


def _flat(tensor: torch.Tensor):
    return tensor.detach().view(-1).numpy()


# What a step reads of a group: its hyperparameters, then the options it refuses.
_GROUP_KEYS = {
    "sgd": ("lr", "momentum", "weight_decay", *_UNSUPPORTED["sgd"]),
    "adam": ("lr", "betas", "eps", "weight_decay", *_UNSUPPORTED["adam"]),
}
_GROUP_KEYS["adamw"] = _GROUP_KEYS["adam"]


def _check_input(x, in_features: int) -> torch.Tensor:
    """``x`` if it is a floating-point ``(batch, in_features)`` tensor (dtype and device
    are checked against the parameters next); an error naming x otherwise."""
    x = plans.check_tensor("x", x, None)
    if x.dim() != 2 or x.shape[1] != in_features:
        raise ValueError(
            f"x must have shape (batch, {in_features}) for the model's {in_features} input "
            f"features, got {plans.describe(x)}"
        )
    return x


def _check_target(loss: str, x: torch.Tensor, y, classes: int, members: int = 0) -> None:
    """Reject a bad ``y`` before any parameter changes: one row per sample of x, or, for
    an ensemble of ``members``, one per member and sample (or one shared by them)."""
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
    if y.device != x.device:
        raise ValueError(f"y is on {y.device} but x is on {x.device}; both must be on one")
    batch = x.shape[-2]
    if batch == 0:
        raise ValueError("x must hold at least one sample, got a batch of 0")
    per_sample = (batch,) if loss == "cross_entropy" else (batch, classes)
    shapes = [(members, *per_sample), per_sample] if members else [per_sample]
    if loss == "cross_entropy":
        if y.dtype != torch.int64 or y.shape not in shapes:
            raise TypeError(
                f"y must be int64 class indices of shape {' or '.join(map(str, shapes))} "
                f"for cross_entropy, got {plans.describe(y)}"
            )
    elif y.shape not in shapes or y.dtype != x.dtype:
        raise ValueError(
            f"y must have shape {' or '.join(map(str, shapes))} and dtype {x.dtype} for {loss}, "
            f"got {plans.describe(y)}"
        )


def _check_holds(optimizer, params: list, why: str = "") -> None:
    """Refuse an optimizer that does not hold exactly ``params``, each once."""
    theirs = [p for group in optimizer.param_groups for p in group["params"]]
    ids = {id(p) for p in params}
    foreign = [p for p in theirs if id(p) not in ids]
    missing = len(ids - {id(p) for p in theirs})
    if foreign or missing or len(theirs) != len(params):
        raise ValueError(
            "optimizer must hold exactly the model's parameters, each once: "
            f"{len(foreign)} foreign, {missing} of the model's missing, "
            f"{len(theirs)} listed for {len(params)}{why}"
        )


def _check_group(optimizer, index: int, rule: str) -> None:
    group = optimizer.param_groups[index]
    for option, required in _UNSUPPORTED[rule].items():
        if group.get(option, required) != required:
            raise ValueError(
                f"optimizer.param_groups[{index}] has {option}={group[option]!r}; "
                f"FusedTrainer implements {type(optimizer).__name__} with "
                f"{option}={required!r} only"
            )


def _check_class_range(y: torch.Tensor, classes: int) -> None:
    """Class indices in [0, classes), as ``cpu.TrainStep`` checks them (one host sync on CUDA)."""
    outside = (y < 0) | (y >= classes)
    if outside.any():
        raise ValueError(f"y holds class index {y[outside][0].item()}, outside [0, {classes})")


def _loss_and_grad_by_autograd(loss, output: torch.Tensor, targets, model) -> tuple:
    """``(L, ∂L/∂ŷ)`` of a loss written in torch: autograd over the loss alone, on a
    leaf copy of the network's output (the network is never in the graph)."""
    leaf = output.detach().clone().requires_grad_()
    with torch.enable_grad():
        value = loss(leaf, *targets)
    _check_loss_graph(value, leaf, model)
    (grad,) = torch.autograd.grad(value, leaf)
    return value.detach().reshape(()), grad


def _check_loss_graph(value, output: torch.Tensor, model) -> None:
    """Refuse a loss whose gradient FusedTrainer could not apply in full: one that is
    not a scalar tensor, that does not depend on the output, or whose graph reaches a
    tensor other than the output that requires grad (the model's parameters among
    them): that tensor's gradient would be dropped."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"loss must return a scalar tensor, got {type(value).__name__}")
    if value.numel() != 1:
        raise ValueError(
            f"loss must return a scalar tensor, got {plans.describe(value)}: reduce it "
            "(for example with .mean() or .sum())"
        )
    leaves = _graph_leaves(value)
    if not any(leaf is output for leaf in leaves):
        raise ValueError(
            "loss does not depend on the model's output (its result has no gradient with "
            "respect to the output it was given)"
        )
    for leaf in leaves:
        if leaf is output:
            continue
        names = {id(p): name for name, p in model.named_parameters()}
        if id(leaf) in names:
            raise ValueError(
                f"loss reaches the model's parameter {names[id(leaf)]!r}: FusedTrainer "
                "applies the gradient through the output only, so that term's gradient "
                "would be dropped. A weight penalty belongs in the optimizer's weight_decay; "
                "anything else, train with the torch loop"
            )
        raise ValueError(
            f"loss reaches a tensor that requires grad besides the output "
            f"({plans.describe(leaf)}): its gradient would be dropped. Detach it, or train "
            "it with the torch loop"
        )


def _graph_leaves(value: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors that require grad and that ``value``'s autograd graph reaches."""
    if value.grad_fn is None:
        return [value] if value.requires_grad else []
    leaves, seen, stack = [], set(), [value.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # AccumulateGrad: a leaf
        if variable is not None:
            leaves.append(variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def _torch_backward(g, x, weights, biases, activations, saved):
    """``([∂L/∂Wₗ], [∂L/∂bₗ or None])`` in torch ops, as ``reference.mlp_backward``, from
    what ``torch_forward(..., keep=True)`` returned."""
    grad_weights, grad_biases = [None] * len(weights), [None] * len(weights)
    layers = plans.saved_layers(saved, activations)
    for layer in reversed(range(len(weights))):
        a, z = layers[layer]
        delta = _activations.get(activations[layer]).grad(g, a, z)
        grad_weights[layer] = delta.T @ (x if layer == 0 else layers[layer - 1][0])
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
