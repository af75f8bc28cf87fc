"""The thread-policy workload: an eager training loop mixing fastbp layers and torch ops.

Four callables on the 64×1000×100×10 network (ReLU, no bias, MSE sum, SGD), each
returning what it computed:

- ``mixed``: the whole eager step, fastbp's MLP forward/backward with torch's
  loss and ``torch.optim.SGD`` in between (the loss);
- ``fastbp_alone``: fastbp's forward and backward only, the same autograd node
  (the weights' gradients);
- ``kernels_alone``: the same kernels called straight, on numpy arrays, no torch at
  all (the output and the weights' gradients);
- ``torch_alone``: the torch part only: loss, its gradient, the SGD update (the loss).

Without a fight between thread pools, ``mixed`` costs what ``fastbp_alone``
and ``torch_alone`` cost together; ``kernels_alone`` shows what the kernels
cost with no torch in the process's way (and, beside ``fastbp_alone``, the
autograd path's per-step overhead). ``check_thread_policy_workload`` holds each
part's result against torch's own before anything is timed.
"""

from __future__ import annotations

import torch

import fastbp
from fastbp.kernels import cpu


def thread_policy_workload(batch=64, sizes=(1000, 100, 10), seed=0):
    """``(parts, the model they train)``: the four callables of the module docstring."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, sizes[0], generator=generator)
    y = torch.randn(batch, sizes[-1], generator=generator)
    torch.manual_seed(seed)
    model = fastbp.nn.MLP(list(sizes), bias=False, backend="numba")
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)
    grad_output = torch.randn(batch, sizes[-1], generator=generator)
    prediction = torch.randn(batch, sizes[-1], generator=generator, requires_grad=True)

    def mixed():
        optimizer.zero_grad()
        loss = ((model(x) - y) ** 2).sum()
        loss.backward()
        optimizer.step()
        return loss

    arrays = [x.numpy(), [layer.weight.detach().numpy() for layer in model.linears]]
    activations, no_bias = list(model.activations), [None] * len(model.linears)

    def fastbp_alone():
        for parameter in model.parameters():
            parameter.grad = None
        model(x).backward(grad_output)
        return [parameter.grad for parameter in model.parameters()]

    def kernels_alone():  # under the policy, as the autograd path calls them
        call = fastbp.threads.call
        outputs = call(cpu.mlp_forward, arrays[0], arrays[1], no_bias, activations)
        _, grads, _ = call(
            cpu.mlp_backward, grad_output.numpy(), *arrays, no_bias, activations, outputs, False
        )
        return outputs[-1], grads

    def torch_alone():
        loss = ((prediction - y) ** 2).sum()
        loss.backward()
        optimizer.step()
        return loss

    parts = {
        "mixed": mixed,
        "fastbp_alone": fastbp_alone,
        "kernels_alone": kernels_alone,
        "torch_alone": torch_alone,
    }
    return parts, model


def check_thread_policy_workload() -> None:
    """Each part, run once on a fresh workload, computes what torch's own layers compute."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1000, generator=generator), torch.randn(64, 10, generator=generator)
    torch.manual_seed(0)
    sequential = fastbp.nn.MLP([1000, 100, 10], bias=False).to_torch()
    grad_output = torch.randn(64, 10, generator=generator)
    prediction = torch.randn(64, 10, generator=generator)
    output = sequential(x)
    grads = torch.autograd.grad(output, list(sequential.parameters()), grad_output)
    close = lambda ours, theirs: torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)  # noqa: E731

    for ours, theirs in zip(thread_policy_workload()[0]["fastbp_alone"](), grads, strict=True):
        close(ours, theirs)
    kernel_output, kernel_grads = thread_policy_workload()[0]["kernels_alone"]()
    close(torch.from_numpy(kernel_output), output.detach())
    for ours, theirs in zip(kernel_grads, grads, strict=True):
        close(torch.from_numpy(ours), theirs)
    close(thread_policy_workload()[0]["torch_alone"]().detach(), ((prediction - y) ** 2).sum())

    parts, model = thread_policy_workload()
    loss = ((sequential(x) - y) ** 2).sum()
    loss.backward()
    close(parts["mixed"]().detach(), loss.detach())
    torch.optim.SGD(sequential.parameters(), lr=1e-6).step()
    for ours, theirs in zip(model.parameters(), sequential.parameters(), strict=True):
        close(ours.detach(), theirs.detach())
