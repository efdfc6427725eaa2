"""`parallel.cp` in the trainer (torchrun, gloo, CPU) against the one-process run of the same recipe.

CP 2 on 2 processes (one CP group reading every row) and CP 2 x EP 2 on 4 processes (two data ranks,
each a CP group; the experts split over EP groups that hold chunks of different rows) log the same
losses and gradient norms and end with the same weights as one process: the global batch is the
same rows, each token is trained once, the loss is normalised by the global target count. 64-token
rows: chunks of 16 (CP 2), as long as the tiny model's 16-token sliding window, so the sliding layers
exchange only the halo and the full layers gather everything. fp32; the ranks add the same terms in
another order than one process (tolerances: tests/closeness.py).
"""

import json
import sys

import pytest
import torch

from engine.export import gather_trained_weights
from engine.train import REPO
from tests.closeness import assert_tensors_close, assert_weights_close
from tests.train_runs import run_command

# Every test reads torchrun runs of the trainer.
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LR, STEPS = 3.0e-3, 3
ARGS = [
    "recipe=tiny_sft",
    "data.source=synthetic",
    "data.max_seq_len=64",
    "data.global_batch_size=4",
    "data.micro_batch_size=2",
    f"trainer.max_steps={STEPS}",
    "optim.warmup_steps=1",
    f"optim.lr={LR}",
    "trainer.log_every=1",
    "trainer.val_every=0",
    "parallel.timeout_s=120",
]


def _run(out, nproc, *overrides):
    script = str(REPO / "engine" / "train.py")
    launcher = (
        [sys.executable]
        if nproc == 1
        else [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    )
    cmd = [*launcher, script, *ARGS, *overrides, f"trainer.output_dir={out}"]
    proc = run_command(cmd, timeout=600)  # its own process group: a hung rank is killed with torchrun
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()], proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    out = tmp_path_factory.mktemp("one")
    return out, _run(out, 1)[0]


@pytest.mark.parametrize("nproc,ep,shard", [(2, 1, "none"), (4, 2, "none"), (2, 1, "full")])
def test_context_parallel_run_matches_one_process(one, tmp_path, nproc, ep, shard):
    # shard=full: FSDP2 over the CP group's two ranks, which hold different tokens of the same rows.
    ref_dir, ref = one
    got, log = _run(tmp_path, nproc, "parallel.cp=2", f"parallel.ep={ep}", f"parallel.shard={shard}")
    assert "cp=2 (rank 0)" in log and f"ep={ep}" in log
    assert [r["target_tokens"] for r in got] == [r["target_tokens"] for r in ref] == [4 * 64] * STEPS
    losses = torch.tensor([r["loss"] for r in ref])
    assert losses[-1] < losses[0]
    assert_tensors_close(
        torch.tensor([r["loss"] for r in got]),
        losses,
        rtol=1e-5,
        atol=1e-5,
        where=f"loss per step, CP2 x EP{ep} vs one process",
    )
    assert_tensors_close(
        torch.tensor([r["grad_norm"] for r in got]),
        torch.tensor([r["grad_norm"] for r in ref]),
        rtol=1e-4,
        atol=1e-6,
        where=f"grad norm per step, CP2 x EP{ep} vs one process",
    )
    step = f"step_{STEPS:07d}"
    assert_weights_close(
        gather_trained_weights(tmp_path / "checkpoints" / step),
        gather_trained_weights(ref_dir / "checkpoints" / step),
        lr=LR,
        steps=STEPS,
        where=f"weights after {STEPS} steps, CP2 x EP{ep} vs one process",
    )


def test_sample_chats_and_validation_under_cp2(tmp_path):
    """The shipped harmony chats (packed rows: documents and restarting positions) at 256 tokens, with
    the validation pass: CP 2 logs one process's losses, target counts and validation loss (the CP
    ranks score their chunks of the shared rows; each token counts once)."""
    real = [
        "data.source=jsonl",
        "data.max_seq_len=256",
        "trainer.max_steps=2",
        "trainer.val_every=2",
        f"data.prepared_dir={tmp_path / 'data'}",
    ]  # prepared once, by the first run
    ref, _ = _run(tmp_path / "one", 1, *real)
    got, _ = _run(tmp_path / "cp2", 2, *real, "parallel.cp=2")
    assert [r["target_tokens"] for r in got] == [r["target_tokens"] for r in ref]
    assert "val_loss" in got[-1] and "val_loss" in ref[-1]
    for key in ("loss", "val_loss"):
        assert_tensors_close(
            torch.tensor([r[key] for r in got if key in r], dtype=torch.float64),
            torch.tensor([r[key] for r in ref if key in r], dtype=torch.float64),
            rtol=1e-5,
            atol=0,
            where=f"{key} per step, CP2 vs one process",
        )
