"""CUDA graphs of ``FusedTrainer``'s Triton step: captured once per key, then replayed.

A step on the Triton backend makes at most 2L + 2 launches and never waits on
the host (``kernels.gpu_step``), so it can be captured: a replay then costs one
launch of the host's time. A graph bakes in the addresses and shapes it was captured with,
and so it is kept per **key**: the batch's shapes and dtypes, the loss, the
reduction, the activations and the precision flag (``allow_tf32``). What a step
reads from the device each time, it reads anew at every replay: the batch (copied
into the graph's own input buffers), the hyperparameters (a device tensor the
trainer refreshes when ``param_groups`` change) and the optimizer's state.

A set of graphs belongs to one **binding** of the optimizer's state to the
parameters: ``load_state_dict``, ``.to()``, a replaced parameter or new state
tensors make a new binding, and with it an empty set (the old graphs, which point
at the old tensors, are dropped).

A key's first step runs eagerly: it compiles the kernels, which a capture cannot,
and is the warm-up. Its second step is captured and replayed; later ones replay.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

EAGER, CAPTURE, REPLAY = "eager", "capture", "replay"
GRAPHS_KEPT = 4  # keys with a graph per binding: e.g. the full batch and the last one


def key(x: torch.Tensor, y: torch.Tensor, loss: str, reduction: str, activations,
        tf32: bool) -> tuple:  # fmt: skip
    """What a captured step bakes in besides the bound tensors."""
    return (
        tuple(x.shape),
        x.dtype,
        tuple(y.shape),
        y.dtype,
        x.device,
        loss,
        reduction,
        tuple(activations),
        tf32,
    )


class Graph(NamedTuple):
    graph: torch.cuda.CUDAGraph
    inputs: tuple[torch.Tensor, ...]  # the graph's own input buffers
    output: torch.Tensor  # what the step returned during the capture


class Graphs:
    """The graphs of one binding (any object whose identity names it), by key."""

    def __init__(self, binding) -> None:
        self.binding = binding
        self.seen: set = set()
        self.graphs: OrderedDict[tuple, Graph] = OrderedDict()

    def action(self, step_key: tuple) -> str:
        """EAGER, CAPTURE or REPLAY for a step of this key, and note that it came."""
        if step_key in self.graphs:
            self.graphs.move_to_end(step_key)
            return REPLAY
        if step_key in self.seen:
            return CAPTURE
        self.seen.add(step_key)
        return EAGER

    def run(self, step_key: tuple, step: Callable[..., torch.Tensor],
            inputs: Sequence[torch.Tensor]) -> torch.Tensor:  # fmt: skip
        """``step(*inputs)``: eagerly, captured then replayed, or replayed, as
        ``action`` decides; returns its output (a copy, where a graph holds it)."""
        action = self.action(step_key)
        if action == EAGER:
            return step(*inputs)
        if action == CAPTURE:
            self.graphs[step_key] = _captured(step, inputs)
            while len(self.graphs) > GRAPHS_KEPT:
                self.graphs.popitem(last=False)
        graph = self.graphs[step_key]
        for static, given in zip(graph.inputs, inputs, strict=True):
            static.copy_(given)
        graph.graph.replay()
        return graph.output.clone()


def _captured(step: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor]) -> Graph:
    """A graph of ``step`` on copies of ``inputs`` (captured, not run)."""
    static = tuple(torch.empty_like(t) for t in inputs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        output = step(*static)
    return Graph(graph, static, output)
