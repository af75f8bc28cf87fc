"""Measure what the two wirings of fastbp's kernels cost per call, and eager vs
torch.compile for the headline network.

    python -m benchmarks.dispatch_overhead [--rounds 7] [--calls 500]

1. Per-call overhead: a 2-2-2 network at batch 1, where the kernels take ~1 µs,
   through ``fastbp.nn.MLP`` beside ``nn.Sequential`` (the drop-in's whole call),
   through a checked ``Plan`` (``plans.plan``: the ``torch.autograd.Function``, the eager
   default, or the kernels alone under no_grad), through ``F.mlp`` (its checks, then
   the plan) and through the
   ``fastbp::mlp_forward``/``mlp_backward`` custom ops (what torch.compile and
   torch.export see); forward alone under no_grad, and forward+backward.
   The drop-in and nn.Sequential also run under ``torch.compile``, beside a module
   whose forward is one custom op that does nothing: what a compiled call costs
   before any of fastbp's code runs.
   The no_grad forwards also run each right after a pass over 16 MB, which leaves
   their Python and data out of the caches, as a large kernel before them does (the
   pass timed alone is subtracted).
2. A 64x1000x100x10 training step (forward, MSE-sum, backward, SGD): fastbp.nn.MLP
   eager and under ``torch.compile(fullgraph=True)``, beside nn.Sequential both ways.

All variants run in interleaved rounds in one process; the median per call is kept.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import fastbp
from fastbp import functional as F
from fastbp import plans, traced
from fastbp.bench import time_interleaved


class _NothingOp(torch.nn.Module):
    """One custom op, that returns a new tensor and computes nothing: torch.compile's
    own per-call cost (guards, the AOT and inductor wrappers, the dispatch)."""

    library = torch.library.Library("fastbp_benchmarks", "DEF")
    library.define("nothing(Tensor x) -> Tensor")
    library.impl("nothing", torch.empty_like, "CPU")
    torch.library.register_fake("fastbp_benchmarks::nothing", torch.empty_like, lib=library)

    def forward(self, x):
        return torch.ops.fastbp_benchmarks.nothing(x)


def _tiny_calls() -> dict:
    x = torch.randn(1, 2)
    weights = [torch.randn(2, 2, requires_grad=True) for _ in range(2)]
    biases = [torch.randn(2, requires_grad=True) for _ in range(2)]
    names = ("relu", "identity")

    function = plans.plan(x, weights, biases, names, "numba")  # checked once: the Function alone

    def op(x):
        return traced.custom_op_mlp(x, weights, biases, names)

    def public(x, backend="numba"):  # F.mlp: the checks, then the Function
        return F.mlp(x, weights, biases, names, backend=backend)

    def torch_ops(x):  # torch's own layers, for scale
        return public(x, "torch")

    def forward_only(forward):
        def run():
            with torch.no_grad():
                forward(x)

        return run

    def forward_backward(forward):
        return lambda: forward(x).sum().backward()

    module = fastbp.nn.MLP([2, 2, 2], activation="relu")
    sequential = module.to_torch()

    def training(network, parameters_of=None):  # the drop-in's whole call
        parameters_of = network if parameters_of is None else parameters_of

        def run():
            parameters_of.zero_grad()
            network(x).sum().backward()

        return run

    compiled_module, compiled_sequential = torch.compile(module), torch.compile(sequential)
    return {
        "fastbp.nn.MLP, forward (no_grad)": forward_only(module),
        "nn.Sequential, forward (no_grad)": forward_only(sequential),
        "fastbp.nn.MLP, zero_grad+forward+backward": training(module),
        "nn.Sequential, zero_grad+forward+backward": training(sequential),
        "torch.compile(one op that does nothing), forward (no_grad)": forward_only(
            torch.compile(_NothingOp())
        ),
        "torch.compile(fastbp.nn.MLP), forward (no_grad)": forward_only(compiled_module),
        "torch.compile(nn.Sequential), forward (no_grad)": forward_only(compiled_sequential),
        "torch.compile(fastbp.nn.MLP), zero_grad+forward+backward": training(
            compiled_module, module
        ),
        "torch.compile(nn.Sequential), zero_grad+forward+backward": training(
            compiled_sequential, sequential
        ),
        "checked plan, forward (no_grad: the kernels alone)": forward_only(function),
        "custom op, forward (no_grad)": forward_only(op),
        "checked plan, forward+backward (the autograd.Function)": forward_backward(function),
        "custom op, forward+backward": forward_backward(op),
        "fastbp.functional.mlp, forward (no_grad)": forward_only(public),
        "fastbp.functional.mlp, forward+backward": forward_backward(public),
        "torch ops (backend='torch'), forward+backward": forward_backward(torch_ops),
    }


def _after_a_pass(forwards: dict, rounds: int, repeat: int) -> dict:
    """Each call's median µs right after a pass over 16 MB (more than this machine's
    caches hold per core): the two timed together, less the pass alone."""
    evicting_pass = torch.ones(1 << 22).sum
    runs = {name: (lambda run=run: (evicting_pass(), run())) for name, run in forwards.items()}
    medians = _medians({**runs, "the pass alone": evicting_pass}, rounds, repeat)
    alone = medians.pop("the pass alone")
    return {name: us - alone for name, us in medians.items()}


def _headline_steps() -> tuple[dict, dict]:
    generator = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 1000, generator=generator), torch.randn(64, 10, generator=generator)
    steps, compile_seconds = {}, {}
    for kind in ("fastbp.nn.MLP", "nn.Sequential"):
        for compiled in (False, True):
            torch.manual_seed(0)
            model = fastbp.nn.MLP([1000, 100, 10], bias=False)
            if kind == "nn.Sequential":
                model = model.to_torch()
            forward = torch.compile(model, fullgraph=True) if compiled else model
            optimizer = torch.optim.SGD(model.parameters(), lr=1e-6)

            def step(forward=forward, optimizer=optimizer):
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(forward(x), y, reduction="sum").backward()
                optimizer.step()

            name = f"{kind}, {'torch.compile' if compiled else 'eager'}"
            start = time.perf_counter()
            step()
            compile_seconds[name] = time.perf_counter() - start
            steps[name] = step
    return steps, compile_seconds


def _medians(calls: dict, rounds: int, repeat: int) -> dict:
    for run in calls.values():  # warm: kernels loaded, caches filled
        for _ in range(20):
            run()
    samples = time_interleaved({name: (run, repeat) for name, run in calls.items()}, rounds)
    return {name: statistics.median(values) * 1e6 for name, values in samples.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--calls", type=int, default=500)
    arguments = parser.parse_args()
    fastbp.threads.ensure_policy()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    calls = _tiny_calls()
    tiny = _medians(calls, arguments.rounds, arguments.calls)
    print("\n| 2-2-2 network, batch 1 | µs per call |\n|---|---|")
    for name, us in tiny.items():
        print(f"| {name} | {us:.1f} |")
    forwards = {name: run for name, run in calls.items() if "forward (no_grad)" in name}
    cold = _after_a_pass(forwards, arguments.rounds, arguments.calls)
    print("\n| 2-2-2 network, batch 1 | µs per call | right after a 16 MB pass |")
    print("|---|---|---|")
    for name, us in cold.items():
        print(f"| {name} | {tiny[name]:.1f} | {us:.1f} |")
    steps, compile_seconds = _headline_steps()
    medians = _medians(steps, arguments.rounds, max(1, arguments.calls // 5))
    eager = medians["fastbp.nn.MLP, eager"]
    print("\n| 64x1000x100x10 SGD step | µs per step | vs fastbp eager | first call (compile) |")
    print("|---|---|---|---|")
    for name, us in medians.items():
        print(f"| {name} | {us:.0f} | {eager / us:.2f}x | {compile_seconds[name]:.2f} s |")


if __name__ == "__main__":
    main()
