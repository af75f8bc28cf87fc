"""Compile every Triton kernel for an H100 (sm_90) without a GPU, through the real launchers.

Run by test_triton.py in a process of its own: it swaps Triton's active driver
for one that only names the target, and makes each launch compile and return.
Prints "compiled N kernels" and exits 0, or raises.
"""

from __future__ import annotations

import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

H100 = GPUTarget("cuda", 90, 32)
H100_MULTIPROCESSORS = 132
H100_SHARED_MEMORY = 227 * 1024  # per block, opt-in maximum


class TargetOnlyDriver:
    """What JITFunction.run asks of a driver before it launches."""

    def get_current_target(self):
        return H100

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def is_active(self):
        return True


def main() -> None:
    driver.set_active(TargetOnlyDriver())
    compiled = []

    def compile_only(kernel, grid):
        def launch(*args, **kwargs):
            binary = kernel.run(*args, grid=grid, warmup=True, **kwargs)
            shared = binary.metadata.shared
            assert shared <= H100_SHARED_MEMORY, f"{kernel.fn.__name__}: {shared} B shared memory"
            compiled.append(kernel.fn.__name__)

        return launch

    JITFunction.__getitem__ = compile_only

    from fastbp.kernels import gpu

    # CPU tensors stand in for CUDA ones: plan as for an H100, never launch.
    gpu._interpreted = lambda device: False
    gpu._check_device = lambda x: None
    gpu._multiprocessors = lambda device: H100_MULTIPROCESSORS
    cases = [
        (torch.float32, False, (1000, 100, 10), 64),
        (torch.float32, True, (1000, 100, 10), 4096),
        (torch.float16, False, (784, 256, 128, 10), 4096),
        (torch.bfloat16, False, (1000, 100, 10), 64),
        (torch.float64, False, (5, 7, 3), 3),
    ]
    for dtype, tf32, widths, batch in cases:
        x = torch.randn(batch, widths[0], dtype=dtype)
        weights = [torch.randn(o, i, dtype=dtype) for i, o in zip(widths, widths[1:], strict=False)]
        biases = [torch.randn(o, dtype=dtype) for o in widths[1:]]
        activations = ["relu"] * (len(weights) - 1) + ["tanh"]
        for fused in (True, False) if gpu.fusable(weights) else (False,):
            outputs = gpu.mlp_forward(x, weights, biases, activations, tf32=tf32, fused=fused)
            gpu.mlp_backward(
                outputs[-1], x, weights, biases, activations, outputs, tf32=tf32, fused=fused
            )
    print(f"compiled {len(compiled)} kernels: {sorted(set(compiled))}")


if __name__ == "__main__":
    main()
