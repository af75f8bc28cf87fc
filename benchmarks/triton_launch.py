"""Per-call cost of fastbp's Triton kernels on a GPU, beside an empty torch launch.

    python -m benchmarks.triton_launch [--rounds 7] [--calls 2000] [--json out.json]
    python -m benchmarks.triton_launch --stubbed       (no GPU needed)

On a tiny network (8-16-8 at batch 1) the kernels themselves take a few µs, so
the time per call is the launch path: Python, Triton's argument binding and the
CUDA launch. Timed in interleaved rounds, wall time per call with the GPU
synchronized at the end of each round (so queued work counts):

- ``torch.add`` of two 1-element tensors: one eager launch, the floor;
- ``gpu.mlp_forward``: the fused forward launcher called directly;
- ``F.mlp`` forward under no_grad, and forward+backward through autograd;
- ``nn.Sequential`` forward+backward, torch's own path for the same network;
- ``FusedTrainer.step`` on the Triton backend, eager (6 launches) and replayed from
  its CUDA graph.

``--stubbed`` times fastbp's own host path on the CPU, with every Triton launch
replaced by a no-op (in the interpreter's place, with the GPU's block sizes):
what fastbp's Python costs per call, before Triton's binding and the driver.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

import torch

from fastbp import functional as F
from fastbp.bench import time_interleaved
from fastbp.nn import MLP
from fastbp.train import FusedTrainer


def _calls() -> dict:
    from fastbp.kernels import gpu

    device = "cuda"
    a, b = torch.ones(1, device=device), torch.ones(1, device=device)
    model = MLP([8, 16, 8], backend="triton").to(device)
    sequential = model.to_torch()
    x = torch.randn(1, 8, device=device)
    weights = [layer.weight for layer in model.linears]
    biases = [layer.bias for layer in model.linears]
    detached_w = [w.detach() for w in weights]
    detached_b = [v.detach() for v in biases]
    activations = ["relu", "identity"]

    def forward_backward(network):
        return lambda: network(x).sum().backward()

    return {
        "torch.add (empty launch)": lambda: torch.add(a, b),
        "gpu.mlp_forward (launcher)": lambda: gpu.mlp_forward(
            x, detached_w, detached_b, activations
        ),
        "F.mlp forward, no_grad": torch.no_grad()(
            lambda: F.mlp(x, weights, biases, activations, backend="triton")
        ),
        "fastbp MLP forward+backward": forward_backward(model),
        "nn.Sequential forward+backward": forward_backward(sequential),
        **_trainer_steps(device),
    }


def _trainer_steps(device: str) -> dict:
    """FusedTrainer steps of the 8-16-8 network at batch 1, eager and graphed."""
    calls = {}
    for graphed in (False, None) if device == "cuda" else (False,):
        model = MLP([8, 16, 8]).to(device)
        trainer = FusedTrainer(model, "mse", optimizer="adam", backend="triton",
                               cuda_graph=graphed)  # fmt: skip
        x, y = torch.randn(1, 8, device=device), torch.randn(1, 8, device=device)
        name = "FusedTrainer.step, " + ("eager" if graphed is False else "CUDA graph")
        calls[name] = lambda trainer=trainer, x=x, y=y: trainer.step(x, y)
    return calls


def _stubbed_calls() -> dict:
    """fastbp's host path on CPU tensors, every Triton launch a no-op, GPU block sizes."""
    from triton.runtime.interpreter import InterpretedFunction

    from fastbp.kernels import gpu

    InterpretedFunction.run = lambda self, *args, **kwargs: None
    gpu.interpreted = lambda device: False
    gpu.multiprocessors = lambda device: 132
    model = MLP([8, 16, 8], backend="triton")
    x = torch.randn(1, 8)
    weights = [layer.weight.detach() for layer in model.linears]
    biases = [layer.bias.detach() for layer in model.linears]
    activations = ["relu", "identity"]
    return {
        "torch.add (the CPU's, for scale)": lambda: torch.add(x, x),
        "fastbp MLP forward+backward": lambda: model(x).sum().backward(),
        "gpu.mlp_forward (launcher)": lambda: gpu.mlp_forward(x, weights, biases, activations),
        "F.mlp forward, no_grad": torch.no_grad()(
            lambda: F.mlp(x, weights, biases, activations, backend="triton")
        ),
        **_trainer_steps("cpu"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", help="also write the medians here")
    parser.add_argument("--stubbed", action="store_true", help="fastbp's host path alone, on CPU")
    arguments = parser.parse_args()
    if arguments.stubbed:
        if os.environ.get("TRITON_INTERPRET") != "1":  # the stub takes the interpreter's place
            command = [sys.executable, "-m", "benchmarks.triton_launch", *sys.argv[1:]]
            os.execve(sys.executable, command, {**os.environ, "TRITON_INTERPRET": "1"})
        calls, device, label = _stubbed_calls(), "cpu", "stubbed launches, on the CPU"
    elif not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU; none on this machine (--stubbed times the host path alone)")
    else:
        calls, device = _calls(), "cuda"
        label = torch.cuda.get_device_name()
    for run in calls.values():  # compile and warm (and capture the graphed step)
        for _ in range(20):
            run()
    samples = time_interleaved(
        {name: (run, arguments.calls) for name, run in calls.items()}, arguments.rounds, device
    )
    medians = {name: statistics.median(values) * 1e6 for name, values in samples.items()}
    floor = next(iter(medians.values()))
    print(f"{label}, torch {torch.__version__}")
    print("| call | µs per call | × torch.add |\n|---|---|---|")
    for name, us in medians.items():
        print(f"| {name} | {us:.1f} | {us / floor:.1f} |")
    if arguments.json:
        with open(arguments.json, "w") as file:
            json.dump({"device": label, "us_per_call": medians}, file, indent=2)


if __name__ == "__main__":
    main()
