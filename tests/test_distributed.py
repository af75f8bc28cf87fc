"""fastbp.nn.MLP under DistributedDataParallel: 2 ranks, gloo, on 127.0.0.1."""

from __future__ import annotations

import pytest
import torch

from benchmarks.ddp_worker import global_batch, launch, new_model, train_step

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
    reason="this torch build has no gloo process group",
)


def test_two_ranks_train_as_one_process_on_the_whole_batch(tmp_path):
    output = tmp_path / "rank0.pt"
    results = launch(output, 2, 120, "--steps", "5")
    assert all(code == 0 for code, _ in results), [stderr[-2000:] for _, stderr in results]
    trained = torch.load(output)

    model = new_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = global_batch(64)
    for _ in range(5):
        train_step(model, optimizer, x, y)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(trained["state_dict"][name], value, msg=name)
    # fastbp sees both ranks and follows torch's thread count, which it leaves alone
    policy = trained["policy"]
    assert policy["ranks_on_this_machine"] == 2
    assert policy["threads"] == trained["torch_threads"] == trained["torch_threads_at_start"]


def test_a_failing_rank_fails_the_job_instead_of_hanging(tmp_path):
    results = launch(
        tmp_path / "unused.pt",
        2,
        90,
        "--steps",
        "5",
        "--fail-rank",
        "1",
        "--fail-at-step",
        "2",
        "--timeout",
        "15",
    )
    (code0, stderr0), (code1, stderr1) = results
    assert code1 != 0 and "rank 1 failed on purpose at step 2" in stderr1
    assert code0 != 0, "rank 0 should fail once its peer is gone, not finish or hang"
