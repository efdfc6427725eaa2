"""On the shipped harmony chats (real data, not the synthetic stream), torchrun at EP=2 and EP=4
logs the same losses as one process at every step: the global batches are the same rows whatever
the layout (one global packed order, each rank reading its share), and the loss of a global batch
is summed over it and divided by its target-token count.

Slow on a small CPU (gloo, 4 processes): a few steps only.
"""

import json
import subprocess
import sys

import pytest
import torch

from engine.train import REPO

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


def _run(out, nproc):
    script = str(REPO / "engine" / "train.py")
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    cmd = [*launcher, script, *ARGS, f"trainer.output_dir={out}", f"parallel.ep={nproc}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=REPO)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("nproc", [2, 4])
def test_sample_chats_give_the_same_losses_at_every_layout(tmp_path, nproc):
    one = _run(tmp_path / "one", 1)
    many = _run(tmp_path / f"ep{nproc}", nproc)
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
