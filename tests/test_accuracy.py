"""Every registered implementation against a float64 reference, judged by torch's own error.

Results are compared with a reference computed in higher precision from the
same inputs (float64 for float32 runs; numpy's extended ``longdouble`` through
``kernels.reference`` for float64 runs); an implementation passes when its
error is at most twice torch's own error in the same dtype on the same case,
plus 4 units in the last place of the largest reference value
(flash-attention's criterion, not a fixed atol).
"""

import pytest
import torch

from fastbp.kernels.activation_table import TABLE
from fastbp.registry import entries

from .helpers import assert_as_accurate_as_torch

NETWORKS = [
    [1, 1],
    [2, 10],
    [10, 1],
    [100, 2],
    [784, 100],
    [1000, 10],
    [3, 33, 1, 17],
    [1000, 100, 10],
    [784, 256, 128, 10],
    [3, 600],  # at batch 127, 76 200 outputs: the parallel passes, in uneven row blocks
]
BATCHES = [1, 3, 64, 127]
# The activations whose derivative reads the output; the others, with their parameters,
# are judged the same way in test_activations.py.
ACTIVATIONS = [activation.name for activation in TABLE if not activation.reads_input]
# The numpy oracle is validated in test_reference.py; here fastbp's own CPU backends
# are judged (test_triton.py judges the Triton kernels the same way).
UNDER_TEST = [
    entry.name for entry in entries("cpu", "gradients") if entry.name.startswith("fastbp")
]


@pytest.mark.parametrize("name", UNDER_TEST)
@pytest.mark.parametrize("sizes", NETWORKS, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("batch", BATCHES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_float32_error_within_twice_torchs(name, sizes, batch, activation, bias):
    assert_as_accurate_as_torch(name, sizes, batch, activation, bias, torch.float32)


@pytest.mark.parametrize("name", UNDER_TEST)
@pytest.mark.parametrize("sizes", [[3, 33, 1, 17], [784, 256, 128, 10]], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_float64_error_within_twice_torchs(name, sizes, activation):
    assert_as_accurate_as_torch(name, sizes, 17, activation, True, torch.float64)
