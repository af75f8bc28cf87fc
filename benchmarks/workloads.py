"""The thread-policy workload: an eager training loop mixing fastbp layers and torch ops.

Three callables on the 64×1000×100×10 network (ReLU, no bias, MSE sum, SGD):

- ``mixed``: the whole eager step, fastbp's MLP forward/backward with torch's
  loss and ``torch.optim.SGD`` in between;
- ``fastbp_alone``: fastbp's forward and backward only (the same autograd node);
- ``kernels_alone``: the same kernels called straight, on numpy arrays, no torch at all;
- ``torch_alone``: the torch part only (loss, its gradient, the SGD update).

Without a fight between thread pools, ``mixed`` costs what ``fastbp_alone``
and ``torch_alone`` cost together; ``kernels_alone`` shows what the kernels
cost with no torch in the process's way (and, beside ``fastbp_alone``, the
autograd path's per-step overhead).
"""

from __future__ import annotations

import torch

import fastbp
from fastbp.kernels import cpu


def thread_policy_workload(batch=64, sizes=(1000, 100, 10), seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, sizes[0], generator=generator)
    y = torch.randn(batch, sizes[-1], generator=generator)
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
        model(x).backward(grad_output)

    def kernels_alone():
        fastbp.threads.ensure_policy()  # as the autograd path does before launching
        outputs = cpu.mlp_forward(arrays[0], arrays[1], no_bias, activations)
        cpu.mlp_backward(grad_output.numpy(), *arrays, no_bias, activations, outputs, False)

    def torch_alone():
        loss = ((prediction - y) ** 2).sum()
        loss.backward()
        optimizer.step()
        return loss

    return {
        "mixed": mixed,
        "fastbp_alone": fastbp_alone,
        "kernels_alone": kernels_alone,
        "torch_alone": torch_alone,
    }
