"""Generation on an expert-parallel model under torchrun (gloo, CPU) equals the single-process model,
with ranks that stop at different steps (no rank may hang in an all-to-all)."""

import json
import sys

import pytest
import torch

from engine.inference.generate import generate, left_pad
from tests.distributed.cases import full_model
from tests.distributed.generate_worker import prompts_of
from tests.train_runs import run_command

# A torchrun group of 2 ranks.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

NEW = 10


def test_expert_parallel_generation_equals_one_process(tmp_path):
    model = full_model("uniform")
    reference = []
    for rank in range(2):
        ids, mask = left_pad(prompts_of(rank, model.config.vocab_size), pad_token_id=0)
        reference.append((ids, mask, generate(model, ids, NEW, attention_mask=mask)))
    # rank 0's rows stop early (on their third new token, or sooner where it came before); rank 1's never do
    stops = [sorted({int(reference[0][2][r, reference[0][0].shape[1] + 2]) for r in range(2)}), []]
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        "-m",
        "tests.distributed.generate_worker",
        str(tmp_path),
        json.dumps({"ep": 2, "new": NEW, "stops": stops}),
    ]
    proc = run_command(cmd, timeout=300)  # its own process group: a hung rank is killed with torchrun
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in range(2):
        ids, mask, full = reference[rank]
        got = torch.load(tmp_path / f"rank{rank}.pt")["tokens"]
        want = generate(model, ids, NEW, attention_mask=mask, stop_token_ids=stops[rank], pad_token_id=0)
        assert got.shape[1] == ids.shape[1] + NEW  # rank 0 kept stepping until rank 1 was done
        assert torch.equal(got[:, : want.shape[1]], want), rank
        assert (got[:, want.shape[1] :] == 0).all()
        if rank == 0:
            assert want.shape[1] < ids.shape[1] + NEW  # alone, rank 0 would have stopped early
        if rank == 1:
            assert torch.equal(got, full)
