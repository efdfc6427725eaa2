"""On the shipped harmony chats (real data, not the synthetic stream), torchrun at EP=2 and EP=4
logs the same losses as one process at every step: the global batches are the same rows whatever
the layout (one global packed order, each rank reading its share), and the loss of a global batch
is summed over it and divided by its target-token count.

Slow on a small CPU (gloo, 4 processes): a few steps only.
"""

import pytest
import torch

# Every test reads torchrun runs of the trainer.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ARGS = [
    "recipe=tiny_sft",
    "data.max_seq_len=256",
    "data.global_batch_size=8",
    "data.micro_batch_size=2",
    "trainer.max_steps=3",
    "optim.warmup_steps=2",
    "trainer.log_every=1",
    "trainer.val_every=0",
    "parallel.timeout_s=300",
]


@pytest.mark.parametrize("nproc", [2, 4])
def test_sample_chats_give_the_same_losses_at_every_layout(shared_runs, nproc):
    # The one-process run is trained once and read by both layouts' tests (tests/train_runs.py).
    one = shared_runs.get(1, *ARGS, "parallel.ep=1").records
    many = shared_runs.get(nproc, *ARGS, f"parallel.ep={nproc}", timeout=900).records
    assert [r["step"] for r in many] == [r["step"] for r in one] == [1, 2, 3]
    assert [r["target_tokens"] for r in many] == [r["target_tokens"] for r in one]
    # fp32; ranks sum their shares in another order than one process does.
    torch.testing.assert_close(
        torch.tensor([r["loss"] for r in many], dtype=torch.float64),
        torch.tensor([r["loss"] for r in one], dtype=torch.float64),
        rtol=1e-5,
        atol=0,
    )
    assert many[0]["data_documents"] == one[0]["data_documents"] == 400
