"""Per-call cost of fastbp's Triton kernels on a GPU, beside an empty torch launch.

    python -m benchmarks.triton_launch [--rounds 7] [--calls 2000] [--json out.json]

On a tiny network (8-16-8 at batch 1) the kernels themselves take a few µs, so
the time per call is the launch path: Python, Triton's argument binding and the
CUDA launch. Timed in interleaved rounds, wall time per call with the GPU
synchronized at the end of each round (so queued work counts):

- ``torch.add`` of two 1-element tensors: one eager launch, the floor;
- ``gpu.mlp_forward``: the fused forward launcher called directly;
- ``F.mlp`` forward under no_grad, and forward+backward through autograd;
- ``nn.Sequential`` forward+backward, torch's own path for the same network.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch

from fastbp import functional as F
from fastbp.bench import time_interleaved
from fastbp.nn import MLP


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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--json", help="also write the medians here")
    arguments = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU; none on this machine")
    calls = _calls()
    for run in calls.values():  # compile and warm
        for _ in range(20):
            run()
    samples = time_interleaved(
        {name: (run, arguments.calls) for name, run in calls.items()}, arguments.rounds, "cuda"
    )
    medians = {name: statistics.median(values) * 1e6 for name, values in samples.items()}
    floor = medians["torch.add (empty launch)"]
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}")
    print("| call | µs per call | × torch.add |\n|---|---|---|")
    for name, us in medians.items():
        print(f"| {name} | {us:.1f} | {us / floor:.1f} |")
    if arguments.json:
        with open(arguments.json, "w") as file:
            json.dump({"gpu": torch.cuda.get_device_name(), "us_per_call": medians}, file, indent=2)


if __name__ == "__main__":
    main()
